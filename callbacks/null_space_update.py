"""``NullSpaceUpdate``: the callback that edits the weights after every batch.

At fit start it loads (or computes) the preserved-key statistics C0 of the edited layers
and builds the null-space bases (AlphaEdit) or keeps C0 (MEMIT). After each training
step it applies the closed-form update of the batch, layer by layer, with the target
values the step produced (rescaled to the norm anchor when one is calibrated), rolls back
a batch it must reject, and grows the sequential cache. It owns the edit state in the
checkpoint (edited weights, caches, counters) and refuses to resume it with other settings.

What is measured or written around the edits is the other callbacks' job (`DriftMonitor`,
`EditHistory`, `EditCheckpoint`, `ExportEditedModel`); they read this one through its public
attributes (``editor``, ``layers``, ``edits_applied``, ``applied_requests``, ``rejected``,
``timing``, ``corpus``, ``collective``), ``deltas``, ``unedited`` and ``watchers``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info

from lightning_alphaedit.algebra import default_threshold, kept_dimension
from lightning_alphaedit.collective import Collective
from lightning_alphaedit.corpus import Corpus, load_corpus
from lightning_alphaedit.datamodule import EditStreamDataModule
from lightning_alphaedit.finetune import FineTuneConfig, finetune
from lightning_alphaedit.norm_anchor import (
    NormAnchorConfig,
    anchor_targets,
    calibrate_anchor,
    calibration_key,
    calibration_requests,
    cached_anchor,
    projection_outputs,
)
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.resume import check_edit_settings, edit_settings
from lightning_alphaedit.statistics import StatisticsConfig, layer_statistics, model_fingerprint
from lightning_alphaedit.strategy import EditingDDPStrategy
from lightning_alphaedit.timing import timed
from lightning_alphaedit.update import (
    MAX_UPDATE_RATIO,
    RECT_FRACTION,
    SequentialEditor,
    check_long_stream_options,
    check_method,
    check_update_ratio,
    method_label,
)

log = logging.getLogger(__name__)

REJECTION_POLICIES = ("continue", "stop")
NO_CHANGE = 1e-6
"""An applied batch whose update is below this fraction of every edited weight's norm (float32
rounding level) changed nothing: it is reported as such."""

LayerWatcher = Callable[[int, torch.Tensor], None]
"""Called with (layer, change) as the editor applies each layer's update (before a rollback)."""


@dataclass
class EditedBatch:
    """The last training batch as the update handled it (what monitors read after the step)."""

    requests: list[EditRequest]
    applied: bool
    delta_norms: dict[int, float]
    """‖Δ‖ of each edited layer (empty when rejected)."""
    values: torch.Tensor | None
    """The target values z* the update used (u, d), every rank's rows; None for fine-tuning."""


