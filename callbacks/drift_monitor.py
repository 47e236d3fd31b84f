"""``DriftMonitor``: how far the edited model has moved from the unedited one on held-out text.

At fit start (on rank 0) it records what the unedited model computes on held-out documents of
the statistics corpus (`lightning_alphaedit.drift.DriftReference`); after every edit epoch's
validation and at test it logs the ``drift/*`` figures against that reference. With ``health``
it also logs, after every batch, the per-layer health figures of a long stream
(`lightning_alphaedit.health`): their leakage is measured on the same held-out keys, which is
why they live here.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from lightning_alphaedit.callbacks.find import require_callback
from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.corpus import Corpus
from lightning_alphaedit.drift import DriftConfig, DriftReference
from lightning_alphaedit.health import BatchHealth
from lightning_alphaedit.timing import timed

log = logging.getLogger(__name__)


class DriftMonitor(pl.Callback):
    """Drift from the unedited model on held-out text (and, optionally, per-batch health figures).

    Needs `NullSpaceUpdate`, listed before it in the callbacks. The reference is taken on the
    unedited weights even in a resumed run (`NullSpaceUpdate.unedited`).

    Args:
        texts: How many held-out documents (0 turns drift off). They come after the statistics
            sample in the statistics corpus, so no preserved key the projector was built from is reused.
        max_length: Tokens per document (longer ones are truncated).
        top_k: Next-token probabilities stored per position for the KL (plus one bucket for the rest).
        batch_size: Documents per forward pass.
        health: Log per edited layer after every batch ``health/weight_ratio_layer{l}`` (‖W_t‖ / ‖W_0‖),
            ``health/delta_norm_layer{l}`` (‖Δ‖), ``health/leakage_layer{l}`` (‖Δ k0‖ / ‖W_0 k0‖ on the
            held-out keys) and ``health/target_norm`` (mean ‖z*‖); validations record them too.
    """

    def __init__(
        self,
        texts: int = DriftConfig.texts,
        max_length: int = DriftConfig.max_length,
        top_k: int = DriftConfig.top_k,
        batch_size: int = DriftConfig.batch_size,
        health: bool = False,
    ) -> None:
        self.config = DriftConfig(texts=texts, max_length=max_length, top_k=top_k, batch_size=batch_size)
        self.health = health
        self.reference: DriftReference | None = None  # rank 0's, built at fit start
        self.test_figures: dict[str, float] = {}  # the drift at test, without prefix (EditHistory reads it)
        self._batch_health: BatchHealth | None = None
        self._original_norms: dict[int, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        update = require_callback(trainer, NullSpaceUpdate, "DriftMonitor")
        if update.editor is None:
            raise RuntimeError("DriftMonitor must come after NullSpaceUpdate in the callbacks (it needs its corpus)")
        self._original_norms = {l: float(w.float().norm()) for l, w in update.original_weights.items()}
        if self.config.texts and update.collective.is_zero:  # measured once, on rank 0 (_log_drift)
            held_out = self._held_out_texts(update.corpus, update.statistics.sample_count)
            with timed(update.timing, "drift_reference", pl_module.device,
                       announce=f"drift reference on {len(held_out)} held-out texts"), update.unedited(pl_module):
                self.reference = DriftReference(pl_module.targets, pl_module.tokenizer, update.layers, held_out, self.config)
        if self.health and update.method != "ft":
            update.watchers.append(self._watch)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.define_metric("val/edits")
                logger.experiment.define_metric("drift/*", step_metric="val/edits")

    def _held_out_texts(self, corpus: Corpus, used: int) -> list[str]:
        """Drift texts: the corpus documents after the statistics sample (never in C0)."""
        count = self.config.texts
        held_out = list(corpus.texts[used : used + count])
        if len(held_out) < count:
            held_out = list(corpus.texts[-count:])
            log.warning(
                "corpus %s has %d documents, the statistics use %d: drift is measured on its last %d, "
                "which the statistics also saw", corpus.identity, len(corpus.texts), used, len(held_out),
            )
        return held_out

    # --- after every batch: health ------------------------------------------------------------

    def _watch(self, layer, change) -> None:
        if self._batch_health is not None:
            self._batch_health.watch(layer, change)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.health:
            update = require_callback(trainer, NullSpaceUpdate, "DriftMonitor")
            self._batch_health = BatchHealth(pl_module.targets, update.layers, self._original_norms, self.reference)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        update = require_callback(trainer, NullSpaceUpdate, "DriftMonitor")
        edited = update.last_batch
        if not self.health or update.method == "ft" or edited is None or not edited.applied:
            return
        for name, value in self._batch_health.figures(edited.delta_norms, edited.values).items():
            pl_module.log(name, value, batch_size=len(edited.requests))

    # --- validation and test: drift -------------------------------------------------------------

    def _log_drift(self, trainer: pl.Trainer, pl_module, prefix: str) -> dict[str, float]:
        # rank 0 holds the reference and measures; every rank logs the same numbers
        collective = require_callback(trainer, NullSpaceUpdate, "DriftMonitor").collective
        drift = collective.run_on_zero(self.reference.measure if self.reference is not None else dict)
        for name, value in drift.items():
            pl_module.log(f"{prefix}{name}", value, sync_dist=True)
        return drift

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log_drift(trainer, pl_module, "drift/")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.test_figures = self._log_drift(trainer, pl_module, "test/drift/")
