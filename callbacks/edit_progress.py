"""The training progress bar, in the edit stream's terms.

Lightning's bar names an epoch "Epoch 2/-2" when the run has no epoch limit (an edit run stops
when its stream is exhausted). Here an epoch is the next chunk of the stream, so the bar says
"edit epoch 2 of 3"; the validation and test bars are Lightning's.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class EditProgressBar(TQDMProgressBar):
    """`TQDMProgressBar` whose training bar reads "edit epoch e of n" (n: the stream's chunks)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = getattr(trainer.datamodule, "num_epochs", None)
        epoch = trainer.current_epoch + 1
        self.train_progress_bar.set_description(f"edit epoch {epoch} of {total}" if total else f"edit epoch {epoch}")
