"""What a user sees: a tiny run written to a file says what it is doing, in order, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

PHASES = [
    "key statistics of layers [1, 2] ...",
    "key statistics of layers [1, 2]: done in",
    "alphaedit projectors ...",
    "alphaedit projectors: done in",
    "drift reference on 16 held-out texts ...",
    "drift reference on 16 held-out texts: done in",
    "unedited baseline on 8 requests with generation ...",
    "unedited baseline on 8 requests with generation: done in",
    "edit batch of 4: applied",
    "8 of 8 edits applied",
    "validation after 8 edits ...",
    "validation after 8 edits: done in",
    "writing the edited model to ",
    "writing the edited model: done in",
    "test on 8 edited requests with generation ...",
    "test on 8 edited requests: done in",
    "edits applied: 8, batches rejected: 0",
    "run folder:",
]
"""Lines of the log, in the order the run reaches them."""

NOISE = ["💡", "litlogger", "litmodels", "LitServe", "weights_only"]
"""Lightning's advertisements and its note about how our own checkpoint is saved."""


def test_a_run_logged_to_a_file_shows_every_phase_in_order_without_noise(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as sink:  # not a terminal: what a SLURM job or `> run.log` gets
        subprocess.run(
            [sys.executable, "-m", "lightning_alphaedit", "fit", "--config", str(TINY), "--data.limit", "8"],
            stdout=sink, stderr=subprocess.STDOUT, check=True, timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
    text = log.read_text()
    positions = []
    for phase in PHASES:
        assert phase in text, f"{phase!r} missing from the log:\n{text}"
        positions.append(text.index(phase, positions[-1] if positions else 0))
    assert positions == sorted(positions)
    # stdout (the table) and stderr (the phase lines) share the file in the order they were written
    assert text.index("edits applied: 8") > text.index("test on 8 edited requests: done in")
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the log:\n{text}"
