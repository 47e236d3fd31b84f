"""The paper's comparison from benchmark summaries: every method's table, and what the null-space
projection adds to MEMIT, PRUNE and RECT (a figure like the paper's Figure 6).

    python bench/projection_gain.py RUNS/summary.json [MORE/summary.json ...] --output bench/results/methods-n100-b10

Reads the ``summary.json`` files `bench/sequential.py` writes (runs of the same stream and
settings; a label given twice keeps the last), and writes ``methods.md`` (one row per method,
the unedited model first) and ``projection_gain.png`` (per method, the change of each figure
when its update is projected: ``X+null_space`` minus ``X``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_alphaedit.paths import atomic_file, write_text_atomic

FIGURES = ("efficacy", "generalization", "specificity", "generation_efficacy", "fluency")
DRIFT = ("drift/kl", "drift/perplexity")
ORDER = ("ft", "memit", "memit+null_space", "prune", "prune+null_space", "rect", "rect+null_space", "alphaedit")


def shown(name: str, value: float) -> float:
    """Rates as percentages, fluency as it is (already x 100)."""
    return value if name == "fluency" or name.startswith("drift/") else 100 * value


def load(paths: list[Path]) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    for path in paths:
        for label, results in json.loads(path.read_text(encoding="utf-8")).items():
            runs[results.get("label") or label] = results
    return runs


def table(runs: dict[str, dict]) -> str:
    columns = FIGURES + DRIFT
    lines = ["| method | " + " | ".join(c.replace("drift/", "drift: ") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    first = next(iter(runs.values()))
    rows = [("unedited", first["unedited"])] + [(label, runs[label]["edited"]) for label in ORDER if label in runs]
    rows += [(label, r["edited"]) for label, r in runs.items() if label not in ORDER]
    for label, figures in rows:
        cells = []
        for name in columns:
            if name not in figures:
                cells.append("")
            else:
                value = shown(name, figures[name])
                cells.append(f"{value:.4f}" if name == "drift/kl" else f"{value:.2f}" if name.startswith("drift/") else f"{value:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gains(runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """method -> figure -> (projected - plain), in the units of the table."""
    result = {}
    for method in ("memit", "prune", "rect"):
        plain, projected = runs.get(method), runs.get(f"{method}+null_space")
        if plain and projected:
            result[method] = {
                name: shown(name, projected["edited"][name]) - shown(name, plain["edited"][name])
                for name in FIGURES if name in plain["edited"] and name in projected["edited"]
            }
    return result


def plot(gain: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [f for f in FIGURES if all(f in g for g in gain.values())]
    fig, axes = plt.subplots(1, len(figures), figsize=(2.6 * len(figures), 3.2))
    for axis, figure in zip(axes, figures):
        methods = list(gain)
        values = [gain[m][figure] for m in methods]
        axis.bar([m.upper() for m in methods], values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_title(figure.replace("_", " "), fontsize=10)
        for i, v in enumerate(values):
            axis.annotate(f"{v:+.1f}", (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    fig.suptitle("change from projecting the update onto the null space (X+null_space minus X)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    runs = load(args.summaries)
    args.output.mkdir(parents=True, exist_ok=True)
    gain = gains(runs)
    text = table(runs)
    if gain:
        text += "\nChange from the projection (X+null_space minus X):\n\n| method | " + " | ".join(FIGURES) + " |\n"
        text += "|---|" + "---|" * len(FIGURES) + "\n"
        for method, values in gain.items():
            text += f"| {method} | " + " | ".join(f"{values.get(f, float('nan')):+.1f}" for f in FIGURES) + " |\n"
        plot(gain, args.output / "projection_gain.png")
    write_text_atomic(args.output / "methods.md", text)
    print(text)


if __name__ == "__main__":
    main()
