"""One edit batch at world size 1 and 2 (CPU, gloo): what sharding the batch buys.

    python bench/distributed.py                       # tiny and demo configs, world sizes 1 and 2
    python bench/distributed.py --configs demo --batch 20

Each run is `lightning-alphaedit fit` on one batch of the config's edit set (baseline, drift
and generation off, so the batch dominates), with the machine's cores split evenly between
the ranks (OMP_NUM_THREADS = cores / world size): world size 2 is the same hardware cut in
two, as two GPUs of a node would be two devices. The time per phase comes from each run's
results.json. Writes ``summary.json`` and ``summary.md`` under --output.

Run by hand from the repository root.
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

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("values", "keys", "solve", "cache")


def run(config: str, world: int, batch: int, output: Path) -> dict:
    folder = output / f"{config}-w{world}"
    command = [
        sys.executable, "-m", "lightning_alphaedit", "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--data.limit", str(batch), "--data.batch_size", str(batch), "--data.edits_per_epoch", str(batch),
        "--edit.baseline", "false", "--drift.texts", "0", "--export.enabled", "false", "--checkpoint.enabled", "false",
        "--model.evaluation.generation", "false", "--trainer.enable_progress_bar", "false",
    ]
    if world > 1:
        command += [
            "--config", str(ROOT / "configs" / "cluster" / "ddp.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", str(world), "--trainer.strategy.init_args.process_group_backend", "gloo",
        ]
    threads = max(1, (os.cpu_count() or 1) // world)
    environment = {**os.environ, "LIGHTNING_ALPHAEDIT_RUNS": str(folder), "OMP_NUM_THREADS": str(threads),
                   "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    print(f"=== {config}, world size {world}, {threads} thread(s) per rank: {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=environment)
    wall = time.perf_counter() - started
    results = json.loads(max(folder.rglob("results.json"), key=lambda p: p.stat().st_mtime).read_text())
    timing = results["timing_seconds"]
    return {"config": config, "world_size": world, "threads_per_rank": threads, "batch": batch,
            "seconds": {p: timing.get(p, 0.0) for p in PHASES}, "batch_seconds": sum(timing.get(p, 0.0) for p in PHASES),
            "wall_seconds": wall, "efficacy": results["edited"].get("efficacy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--batch", type=int, default=None, help="requests in the batch (default: tiny 8, demo 20)")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--output", type=Path, default=Path.home() / "lightning-alphaedit" / "bench" / "distributed")
    args = parser.parse_args()
    output = args.output.expanduser()
    output.mkdir(parents=True, exist_ok=True)
    rows = [run(c, w, args.batch or {"tiny": 8}.get(c, 20), output) for c in args.configs for w in args.worlds]
    lines = [
        f"One edit batch, CPU ({os.cpu_count()} cores split between the ranks), gloo. Seconds per phase "
        "(rank 0's); values = target-value optimization of the rank's share.",
        "",
        "| config | requests | world size | threads per rank | values | keys | solve | cache | batch | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        single = next(r for r in rows if r["config"] == row["config"] and r["world_size"] == 1)
        s = row["seconds"]
        lines.append(
            f"| {row['config']} | {row['batch']} | {row['world_size']} | {row['threads_per_rank']} | {s['values']:.2f} | "
            f"{s['keys']:.2f} | {s['solve']:.2f} | {s['cache']:.2f} | {row['batch_seconds']:.2f} | "
            f"{single['batch_seconds'] / row['batch_seconds']:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    write_text_atomic(output / "summary.md", table)
    write_text_atomic(output / "summary.json", json.dumps(rows, indent=2))
    print("\n" + table)


if __name__ == "__main__":
    main()
