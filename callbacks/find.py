"""``find_callback``: how one callback reaches another's public interface."""

from __future__ import annotations

from typing import TypeVar

import pytorch_lightning as pl

C = TypeVar("C", bound=pl.Callback)


def find_callback(trainer: pl.Trainer, kind: type[C]) -> C | None:
    """The trainer's first callback of type ``kind``, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def require_callback(trainer: pl.Trainer, kind: type[C], needed_by: str) -> C:
    """The trainer's callback of type ``kind``; a clear error when ``needed_by`` runs without it."""
    found = find_callback(trainer, kind)
    if found is None:
        raise RuntimeError(f"{needed_by} needs the {kind.__name__} callback: add it to Trainer(callbacks=[...])")
    return found
