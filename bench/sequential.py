"""Sequential editing benchmark: the unedited model, MEMIT and AlphaEdit on the same stream.

    python bench/sequential.py --n 100 --batch 10                 # the quick run
    python bench/sequential.py --n 1000 --batch 100 --epoch 200   # the long run

Each method is one `lightning-alphaedit fit` in its own process on the same config (the
SmolLM2 CounterFact setting by default: the first N cases of counterfact-edit.json in file
order, layers 4-8, the same value optimization), so times and memory are its own. The
unedited row is the baseline each run measures before its first edit. Writes, under
--output: each run's folder, ``summary.json`` (final figures, drift, timing breakdown, peak
memory, wall time, the command), ``summary.md`` (the table) and ``report/`` (the retention
curves of every figure against the number of edits, one line per method).

Run by hand from the repository root; needs ../shared/data (it says so when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lightning_alphaedit.paths import write_text_atomic
from lightning_alphaedit.report import report
from lightning_alphaedit.timing import EDIT_PHASES as PHASES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "bench" / "smollm2-counterfact30.yaml"
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
COLUMNS = ("efficacy", "generalization", "specificity", "generation_efficacy", "fluency",
           "drift/kl", "drift/hidden_shift", "drift/perplexity")


def run_method(label: str, args, output: Path) -> dict:
    """One CLI run; ``label`` is a method, or method+projection (``memit+null_space``)."""
    method, _, projection = label.partition("+")
    folder = output / label
    command = [
        sys.executable, "-m", "lightning_alphaedit", "fit", "--config", str(args.config),
        "--data.path", str(DATA), "--data.limit", str(args.n), "--data.batch_size", str(args.batch),
        "--data.edits_per_epoch", str(args.epoch or max(args.batch, args.n // 5)),
        "--edit.method", method, *(["--edit.projection", projection] if projection else []),
        "--trainer.enable_progress_bar", "false", *args.extra,
    ]
    # the configs put runs under $LIGHTNING_ALPHAEDIT_RUNS (their logger's folder follows it;
    # a --trainer.default_root_dir override would not move the logger's)
    environment = {**os.environ, "LIGHTNING_ALPHAEDIT_RUNS": str(folder)}
    print(f"\n=== {label}: LIGHTNING_ALPHAEDIT_RUNS={folder} {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=environment)
    wall = time.perf_counter() - started
    results_file = max(folder.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(results_file.read_text())
    results.update(wall_seconds=wall, command=f"LIGHTNING_ALPHAEDIT_RUNS={folder} {shlex.join(command)}",
                   folder=str(results_file.parent))
    return results


def row(label: str, figures: dict, results: dict | None) -> str:
    def cell(name: str) -> str:
        if name not in figures:
            return ""
        value = figures[name]
        if name == "drift/kl":
            return f"{value:.4f}"
        return f"{value:.2f}" if name.startswith("drift/") or name == "fluency" else f"{100 * value:.1f}"

    cells = [cell(c) for c in COLUMNS]
    if results is None:
        return f"| {label} | " + " | ".join(cells) + " | | | |"
    timing, n = results["timing_seconds"], max(results["edits_applied"], 1)
    per_request = sum(timing.get(p, 0.0) for p in PHASES) / n
    split = ", ".join(f"{p} {timing.get(p, 0.0) / n:.2f}" for p in PHASES)
    memory = results["memory"].get("device_peak_allocated_bytes", results["memory"]["process_peak_rss_bytes"])
    return (f"| {label} | " + " | ".join(cells)
            + f" | {per_request:.2f} s ({split}) | {results['wall_seconds'] / 60:.1f} min | {memory / 2**30:.2f} GiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="edits in the stream (first N cases in file order)")
    parser.add_argument("--batch", type=int, default=10, help="requests per edit batch")
    parser.add_argument("--epoch", type=int, default=None, help="edits per edit epoch (validation after each); default N/5")
    parser.add_argument("--methods", nargs="+", default=["memit", "alphaedit"],
                        help="methods to run, each alone or with a projection: ft memit prune+null_space ...")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--output", type=Path, default=Path.home() / "lightning-alphaedit" / "bench")
    parser.add_argument("extra", nargs="*", help="further CLI overrides after --, e.g. -- --edit.l2 1.0")
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"benchmark skipped: {DATA} is absent (the shared CounterFact data)")
    output = args.output.expanduser() / f"counterfact-n{args.n}-b{args.batch}"
    output.mkdir(parents=True, exist_ok=True)
    runs = {method: run_method(method, args, output) for method in args.methods}
    first = next(iter(runs.values()))
    lines = [
        f"N = {args.n}, B = {args.batch}, SmolLM2-135M, first {args.n} cases of counterfact-edit.json. "
        "Rates in %, fluency × 100, drift from the unedited model on held-out text; edit time = value "
        "optimization + keys + solves + cache update per request; memory = peak RSS (CPU) or peak "
        "allocated (GPU).",
        "",
        "| method | " + " | ".join(COLUMNS) + " | edit time per request (split) | wall | memory |",
        "|---|" + "---|" * (len(COLUMNS) + 3),
        row("unedited", first["unedited"], None),
        *(row(method, r["edited"], r) for method, r in runs.items()),
    ]
    table = "\n".join(lines) + "\n"
    write_text_atomic(output / "summary.md", table)
    write_text_atomic(output / "summary.json", json.dumps(runs, indent=2))
    print("\n" + table)

    report([r["folder"] for r in runs.values()], str(output / "report"), wandb_project=None)


if __name__ == "__main__":
    main()
