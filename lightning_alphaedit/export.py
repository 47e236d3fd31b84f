"""The edited model a run leaves behind (loadable by plain transformers), and the checks that
keep an export from replacing anyone's files."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file

from lightning_alphaedit.paths import current_umask, fresh_directory, write_text_atomic
from lightning_alphaedit.requests import EditRequest, write_jsonl

DELTAS_FILE = "alphaedit_deltas.safetensors"
EDITS_FILE = "alphaedit_edits.jsonl"
SUMMARY_FILE = "alphaedit_summary.json"
"""In an export: the method, its settings, the base model it was made from and the files it
wrote (what marks a folder as an export)."""


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


def check_export_target(directory: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """Refuse an export folder the export would have to delete files from, or could not write.

    Export writes a fresh folder and renames it into place. The one folder it replaces is an
    earlier export of this framework (it holds the summary file) holding nothing but the files
    that export wrote; anything else there, or the run folder itself, belongs to someone else.
    Called at fit start, before any statistics or edit, and again just before writing.
    """
    target = Path(directory).expanduser().absolute()
    if run_dir is not None:
        run = Path(run_dir).expanduser().absolute()
        if target == run or target in run.parents:
            raise ValueError(
                f"export folder {target} holds the run folder {run} (its checkpoints, config and metrics): "
                "choose another --export.dir, e.g. the default <run folder>/edited_model"
            )
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise ValueError(f"export folder {target} exists and is not a folder (a file or a link): choose another --export.dir")
        entries = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
        if entries:
            foreign = _not_written_by_export(target, entries)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ValueError(
                    f"export folder {target} is not empty and holds files an export of lightning-alphaedit did not "
                    f"write ({shown}); exporting would replace them. Choose a new or empty --export.dir"
                )
        writable = target
    else:
        writable = next(p for p in target.parents if p.exists())
    for folder in dict.fromkeys((writable, target.parent)):
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write the edited model to {target}: {folder} is not writable")
    return target


def _not_written_by_export(target: Path, entries: list[str]) -> list[str]:
    """The entries of an existing folder that no earlier export wrote (all of them if it is not one)."""
    summary = target / SUMMARY_FILE
    if not summary.is_file():
        return entries
    try:
        written = json.loads(summary.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return entries
    if not isinstance(written, list):  # no list of what it wrote: nothing in it is known to be an export's
        return entries
    allowed = set(written) | {str(parent.as_posix()) for f in written for parent in PurePosixPath(f).parents}
    return [e for e in entries if e not in allowed]


def export_edited_model(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer,
    deltas: Mapping[str, torch.Tensor],
    applied: Sequence[EditRequest],
    summary: Mapping,
    run_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``save_pretrained`` output plus the deltas of the edited weights and the applied edits.

    ``deltas`` maps parameter names to (edited - original) in the parameter's own layout,
    so ``param += delta`` re-applies the edit to the original model. The folder appears
    atomically: it is written beside the target and renamed into place. It only ever replaces
    an earlier export (see `check_export_target`); the summary lists the files it wrote.
    """
    target = check_export_target(directory, run_dir)
    staging = fresh_directory(target.parent, prefix=f".{target.name}.")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_file(
            {name: d.detach().to("cpu").contiguous() for name, d in deltas.items()},
            str(staging / DELTAS_FILE),
            metadata={"parameters": json.dumps(sorted(deltas))},
        )
        write_jsonl(list(applied), staging / EDITS_FILE)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if not p.is_dir())
        summary = dict(summary) | {"files": sorted([*files, SUMMARY_FILE])}
        write_text_atomic(staging / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
        mask = current_umask()  # safetensors writes 0600: the export follows the umask, as open() would
        for path in staging.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        if target.exists():  # an earlier export (a resumed run): moved aside whole, then removed
            old = fresh_directory(target.parent, prefix=f".{target.name}.old.")
            os.replace(target, old)  # renames onto the empty folder made for it
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
