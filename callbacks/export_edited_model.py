"""``ExportEditedModel``: the edited model as a ``save_pretrained`` folder at the end of fit.

Beside the model it writes the deltas of the edited weights and the applied edits
(`lightning_alphaedit.export`). The folder is checked when the run starts, before any
statistics or edit: export never deletes a file it did not write, and hours of editing must
not end in a refusal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from lightning_alphaedit.callbacks.find import require_callback
from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.export import base_model_source, check_export_target, export_edited_model
from lightning_alphaedit.run_folder import EDITED_MODEL, run_directory
from lightning_alphaedit.timing import format_seconds

log = logging.getLogger(__name__)


class ExportEditedModel(pl.Callback):
    """Saves the edited model with its deltas and applied edits at the end of fit (rank 0).

    Args:
        enabled: False: nothing is checked or exported (the CLI and ``edit()`` leave it out).
        dir: Where to save it; None = ``<run folder>/edited_model``. An existing folder must be
            empty or an earlier export holding only its own files (checked when the run starts).
    """

    def __init__(self, enabled: bool = True, dir: str | None = None) -> None:
        self.enabled, self.dir = enabled, dir
        self.exported_to: Path | None = None

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.dir) if self.dir else run_directory(trainer) / EDITED_MODEL

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        """Refuse, before any statistics or edit, an export folder the end of the run could not use."""
        if stage != "fit" or not self.enabled:
            return
        problem = None
        if trainer.is_global_zero:  # rank 0 exports; every rank stops with its answer
            try:
                check_export_target(self.folder(trainer), run_directory(trainer))
            except (ValueError, PermissionError) as error:
                problem = error
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem is not None:
            raise problem

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        update = require_callback(trainer, NullSpaceUpdate, "ExportEditedModel")
        update.apply_restored_edits(pl_module)  # a resumed finished run: its edits, before writing them
        if not trainer.is_global_zero or update.editor is None:
            return
        directory = self.folder(trainer)
        rank_zero_info(f"writing the edited model to {directory} ...")
        started = time.perf_counter()
        self.exported_to = export_edited_model(
            directory, pl_module.lm, pl_module.tokenizer, update.deltas(pl_module), update.applied_requests,
            summary={
                "method": update.method, "layers": update.layers, "edits_applied": update.edits_applied,
                "batches_rejected": update.rejected, "l2": update.l2, "nullspace_threshold": update.nullspace_threshold,
                "nullspace_rule": update.nullspace_rule, "projection": update.projection,
                "rect_fraction": update.rect_fraction, "finetune": asdict(update.finetune),
                "mom2_weight": update.mom2_weight, "statistics": asdict(update.statistics),
                "leakage_weight": update.leakage_weight, "refresh_every": update.refresh_every,
                "model": pl_module.lm_config.identity, "base_model": base_model_source(pl_module.lm_config),
            },
            run_dir=run_directory(trainer),
        )
        rank_zero_info(f"writing the edited model: done in {format_seconds(time.perf_counter() - started)}")
        log.info("edited model written to %s", self.exported_to)
