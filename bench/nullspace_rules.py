"""The null-space selection rules side by side on one sequential stream.

    python bench/nullspace_rules.py --n 300 --batch 30 --rules absolute:0.02 energy:0.3 fraction:0.7
    python bench/nullspace_rules.py --collect OUTPUT          # tabulate runs made before

Each rule is one AlphaEdit run of `bench/sequential.py` (its own process, the SmolLM2
CounterFact setting, generation figures off), under OUTPUT/<rule>-<threshold>. The table has,
per rule, the directions it keeps at each edited layer (from `lightning-alphaedit spectrum`
on the same statistics) and the figures at every validation: efficacy, generalization,
specificity and drift (KL on held-out text, held-out perplexity, hidden shift). Writes
``rules.md`` and ``rules.json`` under OUTPUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lightning_alphaedit.paths import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bench" / "smollm2-counterfact30.yaml"


def run_rule(rule: str, args) -> None:
    name, _, threshold = rule.partition(":")
    command = [
        sys.executable, str(ROOT / "bench" / "sequential.py"), "--n", str(args.n), "--batch", str(args.batch),
        "--epoch", str(args.epoch or args.n // 2), "--methods", "alphaedit", "--output", str(args.output / rule.replace(":", "-")),
        "--", "--model.evaluation.generation", "false", "--export.enabled", "false",
        "--edit.nullspace_rule", name, "--edit.nullspace_threshold", threshold, *args.extra,
    ]
    subprocess.run(command, check=True, cwd=ROOT)


def kept_directions(rules: list[str], folder: Path) -> tuple[dict[str, list[int]], list[int]]:
    """Directions each rule keeps at each edited layer, and each layer's d_in, from the spectrum
    command (cached statistics)."""
    command = [sys.executable, "-m", "lightning_alphaedit", "spectrum", "--config", str(CONFIG),
               "--spectrum.rules", "[" + ",".join(rules) + "]", "--spectrum.output", str(folder)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    layers = json.loads((folder / "spectrum.json").read_text())["layers"]
    return {rule: [layer["kept"][rule] for layer in layers] for rule in rules}, [layer["d_in"] for layer in layers]


def history(folder: Path) -> list[dict]:
    [metrics] = folder.rglob("metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--epoch", type=int, default=None, help="edits per validation (default N/2)")
    parser.add_argument("--rules", nargs="+", default=["absolute:0.02", "energy:0.3", "fraction:0.7"])
    parser.add_argument("--output", type=Path, default=Path.home() / "lightning-alphaedit" / "bench" / "nullspace-rules")
    parser.add_argument("--collect", action="store_true", help="only tabulate the runs under --output")
    parser.add_argument("extra", nargs="*", help="further CLI overrides after --")
    args = parser.parse_args()
    args.output = args.output.expanduser()
    if not args.collect:
        for rule in args.rules:
            run_rule(rule, args)
    runs = {p.name.replace("-", ":", 1): history(p) for p in sorted(args.output.iterdir())
            if p.is_dir() and any(p.rglob("metrics.jsonl"))}
    kept, d_in = kept_directions(list(runs), args.output / "spectrum")
    lines = ["| rule | kept at the edited layers | edits | efficacy | generalization | specificity | KL | perplexity | hidden shift |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rule, records in runs.items():
        share = [k / d for k, d in zip(kept[rule], d_in)]
        where = f"{min(share):.0%}-{max(share):.0%}" if max(share) - min(share) > 0.005 else f"{share[0]:.0%}"
        for record in records:
            figures = [100 * record[f"val/{m}"] for m in ("efficacy", "generalization", "specificity")]
            drift = [record.get(f"drift/{m}") for m in ("kl", "perplexity", "hidden_shift")]
            cells = [f"{v:.1f}" for v in figures] + ["" if v is None else f"{v:.4g}" for v in drift]
            lines.append(f"| {rule} | {where} | {record['edits']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(args.output / "rules.md", table)
    write_text_atomic(args.output / "rules.json", json.dumps({"kept": kept, "d_in": d_in, "runs": runs}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
