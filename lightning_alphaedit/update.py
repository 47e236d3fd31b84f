"""The per-batch closed-form update of MEMIT / AlphaEdit, applied layer by layer (docs/method.md §5).

Plain torch (no Lightning): the ``NullSpaceUpdate`` callback drives it, tests call it
directly. A batch is a transaction: the edited layers are snapshotted first and restored
if any layer's update is not finite, is beyond ``max_update_ratio`` times the layer's weight
norm, or anything raises, so a batch is applied whole or not at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lightning_alphaedit import algebra
from lightning_alphaedit.algebra import KeyMoments, NullSpace
from lightning_alphaedit.collective import Collective
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.timing import timed

METHODS = ("alphaedit", "memit", "prune", "rect", "ft")
"""The editing methods (docs/method.md §5 and the paper's Table 1):

- ``alphaedit``: the update solved inside the null space of the preserved keys;
- ``memit``: the least-squares update weighted by C0 (the baseline);
- ``prune``: MEMIT whose accumulated edit of each layer has its singular values restrained
  (`algebra.restrain_singular_values`);
- ``rect``: MEMIT whose update keeps only the entries of largest relative change
  (`algebra.keep_largest_relative_change`);
- ``ft``: constrained fine-tuning of the edited layers (`lightning_alphaedit.finetune`).
"""
PROJECTIONS = (None, "null_space")
"""``null_space`` confines the update of memit, prune or rect to the null space of the
preserved keys (delta P, the paper's "+AlphaEdit" variants, Figure 6)."""
CLOSED_FORM = ("memit", "prune", "rect")  # the methods built on MEMIT's solve
RECT_FRACTION = 0.2  # RECT's setting: the top 20 % of entries by relative change


def method_label(method: str, projection: str | None) -> str:
    """How runs and tables name a configuration: ``memit``, ``memit+null_space``, ..."""
    return method if projection is None else f"{method}+{projection}"


def check_method(method: str, projection: str | None, rect_fraction: float = RECT_FRACTION) -> None:
    """Refuses a method, projection or RECT fraction that cannot run, before anything is loaded."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection is not None and method not in CLOSED_FORM:
        raise ValueError(
            f"projection: {projection} applies to {CLOSED_FORM}; {method} "
            + ("is already confined to the null space" if method == "alphaedit" else "has no closed-form update")
        )
    if not (isinstance(rect_fraction, (int, float)) and 0 < rect_fraction <= 1):
        raise ValueError(f"rect_fraction must be in (0, 1], got {rect_fraction!r}")


def check_long_stream_options(method: str, leakage_weight: float, refresh_every: int | None) -> None:
    """Refuses a leakage penalty or projector refresh that cannot run, before anything is loaded."""
    if not (isinstance(leakage_weight, (int, float)) and not isinstance(leakage_weight, bool)
            and math.isfinite(leakage_weight) and leakage_weight >= 0):
        raise ValueError(f"leakage_weight must be a finite number >= 0, got {leakage_weight!r}")
    if refresh_every is not None and (not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1):
        raise ValueError(f"refresh_every must be an int >= 1 or null, got {refresh_every!r}")
    if (leakage_weight or refresh_every) and method != "alphaedit":
        raise ValueError(f"leakage_weight and refresh_every apply to the alphaedit method, not {method}")


def check_update_ratio(max_update_ratio: float | None) -> None:
    """Refuses a bound on ||Δ|| / ||W|| that is not a positive number (None: no bound)."""
    if max_update_ratio is not None and not (
        isinstance(max_update_ratio, (int, float)) and math.isfinite(max_update_ratio) and max_update_ratio > 0
    ):
        raise ValueError(f"max_update_ratio must be a positive finite number or null, got {max_update_ratio!r}")


class RejectedUpdate(RuntimeError):
    """A layer's update was refused (not finite, or out of bounds); the batch was rolled back."""


class NonFiniteUpdate(RejectedUpdate):
    """A layer's update contained NaN or inf; the batch was rolled back."""


MAX_UPDATE_RATIO = 10.0
"""Default bound on ||Δ||_F / ||W||_F of one batch's update of a layer (normal updates are far
below 1): a finite update beyond it (e.g. from a vanishing λ) is refused like a non-finite one."""


@dataclass
class BatchOutcome:
    """What happened to one edit batch."""

    applied: bool
    reason: str | None = None
    delta_norms: dict[int, float] = field(default_factory=dict)
    residual_norms: dict[int, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # keys (forward passes), solve, cache


class WeightSnapshot:
    """Copies of the edited layers' weights, to restore them bitwise."""

    def __init__(self, targets: ModelTargets, layers: Sequence[int]) -> None:
        self.targets = targets
        self.saved = {layer: targets.weight(layer).detach().clone() for layer in layers}

    @torch.no_grad()
    def restore(self) -> None:
        for layer, weight in self.saved.items():
            self.targets.weight(layer).copy_(weight)


class SequentialEditor:
    """Holds what the method needs per edited layer and applies edit batches in order.

    Under several processes (``collective``), rank 0 computes and applies each layer's update
    and every rank receives the result (`lightning_alphaedit.collective`); the caller's
    ``keys_at`` and ``current_values`` must then return the rows of the whole batch on every rank.

    AlphaEdit keeps the null-space basis Û of C0 and the sequential cache in the subspace,
    Ûᵀ C_p Û (r x r); the MEMIT family keeps C0 and the full cache C_p (d_in x d_in), plus Û
    when its updates are projected; PRUNE also the unedited weights and their largest singular
    value; FT nothing (``statistics`` may then be empty).

    For long streams AlphaEdit takes two options. ``leakage_weight`` (λ1) adds λ1 Ûᵀ C0 Û, the
    leakage of the update onto the preserved keys, to the solve. ``refresh_every`` (τ) rebuilds
    the null space every τ edits from the eigenvectors below the threshold of
    M = (C_p / n + λ1 C0) / (λ1 + 1), n the edits so far; it keeps C0 and the full C_p
    (d_in x d_in per layer) and re-projects the cache onto the new basis.
    """

    def __init__(
        self,
        targets: ModelTargets,
        layers: Sequence[int],
        statistics: Mapping[int, KeyMoments],
        method: str = "alphaedit",
        l2: float = 10.0,
        nullspace_threshold: float = 2e-2,
        mom2_weight: float = 15000.0,
        nullspace_rule: str = "absolute",
        projection: str | None = None,
        rect_fraction: float = RECT_FRACTION,
        collective: Collective | None = None,
        max_update_ratio: float | None = MAX_UPDATE_RATIO,
        leakage_weight: float = 0.0,
        refresh_every: int | None = None,
    ) -> None:
        check_method(method, projection, rect_fraction)
        check_update_ratio(max_update_ratio)
        check_long_stream_options(method, leakage_weight, refresh_every)
        self.max_update_ratio = max_update_ratio
        self.leakage_weight, self.refresh_every = leakage_weight, refresh_every
        self.nullspace_threshold, self.nullspace_rule = nullspace_threshold, nullspace_rule
        self.edits = 0  # edits applied so far (the n of a refresh)
        self.full_caches: dict[int, torch.Tensor] = {}  # refresh: the full C_p (d_in, d_in)
        self.leakages: dict[int, torch.Tensor] = {}  # λ1 Ûᵀ C0 Û (r, r)
        self.collective = collective or Collective()
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be increasing and distinct, got {list(layers)}")
        self.targets, self.layers, self.method = targets, list(layers), method
        self.projection, self.rect_fraction = projection, rect_fraction
        self.l2, self.mom2_weight = l2, mom2_weight
        self.null_spaces: dict[int, NullSpace] = {}
        self.second_moments: dict[int, torch.Tensor] = {}
        self.caches: dict[int, torch.Tensor] = {}
        self.unedited: dict[int, torch.Tensor] = {}  # PRUNE: W before any edit (d_out, d_in)
        self.sigma: dict[int, float] = {}  # PRUNE: its largest singular value
        for layer in self.layers:
            if method == "ft":
                continue
            c0 = statistics[layer].mean()  # (d_in, d_in)
            if method == "alphaedit" or projection == "null_space":
                space = algebra.null_space(c0.double(), nullspace_threshold, nullspace_rule)
                self.null_spaces[layer] = space.to(dtype=torch.float32)
            if method == "alphaedit":
                rank = self.null_spaces[layer].rank
                self.caches[layer] = torch.zeros(rank, rank, dtype=torch.float32, device=c0.device)
                if leakage_weight or refresh_every:
                    self.second_moments[layer] = c0
                if leakage_weight:  # Û are C0's eigenvectors: λ1 diag(s)
                    self.leakages[layer] = algebra.leakage_in_subspace(self.null_spaces[layer], leakage_weight)
                if refresh_every:
                    self.full_caches[layer] = torch.zeros_like(c0, dtype=torch.float32)
                continue
            self.second_moments[layer] = c0
            self.caches[layer] = torch.zeros_like(c0, dtype=torch.float32)
            if method == "prune":
                weight = targets.linear_weight(layer).detach().float()
                self.unedited[layer] = weight.clone()
                self.sigma[layer] = float(torch.linalg.matrix_norm(weight.double(), ord=2))

    @property
    def label(self) -> str:
        return method_label(self.method, self.projection)

    def delta(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """The update of one layer before PRUNE's restraint: (d_out, d_in)."""
        if self.method == "alphaedit":
            return algebra.alphaedit_delta(
                keys, residuals, self.null_spaces[layer], cache=self.caches[layer],
                l2=self.l2, cache_in_subspace=True, leakage=self.leakages.get(layer),
            )
        delta = algebra.memit_delta(
            keys, residuals, self.second_moments[layer], cache=self.caches[layer], mom2_weight=self.mom2_weight
        )
        if self.method == "rect":
            weight = self.targets.linear_weight(layer).detach()  # (d_out, d_in), before this update
            delta = algebra.keep_largest_relative_change(delta, weight, self.rect_fraction)
        if self.projection == "null_space":
            delta = algebra.project_update(delta, self.null_spaces[layer])
        return delta

    def _solve_and_apply(
        self, layer: int, keys: torch.Tensor, residuals: torch.Tensor,
        watch: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[str | None, float]:
        """One layer's update, applied: (why it was refused or None, the norm of the change)."""
        delta = self.delta(layer, keys, residuals)  # (d_out, d_in)
        if not torch.isfinite(delta).all():
            return f"layer {layer}: the update is not finite", 0.0
        weight_norm = float(self.targets.linear_weight(layer).detach().float().norm())
        try:
            change = self._apply(layer, delta)
        except NonFiniteUpdate as error:
            return str(error), 0.0
        if watch is not None:
            watch(layer, change)
        norm = float(change.float().norm())
        return self._out_of_bounds(layer, norm, weight_norm), norm

    def _out_of_bounds(self, layer: int, norm: float, weight_norm: float) -> str | None:
        """Why a finite change of norm ``norm`` is refused (beyond ``max_update_ratio`` x ||W||), or None."""
        if self.max_update_ratio is None or norm <= self.max_update_ratio * weight_norm:
            return None
        return (
            f"layer {layer}: the update's norm {norm:.3g} exceeds {self.max_update_ratio:g} x the weight's "
            f"norm {weight_norm:.3g} (max_update_ratio)"
        )

    def _apply(self, layer: int, delta: torch.Tensor) -> torch.Tensor:
        """W += delta, or for PRUNE W = W_unedited + restrain(accumulated + delta); returns the
        change actually made (d_out, d_in)."""
        if self.method != "prune":
            self.targets.add_delta(layer, delta)
            return delta
        unedited = self.unedited[layer]
        weight = self.targets.linear_weight(layer).detach()
        accumulated = weight.to(unedited) - unedited  # (d_out, d_in): every edit of this layer so far
        restrained = algebra.restrain_singular_values(accumulated + delta.to(unedited), self.sigma[layer])
        if not torch.isfinite(restrained).all():
            raise NonFiniteUpdate(f"layer {layer}: the restrained update is not finite")
        change = restrained - accumulated
        self.targets.set_linear_weight(layer, unedited + restrained)
        return change

    @contextmanager
    def _transaction(self, outcome: BatchOutcome) -> Iterator[None]:
        """Everything in the block is undone if it raises: a batch is applied whole or not at all."""
        snapshot = WeightSnapshot(self.targets, self.layers)
        try:
            yield
        except RejectedUpdate as error:
            snapshot.restore()
            outcome.reason = str(error)
        except BaseException:
            snapshot.restore()
            raise

    def apply_batch(
        self,
        target_values: torch.Tensor,
        keys_at: Callable[[int], torch.Tensor],
        current_values: Callable[[], torch.Tensor],
        watch: Callable[[int, torch.Tensor], None] | None = None,
        all_keys_at: Callable[[Sequence[int]], Mapping[int, torch.Tensor]] | None = None,
    ) -> BatchOutcome:
        """Edit every layer towards ``target_values`` (u, d_out); roll back on any failure.

        ``keys_at(layer)`` gives K1 (u, d_in) on the model as updated so far; ``all_keys_at(layers)``,
        when given, the keys of several layers at once (one forward pass for the cache update);
        ``current_values()`` the last edited block's outputs (u, d_out) likewise.
        ``watch(layer, change)`` (rank 0 only) sees each layer's change (d_out, d_in) as it is
        applied, so that it can be measured without being kept.
        """
        if self.method == "ft":
            raise RuntimeError("the ft method has no closed-form update: use apply_finetuning")
        outcome = BatchOutcome(applied=False)
        device = target_values.device
        with self._transaction(outcome):
            for i, layer in enumerate(self.layers):
                with timed(outcome.seconds, "keys", device):
                    keys = keys_at(layer)  # (u, d_in)
                    residuals = (target_values - current_values()) / (len(self.layers) - i)  # (u, d_out)
                with timed(outcome.seconds, "solve", device):
                    reason, norm = self.collective.from_zero(
                        self._solve_and_apply(layer, keys, residuals, watch) if self.collective.is_zero else None
                    )
                    if reason is not None:  # refused on rank 0: every rank rolls back
                        raise RejectedUpdate(reason)
                    self.collective.broadcast_(self.targets.weight(layer))
                outcome.delta_norms[layer] = norm
                outcome.residual_norms[layer] = float(residuals.norm(dim=1).mean())
            # the cache holds the keys of the edited model, as in the reference
            with timed(outcome.seconds, "cache", device):
                if all_keys_at is not None:
                    all_keys = dict(all_keys_at(self.layers))
                else:
                    all_keys = {layer: keys_at(layer) for layer in self.layers}
                new_caches = {layer: self._grown_cache(layer, all_keys[layer]) for layer in self.layers}
                new_full = {layer: algebra.update_cache(self.full_caches[layer], all_keys[layer]) for layer in self.full_caches}
            if not all(torch.isfinite(c).all() for c in [*new_caches.values(), *new_full.values()]):
                raise NonFiniteUpdate("the sequential cache update is not finite")
            edits = self.edits + len(target_values)
            refreshed = {}
            if self.refresh_every and edits // self.refresh_every > self.edits // self.refresh_every:
                with timed(outcome.seconds, "refresh", device):
                    refreshed = {layer: self._refreshed_null_space(layer, new_full[layer], edits) for layer in self.layers}
            # nothing failed: the batch's state is committed at once
            self.caches.update(new_caches)
            self.full_caches.update(new_full)
            self.edits = edits
            for layer, space in refreshed.items():
                self._use_null_space(layer, space)
            outcome.applied = True
        return outcome

    def apply_finetuning(self, run: Callable[[], object]) -> BatchOutcome:
        """The ``ft`` method's batch: ``run()`` changes the edited weights in place (gradient
        steps); the change is kept only if every weight stays finite."""
        if self.method != "ft":
            raise RuntimeError(f"apply_finetuning is the ft method's; this editor runs {self.method}")
        outcome = BatchOutcome(applied=False)
        device = self.targets.weight(self.layers[0]).device
        with self._transaction(outcome):
            with timed(outcome.seconds, "finetune", device):
                reason, norms = self.collective.run_on_zero(lambda: self._finetune(run))
            if reason is not None:
                raise RejectedUpdate(reason)
            for layer in self.layers:  # rank 0 fine-tuned: every rank takes its weights
                self.collective.broadcast_(self.targets.weight(layer))
            outcome.delta_norms.update(norms)
            outcome.applied = True
        return outcome

    def _finetune(self, run: Callable[[], object]) -> tuple[str | None, dict[int, float]]:
        before = {layer: self.targets.linear_weight(layer).detach().clone() for layer in self.layers}
        run()
        norms = {}
        for layer in self.layers:
            change = self.targets.linear_weight(layer).detach() - before[layer]
            if not torch.isfinite(change).all():
                return f"layer {layer}: fine-tuning made the weights non-finite", {}
            norms[layer] = float(change.float().norm())
            refused = self._out_of_bounds(layer, norms[layer], float(before[layer].float().norm()))
            if refused is not None:
                return refused, {}
        return None, norms

    def _refreshed_null_space(self, layer: int, full_cache: torch.Tensor, edits: int) -> NullSpace:
        """The null space of M = (C_p / n + λ1 C0) / (λ1 + 1) (float64 eigh, float32 basis)."""
        blend = algebra.blended_moment(full_cache, edits, self.second_moments[layer], self.leakage_weight)
        space = algebra.null_space(blend, self.nullspace_threshold, self.nullspace_rule)
        return space.to(device=full_cache.device, dtype=torch.float32)

    def _use_null_space(self, layer: int, space: NullSpace) -> None:
        """Switch ``layer`` to ``space``: the subspace cache re-projected from the full C_p, the
        leakage penalty taken in the new basis (no longer C0's eigenvectors)."""
        self.null_spaces[layer] = space
        self.caches[layer] = algebra.project_cache(self.full_caches[layer], space).to(torch.float32)
        if self.leakage_weight:
            self.leakages[layer] = algebra.leakage_in_subspace(space, self.leakage_weight, self.second_moments[layer])

    def _grown_cache(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        cache = self.caches[layer]
        if self.method == "alphaedit":
            projected = keys.to(cache) @ self.null_spaces[layer].basis.to(cache)  # (u, r)
            return cache + projected.T @ projected  # (r, r)
        keys = keys.to(cache)
        return cache + keys.T @ keys  # (d_in, d_in)

    def state_dict(self) -> dict:
        state = {
            "method": self.method, "projection": self.projection, "layers": list(self.layers),
            "caches": {str(k): v.cpu() for k, v in self.caches.items()}, "edits": self.edits,
            "leakage_weight": self.leakage_weight, "refresh_every": self.refresh_every,
        }
        if self.refresh_every:  # the null spaces move: they and the full C_p are state
            state["full_caches"] = {str(k): v.cpu() for k, v in self.full_caches.items()}
            state["null_spaces"] = {
                str(k): {"basis": v.basis.cpu(), "eigenvalues": v.eigenvalues.cpu()} for k, v in self.null_spaces.items()
            }
            state["leakages"] = {str(k): v.cpu() for k, v in self.leakages.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        made_by = method_label(state["method"], state.get("projection"))
        if made_by != self.label or list(state["layers"]) != self.layers:
            raise ValueError(
                f"checkpoint was made by method={made_by} layers={state['layers']}, "
                f"this run is method={self.label} layers={self.layers}"
            )
        made_with = (state.get("leakage_weight", 0.0), state.get("refresh_every"))
        if made_with != (self.leakage_weight, self.refresh_every):
            raise ValueError(
                f"checkpoint was made with leakage_weight={made_with[0]} refresh_every={made_with[1]}, "
                f"this run has leakage_weight={self.leakage_weight} refresh_every={self.refresh_every}"
            )
        if self.refresh_every:
            if "null_spaces" not in state:
                raise ValueError("checkpoint was made without refresh_every: it holds no full cache to refresh from")
            for layer in self.layers:
                stored = state["null_spaces"][str(layer)]
                device = self.full_caches[layer].device
                self.null_spaces[layer] = NullSpace(
                    stored["basis"].to(device), stored["eigenvalues"].to(device),
                    self.nullspace_threshold, self.nullspace_rule,
                )
                self.full_caches[layer] = state["full_caches"][str(layer)].to(self.full_caches[layer])
                rank = self.null_spaces[layer].rank
                self.caches[layer] = torch.zeros(rank, rank, dtype=torch.float32, device=device)
                if self.leakage_weight:
                    self.leakages[layer] = state["leakages"][str(layer)].to(device)
        self.edits = int(state.get("edits", 0))
        for layer in self.caches:
            stored = state["caches"][str(layer)]
            if stored.shape != self.caches[layer].shape:
                raise ValueError(
                    f"checkpoint cache of layer {layer} has shape {tuple(stored.shape)}, expected "
                    f"{tuple(self.caches[layer].shape)}: the statistics or the threshold changed"
                )
            self.caches[layer] = stored.to(self.caches[layer])
