"""The layout of a run's own folder: where a run writes what (one place for every writer)."""

from __future__ import annotations

from pathlib import Path

HISTORY_FILE = "metrics.jsonl"
"""In the run folder: one JSON line per validation (edits applied, scores, drift)."""
RESULTS_FILE = "results.json"
"""In the run folder: the test-stage protocol, the unedited baseline and the history."""
EDITED_MODEL = "edited_model"
"""The edited model's folder inside a run folder (unless ``export.dir`` says otherwise)."""


def run_directory(trainer) -> Path:
    """The run's own folder: the logger's ``save_dir/name/version`` (where Lightning puts
    checkpoints), or ``default_root_dir`` without a logger."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    root = Path(logger.save_dir or trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return root / str(logger.name) / version