class NullSpaceUpdate(pl.Callback):
    """Applies the projected closed-form update of each edit batch.

    Args:
        layers: Edited layers, increasing (e.g. ``[4, 5, 6, 7, 8]`` for Llama-3-8B). Target values
            are optimised at the last of them.
        method: ``alphaedit`` (update confined to the null space of C0), ``memit`` (the baseline),
            ``prune`` (MEMIT with the accumulated edit's singular values restrained), ``rect`` (MEMIT
            keeping the update's entries of largest relative change) or ``ft`` (constrained fine-tuning).
        projection: ``null_space`` confines the updates of memit, prune or rect to the null space of
            C0 (the paper's "+AlphaEdit" variants); null = none.
        rect_fraction: Fraction of the update's entries RECT keeps (0.2, the RECT paper's setting).
        finetune: Hyperparameters of the ``ft`` method.
        l2: λ of the AlphaEdit solve (``L2`` in the released configs).
        nullspace_threshold: The null-space rule's parameter: with ``absolute`` (the paper's), eigenvalues
            of C0 below it span the null space. null: the rule's default (absolute 2e-2, relative 1e-2,
            energy 0.3, fraction 0.7).
        nullspace_rule: How the null space is chosen from C0's eigenvalues: ``absolute`` (eigenvalue <
            threshold), ``relative`` (< threshold x the largest), ``energy`` (the smallest ones holding at
            most a threshold fraction of the total), ``fraction`` (that fraction of the dimension).
        mom2_weight: λ_m weighting C0 in the MEMIT solve (``mom2_update_weight``).
        statistics: How C0 is collected and cached.
        on_rejected: A batch whose update is not finite (or beyond ``max_update_ratio``) is rolled back; then
            ``continue`` or ``stop`` the run (a stopped run, or one that edited nothing, exits non-zero).
        max_update_ratio: A batch is rejected and rolled back when a layer's update has a Frobenius norm
            above this many times the layer's weight norm (normal updates are far below 1; a vanishing
            ``l2`` gives updates of 1e13). null = no bound.
        baseline: Measure the unedited model on the whole stream before the first edit, so
            every reported score has its baseline beside it (measured here: it must come before
            a resumed run's edits are restored).
        leakage_weight: λ1 of AlphaEdit's leakage penalty: adds λ1 times the mean squared change of the
            layer's output on the preserved keys to the objective (the "null space" is approximate:
            its eigenvalues are small, not zero). 0 = off (the paper's update); 3000 in BetaEdit's release.
        refresh_every: Rebuild the null space every this many edits from the eigenvectors below the
            threshold of (C_p / n + λ1 C0) / (λ1 + 1), so directions earlier edits used are protected
            too; keeps the full C_p (d_in x d_in) per layer. null = never (the paper).
        norm_anchor: Rescale every target value to a norm calibrated on the unedited model, and skip
            (and report) edits whose value is far larger (`lightning_alphaedit.norm_anchor`). Off by default.
    """

    def __init__(
        self,
        layers: list[int],
        method: str = "alphaedit",
        l2: float = 10.0,
        nullspace_threshold: float | None = None,
        mom2_weight: float = 15000.0,
        statistics: StatisticsConfig = StatisticsConfig(),
        on_rejected: str = "continue",
        baseline: bool = True,
        nullspace_rule: str = "absolute",
        projection: str | None = None,
        rect_fraction: float = RECT_FRACTION,
        finetune: FineTuneConfig = FineTuneConfig(),
        max_update_ratio: float | None = MAX_UPDATE_RATIO,
        leakage_weight: float = 0.0,
        refresh_every: int | None = None,
        norm_anchor: NormAnchorConfig = NormAnchorConfig(),
    ) -> None:
        check_method(method, projection, rect_fraction)
        check_update_ratio(max_update_ratio)
        check_long_stream_options(method, leakage_weight, refresh_every)
        self.max_update_ratio = max_update_ratio
        self.leakage_weight, self.refresh_every = leakage_weight, refresh_every
        if norm_anchor.enabled and method == "ft":
            raise ValueError("norm_anchor rescales target values; the ft method has none")
        self.norm_anchor = norm_anchor
        self.anchor: float | None = None  # calibrated at fit start
        self.anchor_skipped: list[str] = []  # case ids of the edits the anchor skipped
        if on_rejected not in REJECTION_POLICIES:
            raise ValueError(f"on_rejected must be one of {REJECTION_POLICIES}, got {on_rejected!r}")
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be a non-empty increasing list, got {layers}")
        self.layers, self.method = list(layers), method
        kept_dimension(torch.ones(1), nullspace_rule, nullspace_threshold)  # a bad rule fails before loading
        if nullspace_threshold is None:
            nullspace_threshold = default_threshold(nullspace_rule)
        self.l2, self.nullspace_threshold, self.mom2_weight = l2, nullspace_threshold, mom2_weight
        self.nullspace_rule = nullspace_rule
        self.projection, self.rect_fraction, self.finetune = projection, rect_fraction, finetune
        self.statistics, self.on_rejected, self.baseline = statistics, on_rejected, baseline
        self.timing: dict[str, float] = {}  # seconds per phase, summed over the run (monitors add theirs)
        self.editor: SequentialEditor | None = None
        self.corpus: Corpus | None = None  # the statistics corpus, loaded at fit start (drift's held-out text)
        self.collective = Collective()  # the ranks of a multi-process run, set at fit start
        self.edits_applied = 0
        self.applied_requests: list = []
        self.rejected: list[dict] = []
        self.original_weights: dict[int, torch.Tensor] = {}  # the unedited edited layers, on the CPU
        self.watchers: list[LayerWatcher] = []  # see LayerWatcher; monitors add theirs
        self.last_batch: EditedBatch | None = None
        self._batch_started = time.perf_counter()
        self._restored: dict | None = None
        self.history_in_checkpoint: list[dict] = []
        self._edit_settings: dict = {}  # what decides the edits, checked against a checkpoint's

    # --- fit start: checks, statistics, projectors (on the unedited model) ----------------------

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        # before the strategy wraps the model: refuse set-ups that would fail later or edit wrongly
        if isinstance(trainer.strategy, DDPStrategy) and not isinstance(trainer.strategy, EditingDDPStrategy):
            raise ValueError(
                f"trainer.strategy {type(trainer.strategy).__name__} wraps the frozen model in DistributedDataParallel, "
                "which refuses a model without trainable parameters: use "
                "{class_path: lightning_alphaedit.strategy.EditingDDPStrategy} (see configs/cluster/ddp.yaml)"
            )
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "every rank must see the whole edit batch: set trainer.use_distributed_sampler: false "
                "(the edit stream shards its evaluation batches itself)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not isinstance(trainer.datamodule, EditStreamDataModule):
            raise RuntimeError("NullSpaceUpdate needs an EditStreamDataModule passed to trainer.fit(datamodule=...)")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise RuntimeError("edit epochs serve successive chunks: set Trainer(reload_dataloaders_every_n_epochs=1)")
        # a resumed run: what decides the edits must be the checkpoint's, before any statistics
        self._edit_settings = edit_settings(self, pl_module, trainer.datamodule)
        if self._restored and "settings" in self._restored:
            check_edit_settings(self._restored["settings"], self._edit_settings)
        targets = pl_module.targets
        if self.layers[-1] >= targets.num_layers:
            raise ValueError(f"edited layer {self.layers[-1]} does not exist: the model has {targets.num_layers} layers")
        self.collective = Collective()
        pl_module.prepare_editing(self.layers[-1], optimize_values=self.method != "ft", collective=self.collective)
        device = pl_module.device
        with timed(self.timing, "statistics", device, announce=f"key statistics of layers {self.layers}"):  # cached or collected
            self.corpus = load_corpus(self.statistics.corpus, self.statistics.text_field, self.statistics.cache_dir)
            moments = {} if self.method == "ft" else layer_statistics(  # fine-tuning needs no C0
                pl_module.lm, pl_module.tokenizer, targets, self.layers, self.statistics,
                pl_module.lm_config.identity, self.corpus, self.collective,
            )
        with timed(self.timing, "projector", device, announce=f"{self.label} projectors"):
            self.editor = SequentialEditor(
                targets, self.layers, moments, method=self.method, l2=self.l2,
                nullspace_threshold=self.nullspace_threshold, mom2_weight=self.mom2_weight,
                nullspace_rule=self.nullspace_rule, projection=self.projection, rect_fraction=self.rect_fraction,
                collective=self.collective, max_update_ratio=self.max_update_ratio,
                leakage_weight=self.leakage_weight, refresh_every=self.refresh_every,
            )
        self.original_weights = {l: targets.weight(l).detach().to("cpu", copy=True) for l in self.layers}
        if self.norm_anchor.enabled:  # on the unedited model (a resumed run's edits come back later)
            with timed(self.timing, "norm_anchor", device):
                self.anchor = self.collective.run_on_zero(lambda: self._calibrate_anchor(trainer, pl_module))
            log.info("norm anchor %.4g", self.anchor)
            for logger in trainer.loggers:
                logger.log_metrics({"norm_anchor/anchor": self.anchor}, step=0)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                # charts of every validation figure against the number of edits, not the step
                logger.experiment.define_metric("val/edits")
                logger.experiment.define_metric("val/*", step_metric="val/edits")
        if self.editor.null_spaces:
            ranks = {f"nullspace/rank_layer{l}": float(s.rank) for l, s in self.editor.null_spaces.items()}
            log.info("null-space ranks %s of %d directions", ranks, targets.key_size(self.layers[0]))
            for logger in trainer.loggers:
                logger.log_metrics(ranks, step=0)
        if self._restored is not None:  # here, not at train start: a finished stream has no training batches
            self._resume(trainer, pl_module)

    def _calibrate_anchor(self, trainer: pl.Trainer, pl_module) -> float:
        stream = trainer.datamodule
        lm, tokenizer, targets, layer = pl_module.lm, pl_module.tokenizer, pl_module.targets, self.layers[-1]
        requests = calibration_requests(self.norm_anchor, stream.source, stream.format, tokenizer)
        key = calibration_key(
            pl_module.lm_config.identity, model_fingerprint(lm, targets, layer), self.layers, pl_module.values,
            pl_module.context_templates, requests, self.norm_anchor,
        )
        return cached_anchor(key, self.statistics.cache_dir, lambda: calibrate_anchor(
            lm, tokenizer, targets, requests, layer, pl_module.context_templates, pl_module.values,
            self.norm_anchor.drop_fraction, pl_module.chat_templates or False,
        )[0])

    def _anchored(self, pl_module, outputs) -> torch.Tensor:
        """This rank's target values rescaled to the anchor; skipped edits recorded."""
        result, share = outputs["values"], outputs["share"]
        mlp_values = projection_outputs(pl_module.lm, pl_module.tokenizer, pl_module.targets, share, self.layers[-1])
        anchored, skipped = anchor_targets(
            result.targets, result.initial, mlp_values, self.anchor, self.norm_anchor.skip_factor
        )
        skipped = self.collective.gather_rows(skipped.float().unsqueeze(1)).squeeze(1) > 0.5  # (u,) the whole batch
        self.anchor_skipped.extend(r.case_id for r, s in zip(outputs["requests"], skipped.tolist()) if s)
        pl_module.log("edit/anchor_skipped", float(skipped.sum()), batch_size=len(outputs["requests"]))
        return anchored

    @property
    def label(self) -> str:
        """The method as runs and tables name it (``memit+null_space``, ...)."""
        return method_label(self.method, self.projection)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # A fresh run measures its baseline now, on the unedited weights (a resumed run has its
        # baseline and its edits back since on_fit_start).
        if self.baseline:
            stream = trainer.datamodule
            generation = " with generation" if pl_module.evaluation.generation else ""
            with timed(self.timing, "baseline", pl_module.device,
                       announce=f"unedited baseline on {len(stream.requests)} requests{generation}"):
                pl_module.measure_baseline(stream.requests, stream.eval_batch_size,
                                           progress=trainer.progress_bar_callback is not None)
        # Strategies that restore checkpoints after on_fit_start bring the edits back here.
        if self._restored is not None:
            self._restore(self._restored, pl_module)
            self._restored = None

    def _resume(self, trainer: pl.Trainer, pl_module) -> None:
        """A resumed run gets its edits back, whatever is left of its stream (maybe nothing).

        The baseline belongs to the unedited weights: measured first if the checkpoint has none.
        """
        if self.baseline:
            with timed(self.timing, "baseline", pl_module.device):
                stream = trainer.datamodule
                pl_module.measure_baseline(stream.requests, stream.eval_batch_size)
        self._restore(self._restored, pl_module)
        self._restored = None

    def _restore(self, state: dict, pl_module) -> None:
        if "settings" in state:  # strategies that restore after on_fit_start are checked here
            check_edit_settings(state["settings"], self._edit_settings)
        self.editor.load_state_dict(state["editor"])
        with torch.no_grad():
            for layer in self.layers:
                pl_module.targets.weight(layer).copy_(state["weights"][str(layer)])
        self.edits_applied = state["edits_applied"]
        self.applied_requests = [EditRequest.from_dict(r) for r in state["applied_requests"]]
        self.rejected = list(state["rejected"])
        self.anchor_skipped = list(state.get("anchor_skipped", []))
        for phase, seconds in state.get("timing", {}).items():  # earlier sessions of this run
            self.timing[phase] = self.timing.get(phase, 0.0) + seconds

    # --- after every training step: the update -----------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # the batch's rows on every rank: each rank computed its share
        requests, share, gather = outputs["requests"], outputs["share"], self.collective.gather_rows
        if self.method == "ft":
            lm, tokenizer, targets = pl_module.lm, pl_module.tokenizer, pl_module.targets
            tuned = []
            outcome = self.editor.apply_finetuning(
                lambda: tuned.append(finetune(lm, tokenizer, targets, requests, self.layers, self.finetune))
            )
            if tuned:
                pl_module.log("edit/finetune_loss", tuned[0].loss, batch_size=len(requests))
        else:
            values = outputs["targets"]
            if self.anchor is not None and outputs["values"] is not None:
                values = self._anchored(pl_module, outputs)
            values = gather(values)
            reader = pl_module.key_reader(share, frozen_below=min(self.layers))  # only edited layers change
            outcome = self.editor.apply_batch(
                values,
                keys_at=lambda layer: gather(reader.keys(layer)),
                current_values=lambda: gather(reader.values(pl_module.edit_layer)),
                watch=self._watch if self.watchers else None,
                all_keys_at=lambda layers: {at: gather(k) for at, k in reader.keys(layers).items()},
            )
        self.last_batch = EditedBatch(
            list(requests), outcome.applied, dict(outcome.delta_norms) if outcome.applied else {},
            None if self.method == "ft" else values,
        )
        reached = self._targets_reached(outputs["values"], len(requests), pl_module)
        trainer.datamodule.advance(len(requests))
        for phase, seconds in {**outputs["seconds"], **outcome.seconds}.items():
            self.timing[phase] = self.timing.get(phase, 0.0) + seconds
            pl_module.log(f"time/{phase}", seconds, batch_size=len(requests))
        if outcome.applied:
            self.edits_applied += len(requests)
            self.applied_requests.extend(requests)
            for layer, norm in outcome.delta_norms.items():
                pl_module.log(f"edit/delta_norm_layer{layer}", norm, batch_size=len(requests))
            self._warn_if_unchanged(outcome, reached, batch_idx, pl_module)
        else:
            self.rejected.append({"case_ids": [r.case_id for r in requests], "reason": outcome.reason})
            log.warning("edit batch %d rejected and rolled back: %s", batch_idx, outcome.reason)
            if self.on_rejected == "stop":
                trainer.should_stop = True
        pl_module.log("edit/edits_applied", float(self.edits_applied), batch_size=len(requests))
        pl_module.log("edit/batches_rejected", float(len(self.rejected)), batch_size=len(requests))
        seconds = time.perf_counter() - self._batch_started
        pl_module.log("edit/batch_seconds", seconds, batch_size=len(requests))
        result = outputs["values"]
        loss = (
            f"value loss {float(result.loss.mean()):.3f} after {float(result.steps.float().mean()):.1f} steps, "
            f"{reached['reached']} of {len(requests)} targets reached"
            if result is not None else "fine-tuned"
        )
        rank_zero_info(
            f"edit batch of {len(requests)}: {'applied' if outcome.applied else 'REJECTED'}, {loss}, {seconds:.1f} s "
            f"({', '.join(f'{k} {v:.1f}' for k, v in {**outputs['seconds'], **outcome.seconds}.items())}); "
            f"{self.edits_applied} of {len(trainer.datamodule.requests)} edits applied"
        )

    def _targets_reached(self, result, size: int, pl_module) -> dict[str, int]:
        """Over the whole batch (every rank's share): requests whose new target the value step made
        the argmax at every target position (``reached``), and those whose z* is exactly z0 (``unmoved``)."""
        if self.method == "ft":
            return {}
        counts = torch.zeros(2, dtype=torch.long, device=pl_module.device)
        if result is not None:
            counts[0] = result.reached.sum()
            counts[1] = (result.targets == result.initial).all(dim=1).sum()
        reached, unmoved = self.collective.sum_(counts).tolist()
        pl_module.log("edit/targets_reached", float(reached), batch_size=size)
        return {"reached": reached, "unmoved": unmoved, "size": size}

    def _warn_if_unchanged(self, outcome, reached: dict[str, int], batch_idx: int, pl_module) -> None:
        """An applied batch that changed nothing (z* = z0 for every request, or an update below
        ``NO_CHANGE`` x ||W|| at every layer) is said so: it counts as applied, but edits nothing."""
        targets = pl_module.targets
        ratios = {
            layer: norm / max(float(targets.linear_weight(layer).detach().float().norm()), 1e-30)
            for layer, norm in outcome.delta_norms.items()
        }
        unmoved = bool(reached) and reached["unmoved"] == reached["size"]
        if unmoved or (ratios and max(ratios.values()) < NO_CHANGE):
            log.warning(
                "edit batch %d changed nothing: %s (check model.values.lr and the value step)", batch_idx,
                "the value step left every target value z* equal to z0" if unmoved
                else f"the update's norm is below {NO_CHANGE:g} x the weight's at every layer ({ratios})",
            )

    def _watch(self, layer: int, change: torch.Tensor) -> None:
        for watcher in self.watchers:
            watcher(layer, change)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.datamodule.exhausted:
            trainer.should_stop = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # the x axis of every validation figure
            pl_module.log("val/edits", float(self.edits_applied), sync_dist=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.anchor is not None and trainer.is_global_zero:
            for logger in trainer.loggers:  # the skipped case ids beside the run in W&B
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary["norm_anchor/skipped"] = list(self.anchor_skipped)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.apply_restored_edits(pl_module)

    def apply_restored_edits(self, pl_module) -> None:
        """A resumed run whose stream was already finished trains nothing: its checkpoint's edits
        are put back here (at the latest at fit end, before anything exports them). Idempotent."""
        if self._restored is not None and self.editor is not None:
            self._restore(self._restored, pl_module)
            self._restored = None

    @contextmanager
    def unedited(self, pl_module) -> Iterator[None]:
        """Inside, the edited layers hold their original weights (a resumed run's edits are back
        from fit start on, and a monitor's reference belongs to the unedited model)."""
        targets = pl_module.targets
        current = {l: targets.weight(l).detach().clone() for l in self.original_weights}
        with torch.no_grad():
            for layer, weight in self.original_weights.items():
                targets.weight(layer).copy_(weight)
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, weight in current.items():
                    targets.weight(layer).copy_(weight)

    @property
    def failure(self) -> str | None:
        """Why the run did not do what it was asked (the command then exits non-zero), or None."""
        if not self.rejected:
            return None
        if self.edits_applied == 0:
            return f"all {len(self.rejected)} edit batches were rejected: nothing was edited"
        if self.on_rejected == "stop":
            return f"stopped at a rejected edit batch (on_rejected: stop) after {self.edits_applied} edits"
        return None

    def deltas(self, pl_module) -> dict[str, torch.Tensor]:
        """Edited minus original weight of each edited parameter, in the parameter's layout."""
        targets = pl_module.targets
        return {
            targets.weight_name(l): targets.weight(l).detach().cpu().float() - self.original_weights[l].float()
            for l in self.layers
        }

    # --- checkpoint state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.editor is None:
            return {}
        targets = self.editor.targets
        return {
            "editor": self.editor.state_dict(),
            "weights": {str(l): targets.weight(l).detach().to("cpu", copy=True) for l in self.layers},
            "edits_applied": self.edits_applied,
            "applied_requests": [r.to_dict() for r in self.applied_requests],
            "rejected": list(self.rejected),
            "timing": dict(self.timing),
            "settings": dict(self._edit_settings),
            "anchor_skipped": list(self.anchor_skipped),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None
        # older checkpoints kept the validation history in the edit state: EditHistory takes it from here
        self.history_in_checkpoint = list((state_dict or {}).get("history", []))
