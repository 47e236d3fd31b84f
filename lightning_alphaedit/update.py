"""The per-batch closed-form update of MEMIT / AlphaEdit, applied layer by layer (ALGORITHM.md §5).

Plain torch (no Lightning): the ``NullSpaceUpdate`` callback drives it, tests call it
directly. A batch is a transaction: the edited layers are snapshotted first and restored
if any layer's update is not finite or anything raises, so a batch is applied whole or
not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_alphaedit import algebra
from lightning_alphaedit.algebra import KeyMoments, NullSpace
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.timing import timed

METHODS = ("alphaedit", "memit")


class NonFiniteUpdate(RuntimeError):
    """A layer's update contained NaN or inf; the batch was rolled back."""


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

    AlphaEdit keeps the null-space basis Û of C0 and the sequential cache in the subspace,
    Ûᵀ C_p Û (r x r); MEMIT keeps C0 and the full cache C_p (d_in x d_in).
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
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be increasing and distinct, got {list(layers)}")
        self.targets, self.layers, self.method = targets, list(layers), method
        self.l2, self.mom2_weight = l2, mom2_weight
        self.null_spaces: dict[int, NullSpace] = {}
        self.second_moments: dict[int, torch.Tensor] = {}
        self.caches: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            c0 = statistics[layer].mean()  # (d_in, d_in)
            if method == "alphaedit":
                space = algebra.null_space(c0.double(), nullspace_threshold, nullspace_rule)
                self.null_spaces[layer] = space.to(dtype=torch.float32)
                self.caches[layer] = torch.zeros(space.rank, space.rank, device=c0.device)
            else:
                self.second_moments[layer] = c0
                self.caches[layer] = torch.zeros_like(c0, dtype=torch.float32)

    def delta(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """The update of one layer: (d_out, d_in)."""
        if self.method == "alphaedit":
            return algebra.alphaedit_delta(
                keys, residuals, self.null_spaces[layer], cache=self.caches[layer],
                l2=self.l2, cache_in_subspace=True,
            )
        return algebra.memit_delta(
            keys, residuals, self.second_moments[layer], cache=self.caches[layer], mom2_weight=self.mom2_weight
        )

    def apply_batch(
        self,
        target_values: torch.Tensor,
        keys_at: Callable[[int], torch.Tensor],
        current_values: Callable[[], torch.Tensor],
    ) -> BatchOutcome:
        """Edit every layer towards ``target_values`` (u, d_out); roll back on any failure.

        ``keys_at(layer)`` gives K1 (u, d_in) on the model as updated so far;
        ``current_values()`` the last edited block's outputs (u, d_out) likewise.
        """
        snapshot = WeightSnapshot(self.targets, self.layers)
        outcome = BatchOutcome(applied=False)
        device = target_values.device
        try:
            for i, layer in enumerate(self.layers):
                with timed(outcome.seconds, "keys", device):
                    keys = keys_at(layer)  # (u, d_in)
                    residuals = (target_values - current_values()) / (len(self.layers) - i)  # (u, d_out)
                with timed(outcome.seconds, "solve", device):
                    delta = self.delta(layer, keys, residuals)  # (d_out, d_in)
                if not torch.isfinite(delta).all():
                    raise NonFiniteUpdate(f"layer {layer}: the update is not finite")
                self.targets.add_delta(layer, delta)
                outcome.delta_norms[layer] = float(delta.norm())
                outcome.residual_norms[layer] = float(residuals.norm(dim=1).mean())
            # the cache holds the keys of the edited model, as in the reference
            with timed(outcome.seconds, "cache", device):
                new_caches = {layer: self._grown_cache(layer, keys_at(layer)) for layer in self.layers}
            if not all(torch.isfinite(c).all() for c in new_caches.values()):
                raise NonFiniteUpdate("the sequential cache update is not finite")
        except NonFiniteUpdate as error:
            snapshot.restore()
            outcome.reason = str(error)
            return outcome
        except BaseException:
            snapshot.restore()
            raise
        self.caches.update(new_caches)
        outcome.applied = True
        return outcome

    def _grown_cache(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        cache = self.caches[layer]
        if self.method == "alphaedit":
            projected = keys.to(cache) @ self.null_spaces[layer].basis.to(cache)  # (u, r)
            return cache + projected.T @ projected  # (r, r)
        keys = keys.to(cache)
        return cache + keys.T @ keys  # (d_in, d_in)

    def state_dict(self) -> dict:
        return {"method": self.method, "layers": list(self.layers), "caches": {str(k): v.cpu() for k, v in self.caches.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method or list(state["layers"]) != self.layers:
            raise ValueError(
                f"checkpoint was made by method={state['method']} layers={state['layers']}, "
                f"this run is method={self.method} layers={self.layers}"
            )
        for layer in self.layers:
            stored = state["caches"][str(layer)]
            if stored.shape != self.caches[layer].shape:
                raise ValueError(
                    f"checkpoint cache of layer {layer} has shape {tuple(stored.shape)}, expected "
                    f"{tuple(self.caches[layer].shape)}: the statistics or the threshold changed"
                )
            self.caches[layer] = stored.to(self.caches[layer])
