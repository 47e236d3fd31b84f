"""Where a run writes, and the edited model it leaves behind (loadable by plain transformers)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_alphaedit.requests import EditRequest, write_jsonl

DELTAS_FILE = "alphaedit_deltas.safetensors"
EDITS_FILE = "alphaedit_edits.jsonl"
HISTORY_FILE = "metrics.jsonl"
"""In the run folder: one JSON line per validation (edits applied, scores, drift)."""
RESULTS_FILE = "results.json"
"""In the run folder: the test-stage protocol, the unedited baseline and the history."""
SUMMARY_FILE = "alphaedit_summary.json"
"""In the edited model's folder: the method, its settings and the base model it was made from."""
EDITED_MODEL = "edited_model"
"""The edited model's folder inside a run folder (unless ``edit.export_dir`` says otherwise)."""


def base_model_source(config) -> dict:
    """Where the unedited model comes from (a ``ModelConfig``'s loading fields): a registry
    name, hub id or folder with its revision, or the tiny random model's own config."""
    name = config.name_or_path
    if name is not None and Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())  # a folder: absolute, to be found from anywhere
    return {
        "name_or_path": name, "revision": config.revision, "gguf_file": config.gguf_file, "dtype": config.dtype,
        "tiny": asdict(config.tiny) if name is None and config.tiny is not None else None,
    }


def run_directory(trainer) -> Path:
    """The run's own folder: the logger's ``save_dir/name/version`` (where Lightning puts
    checkpoints), or ``default_root_dir`` without a logger."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    root = Path(logger.save_dir or trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return root / str(logger.name) / version


def export_edited_model(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer,
    deltas: Mapping[str, torch.Tensor],
    applied: Sequence[EditRequest],
    summary: Mapping,
) -> Path:
    """Write ``save_pretrained`` output plus the deltas of the edited weights and the applied edits.

    ``deltas`` maps parameter names to (edited - original) in the parameter's own layout,
    so ``param += delta`` re-applies the edit to the original model. The folder appears
    atomically: it is written beside the target and renamed into place.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_file(
            {name: d.detach().to("cpu").contiguous() for name, d in deltas.items()},
            str(staging / DELTAS_FILE),
            metadata={"parameters": json.dumps(sorted(deltas))},
        )
        write_jsonl(list(applied), staging / EDITS_FILE)
        (staging / SUMMARY_FILE).write_text(json.dumps(dict(summary), indent=2, default=str))
        if target.exists():  # an earlier export of this same run (a resumed run): replace it
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
