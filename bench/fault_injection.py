"""Fault injection: kill a run at random moments, resume it, and check nothing was lost.

    python bench/fault_injection.py --n 10 --seed 0

One uninterrupted `lightning-alphaedit fit` of the tiny config gives the reference deltas
(and how long the editing part takes: from its first edit batch to its end). Then N times:
the same run in its own process group, killed with SIGKILL at a seeded random moment, and
resumed with ``--ckpt_path .../last.ckpt`` (started again when the kill came before the first
checkpoint), into the same export folder. A fifth of the kills fall anywhere from start-up to
the first edit (statistics, drift reference, baseline); the others fall after the killed
run's own first edit batch, anywhere up to the end (an edit, a validation, a checkpoint
write, the test, the export), so the moment follows the run's progress, not the machine's load.
Each resumed run must exit 0, report every edit in its results.json, and export the same
deltas as the reference (bitwise, or within --tolerance). Kill moments are seeded; where a
moment falls in the run depends on the machine's speed, so each trial records how far the
checkpoint it resumed from had come. Writes ``summary.json`` and ``summary.md`` under --output.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_alphaedit.export import DELTAS_FILE
from lightning_alphaedit.run_folder import RESULTS_FILE
from lightning_alphaedit.paths import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def fit(folder: Path, cache: Path, config: Path, name: str, *extra: str) -> subprocess.Popen:
    """One CLI run in its own process group (so a kill takes its W&B helper with it)."""
    command = [sys.executable, "-m", "lightning_alphaedit", "fit", "--config", str(config),
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.id", name,
               "--export.dir", str(folder / "export"), *extra]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "LIGHTNING_ALPHAEDIT_RUNS": str(folder / "runs"), "LIGHTNING_ALPHAEDIT_CACHE": str(cache),
                        "WANDB_DIR": str(folder), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / f"{name}.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


FIRST_EDIT = "edit batch of"
"""What the run prints after each edit batch."""


def wait_for_first_edit(run: subprocess.Popen, log: Path) -> float | None:
    """Seconds until the run printed its first edit batch (None: it ended without one)."""
    started = time.perf_counter()
    while run.poll() is None:
        if log.exists() and FIRST_EDIT in log.read_text(errors="replace"):
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


def checkpoint_position(path: Path) -> int | None:
    """Requests of the stream the checkpoint had applied (it loads with weights_only=True)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return next(int(v["position"]) for v in state.values() if isinstance(v, dict) and "position" in v)


def compare(reference: dict[str, torch.Tensor], export: Path) -> tuple[bool, float]:
    deltas = load_file(export / DELTAS_FILE)
    assert deltas.keys() == reference.keys(), (sorted(deltas), sorted(reference))
    bitwise = all(torch.equal(deltas[k], reference[k]) for k in reference)
    return bitwise, max(float((deltas[k] - reference[k]).abs().max()) for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10, help="kills (each followed by a resume)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest |delta - reference| accepted")
    parser.add_argument("--output", type=Path, default=Path.home() / "lightning-alphaedit" / "bench" / "fault-injection")
    args = parser.parse_args()
    output, cache = args.output, args.output / "cache"

    # twice: the first fills the statistics cache, the second (timed as the killed runs will run)
    # is the reference, and the two must agree
    for name in ("cold", "reference"):
        started = time.perf_counter()
        run = fit(output / name, cache, args.config, name)
        first_edit = wait_for_first_edit(run, output / name / f"{name}.log")
        if run.wait() != 0 or first_edit is None:
            sys.exit(f"the uninterrupted run failed: see {output / name / (name + '.log')}")
        reference_seconds = time.perf_counter() - started
    reference = load_file(output / "reference" / "export" / DELTAS_FILE)
    bitwise, difference = compare(reference, output / "cold" / "export")
    edits = json.loads(next((output / "reference" / "runs").rglob(RESULTS_FILE)).read_text())["edits_applied"]
    print(f"uninterrupted run: {edits} edits in {reference_seconds:.1f} s, the first after {first_edit:.1f} s; a second one equal bitwise: {bitwise} "
          f"(max abs difference {difference:g})")

    rng = random.Random(args.seed)
    trials = []
    for trial in range(args.n):
        folder = output / f"trial{trial}"
        during_start = rng.random() < 0.2
        delay = rng.uniform(0.0, first_edit if during_start else reference_seconds - first_edit)
        killed = fit(folder, cache, args.config, "killed")
        after_edit = None if during_start else wait_for_first_edit(killed, folder / "killed.log")
        try:
            killed.wait(timeout=delay)
            was_killed = False  # it finished first: the resume starts from a finished run
        except subprocess.TimeoutExpired:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
            was_killed = True
        checkpoints = list((folder / "runs").rglob("checkpoints/last.ckpt"))
        position = checkpoint_position(checkpoints[0]) if checkpoints else None
        resume = ["--ckpt_path", str(checkpoints[0])] if checkpoints else []
        code = fit(folder, cache, args.config, "resumed", *resume).wait()
        record = {"trial": trial, "kill_after_seconds": round(delay, 2),
                  "counted_from": "start" if during_start else "first edit batch",
                  "first_edit_seconds": None if after_edit is None else round(after_edit, 1), "killed": was_killed,
                  "checkpoint_edits": position, "resumed_exit_code": code}
        results = list((folder / "runs").rglob(f"resumed/{RESULTS_FILE}"))
        if code == 0 and results and (folder / "export" / DELTAS_FILE).exists():
            reported = json.loads(results[0].read_text())
            bitwise, difference = compare(reference, folder / "export")
            record |= {"edits_reported": reported["edits_applied"], "requests_evaluated": reported["requests_evaluated"],
                       "bitwise_equal": bitwise, "max_abs_difference": difference}
        record["ok"] = (code == 0 and record.get("edits_reported") == edits and record.get("requests_evaluated") == edits
                        and record.get("max_abs_difference", float("inf")) <= args.tolerance)
        trials.append(record)
        print(json.dumps(record))

    passed = sum(t["ok"] for t in trials)
    summary = {"config": str(args.config), "seed": args.seed, "n": args.n, "edits": edits,
               "reference_seconds": round(reference_seconds, 1), "reference_first_edit_seconds": round(first_edit, 1),
               "reference_repeats_bitwise": bitwise,
               "passed": passed, "trials": trials}
    write_text_atomic(output / "summary.json", json.dumps(summary, indent=2))
    lines = [f"{passed} of {args.n} killed runs resumed to the uninterrupted run's {edits} edits "
             f"(deltas within {args.tolerance:g}; seed {args.seed}, {args.config.name}, uninterrupted run "
             f"{reference_seconds:.0f} s, first edit batch after {first_edit:.0f} s)", "",
             "| trial | killed after | checkpoint had | resumed exit | edits reported | bitwise equal | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for t in trials:
        moment = f"{t['kill_after_seconds']:.1f} s from {t['counted_from']}"
        lines.append(f"| {t['trial']} | {moment}{'' if t['killed'] else ' (finished first)'} | "
                     f"{'no checkpoint' if t['checkpoint_edits'] is None else str(t['checkpoint_edits']) + ' edits'} | "
                     f"{t['resumed_exit_code']} | {t.get('edits_reported', '-')} | {t.get('bitwise_equal', '-')} | "
                     f"{t.get('max_abs_difference', '-')} |")
    write_text_atomic(output / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if passed != args.n:
        sys.exit(f"{args.n - passed} of {args.n} resumed runs lost or changed edits: see {output / 'summary.json'}")


if __name__ == "__main__":
    main()
