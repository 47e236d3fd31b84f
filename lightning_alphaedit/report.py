"""``lightning-alphaedit report RUN_DIR [RUN_DIR ...]``: figures and a table from finished runs.

A run folder holds ``metrics.jsonl`` (one line per validation: edits applied, scores, drift)
and, once the stream is done, ``results.json`` (the test-stage protocol and the unedited
baseline). The report draws every figure against the number of edits, one line per run, so
MEMIT and AlphaEdit runs given together share each plot; writes a Markdown table of the
final figures; and sends both to W&B (offline unless ``WANDB_MODE`` says otherwise) as
line charts and a W&B Table.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lightning_alphaedit.run_folder import HISTORY_FILE, RESULTS_FILE
from lightning_alphaedit.paths import atomic_file, write_text_atomic
from lightning_alphaedit.timing import timed
from lightning_alphaedit.update import method_label
from lightning_alphaedit.wild import WILD_PREFIX

TABLE_FIGURES = (
    "efficacy", "generalization", "specificity", "generation_efficacy", "generation_generalization",
    "fluency", "consistency", "efficacy_token_acc", "generalization_token_acc", "specificity_token_acc",
    "drift/hidden_shift", "drift/kl", "drift/perplexity",
)
"""Columns of the Markdown table, when any run has them (rates in %, the rest as measured)."""

UNSCALED = ("fluency", "consistency")

CAPABILITY = "capability/"
"""lm-eval task scores (``CapabilityMonitor``): drawn and tabled from the history, unedited = 0 edits."""


@dataclass
class Run:
    """One finished (or stopped) run, read back from its folder."""

    folder: Path
    label: str
    history: list[dict] = field(default_factory=list)
    results: dict | None = None


def find_runs(paths: list[str]) -> list[Run]:
    """Every run folder under ``paths`` (a folder holding metrics.jsonl or results.json)."""
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise FileNotFoundError(f"{raw}: no such run folder")
        found = sorted({p.parent for name in (HISTORY_FILE, RESULTS_FILE) for p in path.rglob(name)})
        if not found:
            raise FileNotFoundError(f"{raw}: no {HISTORY_FILE} or {RESULTS_FILE} below it (is it a run folder?)")
        folders += [f for f in found if f not in folders]
    runs = [_read_run(f) for f in folders]
    labels = [r.label for r in runs]
    for run in runs:  # two runs of the same method: tell them apart by folder
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.folder.name})"
    return runs


def _read_run(folder: Path) -> Run:
    history_file, results_file = folder / HISTORY_FILE, folder / RESULTS_FILE
    history = []
    if history_file.is_file():
        for number, line in enumerate(history_file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{history_file}: line {number}: not JSON ({error})") from error
    results = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else None
    if results and not history:
        history = results.get("history", [])
    label = (results or {}).get("label") or (results or {}).get("method") or _method_from_config(folder) or folder.name
    return Run(folder=folder, label=label, history=history, results=results)


def _method_from_config(folder: Path) -> str | None:
    config = folder / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    edit = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("edit", {})
    return method_label(edit["method"], edit.get("projection")) if edit.get("method") else None


def history_figures(runs: list[Run]) -> list[str]:
    """Every figure some run logged per validation, in a stable order (val/ first, then drift/)."""
    names = {k for run in runs for record in run.history for k in record
             if k not in ("edits", "epoch") and not k.endswith("_unedited")}  # those are drawn as baselines
    return sorted(names, key=lambda n: (not n.startswith("val/"), n))


def _scale(name: str) -> float:
    bare = name.split("/", 1)[-1]
    return 1.0 if bare in UNSCALED or name.startswith(("drift/", "time/")) else 100.0


def plot(runs: list[Run], output: Path) -> dict[str, Path]:
    """One PNG per figure: value against edits applied, a line per run, its unedited value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for name in history_figures(runs):
        figure, axes = plt.subplots(figsize=(6, 4))
        for index, run in enumerate(runs):
            points = [(r["edits"], r[name]) for r in run.history if name in r]
            if not points:
                continue
            color = f"C{index}"
            xs, ys = zip(*sorted(points))
            axes.plot(xs, [_scale(name) * y for y in ys], marker="o", color=color, label=run.label)
            if name.startswith("val/"):
                baseline = ((run.results or {}).get("unedited") or {}).get(name.split("/", 1)[-1])
            elif name.startswith(CAPABILITY):  # measured before the first edit
                baseline = next((r[name] for r in run.history if r["edits"] == 0 and name in r), None)
            else:  # drift/perplexity has its unedited value in every record
                baseline = next((r[f"{name}_unedited"] for r in run.history if f"{name}_unedited" in r), None)
            if baseline is not None:
                axes.axhline(_scale(name) * baseline, color=color, linestyle="--", linewidth=1,
                             label=f"{run.label}, unedited")
        axes.set_xlabel("edits applied")
        axes.set_ylabel(name + (" (%)" if _scale(name) == 100 else ""))
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = output / (name.replace("/", "_") + ".png")
        with atomic_file(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120)
        plt.close(figure)
        written[name] = path
    return written


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the final table: per run its unedited row, then its edited row."""
    finals = []
    for run in runs:
        results = run.results or {}
        edited = dict(results.get("edited") or {})
        if not edited and run.history:  # a run without a test stage: its last validation
            edited = {k.split("/", 1)[1] if k.startswith("val/") else k: v for k, v in run.history[-1].items()}
        unedited = dict(results.get("unedited") or {})
        for record in sorted(run.history, key=lambda r: r["edits"]):  # capability: first and last measurement
            for name, value in record.items():
                if name.startswith(CAPABILITY):
                    edited[name] = value
                    if record["edits"] == 0:
                        unedited[name] = value
        finals.append((run, unedited, edited))
    columns = [f for f in TABLE_FIGURES if any(f in e or f in u for _, u, e in finals)]
    columns += sorted({f for _, u, e in finals for f in (*u, *e) if f.startswith(CAPABILITY) and "_stderr" not in f})
    columns += list(dict.fromkeys(f for _, u, e in finals for f in (*u, *e) if f.startswith(WILD_PREFIX)))

    def cell(values: dict, name: str) -> str:
        if name not in values:
            return ""
        decimals = 4 if name == "drift/kl" else 3 if name == "drift/hidden_shift" else 1
        return f"{_scale(name) * values[name]:.{decimals}f}"

    rows = []
    for run, unedited, edited in finals:
        edits = (run.results or {}).get("edits_applied", run.history[-1]["edits"] if run.history else "")
        if unedited:
            rows.append([f"{run.label}: unedited", "0"] + [cell(unedited, c) for c in columns])
        rows.append([run.label, str(edits)] + [cell(edited, c) for c in columns])
    return ["run", "edits"] + columns, rows


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_wandb(runs: list[Run], columns: list[str], rows: list[list[str]], images: dict[str, Path], output: Path,
             project: str) -> Path:
    """The same figures as W&B line charts (plus the PNGs) and the table as a W&B Table."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=project, job_type="report", dir=str(output), name="report",
                     config={"runs": [str(r.folder) for r in runs]})
    try:
        for name in history_figures(runs):
            series = [(r.label, [(h["edits"], h[name]) for h in r.history if name in h]) for r in runs]
            series = [(label, sorted(points)) for label, points in series if points]
            chart = wandb.plot.line_series(
                xs=[[x for x, _ in points] for _, points in series],
                ys=[[_scale(name) * y for _, y in points] for _, points in series],
                keys=[label for label, _ in series], title=name, xname="edits applied",
            )
            run.log({f"chart/{name}": chart, f"figure/{name}": wandb.Image(str(images[name]))})
        run.log({"results": wandb.Table(columns=columns, data=rows)})
        return Path(run.dir).parent
    finally:
        run.finish()


