"""``EditCheckpoint``: ``<run folder>/checkpoints/last.ckpt`` after every edit epoch, atomically.

Lightning's ModelCheckpoint counts optimizer steps, and an edit step takes none, so it would
not save between epochs. The checkpoint holds every callback's state (the edit state of
`NullSpaceUpdate`, the history, ...) and the module's; resume with ``--ckpt_path``.
"""

from __future__ import annotations

import os

import pytorch_lightning as pl

from lightning_alphaedit.callbacks.find import require_callback
from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.run_folder import run_directory


class EditCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` after every edit epoch; a crash while writing leaves the previous one.

    Args:
        enabled: False: writes nothing (the CLI and ``edit()`` leave it out); a crashed run cannot
            be resumed.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.checkpoint_path = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        if require_callback(trainer, NullSpaceUpdate, "EditCheckpoint").editor is None:
            return  # nothing edited yet
        directory = run_directory(trainer) / "checkpoints"
        partial = directory / ".last.ckpt.partial"
        trainer.save_checkpoint(partial, weights_only=False)  # every rank takes part, rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, directory / "last.ckpt")
            self.checkpoint_path = directory / "last.ckpt"
        trainer.strategy.barrier()
