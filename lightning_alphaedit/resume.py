"""Resuming a run: what its checkpoint must agree on with the settings given now.

A checkpoint holds edits made with certain settings (the layers, the method and its λ, the
null-space rule, the value step, the statistics, the model, the batch size) on a certain edit
stream. Going on with other settings would mix two different edits in one model without a
word, so the run refuses, before any statistics are collected, naming each setting with the
checkpoint's and this run's value. Settings that only change what is measured (evaluation,
drift, export) may differ: this run's value is used, and the log says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

VALUE_SETTINGS_OUTSIDE_THE_EDIT = ("requests_per_pass", "reuse_lower_layers", "prefix_cache")
"""Value-step options that change its cost, not its result."""
STATISTICS_SETTINGS = ("corpus", "text_field", "sample_count", "max_length", "dtype")
"""The statistics options that decide C0 (the others: where it is cached, how it is shown)."""


class NotACheckpoint(ValueError):
    """A ``ckpt_path`` that is not a checkpoint written by this framework."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, loaded with ``weights_only=True``; refuses, with a message that
    says so, a file that is not one of this framework's checkpoints (never suggesting an unsafe load)."""
    path = Path(path)
    if not path.is_file():
        raise NotACheckpoint(f"ckpt_path {path} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch's message suggests weights_only=False: not repeated here
        raise NotACheckpoint(
            f"ckpt_path {path} is not a lightning-alphaedit checkpoint: it cannot be read as a checkpoint "
            f"of plain tensors and data ({type(error).__name__}). Resume from the checkpoints/last.ckpt "
            "that a run wrote in its run folder."
        ) from None
    ours = isinstance(checkpoint, dict) and "context_templates" in checkpoint and any(
        str(key).startswith("NullSpaceUpdate") for key in checkpoint.get("callbacks", {})
    )
    if not ours:
        raise NotACheckpoint(
            f"ckpt_path {path} is a torch file but not a lightning-alphaedit checkpoint (it holds no edit state). "
            "Resume from the checkpoints/last.ckpt that a run wrote in its run folder."
        )
    return checkpoint


def edit_settings(update, module, data) -> dict[str, Any]:
    """The settings that decide the edits (``NullSpaceUpdate``, ``AlphaEditModule``, the edit
    stream), by their command-line names, as plain values a checkpoint can hold."""
    settings: dict[str, Any] = {
        "model.lm": module.lm_config.identity,
        "model.lm.dtype": module.lm_config.dtype,
        "data.batch_size": data.batch_size,
        "edit.layers": list(update.layers),
        "edit.method": update.method,
        "edit.projection": update.projection,
        "edit.l2": update.l2,
        "edit.nullspace_rule": update.nullspace_rule,
        "edit.nullspace_threshold": update.nullspace_threshold,
        "edit.mom2_weight": update.mom2_weight,
        "edit.rect_fraction": update.rect_fraction,
        "edit.max_update_ratio": update.max_update_ratio,
        "edit.leakage_weight": update.leakage_weight,
        "edit.refresh_every": update.refresh_every,
    }
    settings.update({f"edit.statistics.{k}": getattr(update.statistics, k) for k in STATISTICS_SETTINGS})
    settings.update({f"edit.norm_anchor.{k}": v for k, v in asdict(update.norm_anchor).items()})
    if update.method == "ft":
        settings.update({f"edit.finetune.{k}": v for k, v in asdict(update.finetune).items()})
    else:
        settings.update({
            f"model.values.{k}": v for k, v in asdict(module.values).items() if k not in VALUE_SETTINGS_OUTSIDE_THE_EDIT
        })
    return settings


def check_edit_settings(stored: Mapping[str, Any], current: Mapping[str, Any], source: str = "the checkpoint") -> None:
    """Refuses a resumed run whose edit-deciding settings differ from its checkpoint's, naming
    each with both values. A setting only one side knows (another version) is not compared."""
    changed = [name for name in current if name in stored and stored[name] != current[name]]
    if changed:
        lines = "\n".join(f"  {name}: {stored[name]!r} in {source}, {current[name]!r} in this run" for name in changed)
        raise ValueError(
            f"this run's settings differ from {source}'s in what decides the edits:\n{lines}\n"
            "Resume with the checkpoint's settings, or start a new run without --ckpt_path."
        )


def report_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str, checkpoint_wins: tuple[str, ...] = ()
) -> list[str]:
    """Logs each setting under ``prefix`` whose value differs between the checkpoint (``stored``)
    and this run (``current``), and which value is used: this run's, except under the names in
    ``checkpoint_wins`` (restored from the checkpoint). Returns their names."""
    names = []
    for key in sorted(set(stored) & set(current)):
        old, new = stored[key], current[key]
        name = f"{prefix}.{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            names += report_differences(old, new, name, checkpoint_wins)
        elif old != new:
            names.append(name)
            winner = "the checkpoint's" if name.startswith(checkpoint_wins) else "this run's"
            log.warning("resuming: %s is %r in the checkpoint, %r in this run: %s value is used", name, old, new, winner)
    return names