def report(paths: list[str], output: str | None = None, wandb_project: str | None = "lightning-alphaedit") -> Path:
    """Write the PNGs and ``report.md`` for the runs under ``paths``; return the output folder."""
    runs = find_runs(paths)
    folder = Path(output).expanduser() if output else runs[0].folder / "report"
    folder.mkdir(parents=True, exist_ok=True)
    images = plot(runs, folder)
    columns, rows = table_rows(runs)
    table = markdown(columns, rows)
    figures = "\n".join(f"![{name}]({path.name})" for name, path in images.items())
    sources = "\n".join(f"- {run.label}: `{run.folder}`" for run in runs)
    write_text_atomic(folder / "report.md", f"# Edit runs\n\n{sources}\n\n{table}\n{figures}\n")
    print(table)
    print(f"report: {folder / 'report.md'} ({len(images)} figures)")
    if wandb_project:
        print(f"W&B:    {to_wandb(runs, columns, rows, images, folder, wandb_project)}")
    return folder


def main(args: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="lightning-alphaedit report",
        description="Figures against the number of edits and a table of final figures, from run folders.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (or folders above them); several runs share each plot")
    parser.add_argument("--output", help="where the PNGs and report.md go (default: <first run>/report)")
    parser.add_argument("--wandb-project", default="lightning-alphaedit",
                        help="W&B project for the charts and table (offline unless WANDB_MODE says otherwise)")
    parser.add_argument("--no-wandb", action="store_true", help="write the files only")
    options = parser.parse_args(args)
    with timed({}, "report", announce=f"report of {', '.join(options.runs)}"):
        return report(options.runs, options.output, None if options.no_wandb else options.wandb_project)
