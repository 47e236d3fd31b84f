"""Long edit streams: which settings keep a model healthy over thousands of sequential edits.

    python bench/long_stream.py --n 1000 --settings alphaedit+mpes memit    # run (or go on with) two settings
    python bench/long_stream.py --n 1000 --summarize-only                    # tables and curves of what ran

Every setting is one ``lightning-alphaedit fit`` on the SmolLM2 CounterFact bench config: the
first N cases of counterfact-edit.json in file order, batches of 100, validated every 200 edits
(teacher-forced figures, held-out perplexity and KL; generation and WILD off), ``last.ckpt`` after every
validation. A setting whose folder already holds a checkpoint goes on from it, so a long run is
made in chunks: run the same command again after an interruption. One setting at a time: two
torch jobs on the same cores slow each other down many times over.

Writes, under ``--output`` (default ``bench/results/long-stream``): ``summary.json``, one record
per validation of every setting (edits, efficacy, generalization, specificity, the unedited
specificity of the same requests, held-out perplexity edited and unedited, edit seconds per
request so far), ``summary.md`` (the last validation of each setting), ``curves.png`` and
``frontier.png`` (efficacy and generalization against the perplexity rise, a point per setting).
The run folders (checkpoints included) go under ``--runs``.

Run by hand from the repository root; needs ../shared/data (it says so when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_alphaedit.paths import atomic_file, write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bench" / "smollm2-counterfact30.yaml"
RUN_FOLDER = "bench-counterfact30"  # the config's default_root_dir under $LIGHTNING_ALPHAEDIT_RUNS (no logger)
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
MPES = ["--model.values.early_stop", "most_probable"]
# C0 from every document of the bench corpus (10,033) but the last 16, which stay held out for drift
WHOLE_CORPUS = ["--edit.statistics.sample_count", "10017", "--edit.statistics.max_length", "128"]
SETTINGS: dict[str, list[str]] = {
    # the reference method, then the levers of the literature after it, alone and combined
    "alphaedit": [],
    "alphaedit+mpes": MPES,
    "alphaedit+mpes+extra1": [*MPES, "--model.values.extra_steps", "1"],
    "alphaedit+mpes+leakage300": [*MPES, "--edit.leakage_weight", "300"],
    "alphaedit+mpes+leakage3000": [*MPES, "--edit.leakage_weight", "3000"],
    "alphaedit+mpes+leakage10000": [*MPES, "--edit.leakage_weight", "10000"],
    "alphaedit+mpes+leakage300+refresh500": [*MPES, "--edit.leakage_weight", "300", "--edit.refresh_every", "500"],
    "alphaedit+mpes+leakage3000+refresh500": [*MPES, "--edit.leakage_weight", "3000", "--edit.refresh_every", "500"],
    "alphaedit+mpes+anchor": [*MPES, "--edit.norm_anchor.enabled", "true"],
    "alphaedit+mpes+extra1+leakage300": [*MPES, "--model.values.extra_steps", "1", "--edit.leakage_weight", "300"],
    "alphaedit+whole-corpus": WHOLE_CORPUS,
    "alphaedit+mpes+whole-corpus": [*MPES, *WHOLE_CORPUS],
    "memit": ["--edit.method", "memit"],
    "memit+mpes": ["--edit.method", "memit", *MPES],
}
# runs made before this script, read where a setting has no run of its own at that N
EARLIER_RUNS = {
    (1000, "alphaedit"): ROOT / "bench" / "results" / "gpu-h200" / "long-n1000-b100" / "alphaedit-metrics.jsonl",
    (1000, "memit"): ROOT / "bench" / "results" / "long-n1000-b100-cpu-memit" / "memit-metrics.jsonl",
}
# the aims of a long stream: (efficacy, generalization, perplexity rise in %) at least, at least, at most
TARGETS = {1000: (95, 85, 5), 3000: (93, 80, 10)}
FIGURES = (("efficacy", "val/efficacy"), ("generalization", "val/generalization"),
           ("specificity", "val/specificity"), ("perplexity", "drift/perplexity"))


def run_setting(name: str, overrides: list[str], args) -> None:
    """One CLI run, or the rest of it from its last checkpoint."""
    folder = args.runs / f"n{args.n}" / name
    run = folder / RUN_FOLDER
    checkpoint = run / "checkpoints" / "last.ckpt"
    command = [
        sys.executable, "-m", "lightning_alphaedit", "fit", "--config", str(CONFIG),
        "--data.path", str(DATA), "--data.limit", str(args.n), "--data.batch_size", str(args.batch),
        "--data.edits_per_epoch", str(args.epoch), "--model.evaluation.generation", "false",
        "--model.evaluation.wild.enabled", "false",
        "--model.values.requests_per_pass", "10", "--trainer.logger", "false", "--export.enabled", "false", "--drift.health", "true",
        "--trainer.enable_progress_bar", "false", *overrides, *args.extra,
        *(["--ckpt_path", str(checkpoint)] if checkpoint.is_file() else []),
    ]
    if (run / "results.json").is_file():
        print(f"=== {name}: finished ({run / 'results.json'})", flush=True)
        return
    # the bench config puts its runs under $LIGHTNING_ALPHAEDIT_RUNS
    environment = {**os.environ, "LIGHTNING_ALPHAEDIT_RUNS": str(folder)}
    print(f"\n=== {name}: LIGHTNING_ALPHAEDIT_RUNS={folder} {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=environment)


def unedited_specificity(args) -> list[float]:
    """Per request, the unedited model's share of neighbourhood prompts it answers truly (cached)."""
    cache = args.runs / f"unedited-specificity-n{args.n}.json"
    if not cache.is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "specificity_margins.py"), "--limit", str(args.n),
                        "--data", str(DATA), "--output", str(cache)], check=True, cwd=ROOT)
    rows = json.loads(cache.read_text())
    per_request: dict[str, list[bool]] = {}
    for row in rows:  # in stream order
        per_request.setdefault(row["case_id"], []).append(row["margin_before"] > 0)
    return [sum(v) / len(v) for v in per_request.values()]


def records(name: str, args, specific: list[float]) -> list[dict]:
    history_file = args.runs / f"n{args.n}" / name / RUN_FOLDER / "metrics.jsonl"
    if not history_file.is_file():
        history_file = EARLIER_RUNS.get((args.n, name), history_file)
    if not history_file.is_file():
        return []
    rows = []
    for record in map(json.loads, history_file.read_text().splitlines()):
        edits = record["edits"]
        rows.append({
            "setting": name, "edits": edits,
            **{figure: 100 * record[key] for figure, key in FIGURES[:3] if key in record},
            # the requests a validation after k edits scores: the first k (the baseline: all N)
            "specificity_unedited": 100 * sum(specific[:edits or len(specific)]) / (edits or len(specific)),
            "perplexity": record.get("drift/perplexity"),
            "perplexity_unedited": record.get("drift/perplexity_unedited"),
            "seconds_per_request": record["time/edit_seconds"] / edits if "time/edit_seconds" in record and edits else None,
        })
    if rows and rows[0]["edits"] == 0 and len(rows) > 1:  # the baseline: unedited on all N requests
        rows[0].update(perplexity=rows[1]["perplexity_unedited"], perplexity_unedited=rows[1]["perplexity_unedited"])
    return rows


def summarize(args) -> None:
    specific = unedited_specificity(args)
    summary = [r for name in SETTINGS for r in records(name, args, specific)]
    args.output.mkdir(parents=True, exist_ok=True)
    # runs whose folders are gone (another machine, an earlier session) keep their records
    merged = {(r["setting"], r["edits"], r.get("n", args.n)): r for r in _read_summary(args.output)}
    merged.update({(r["setting"], r["edits"], args.n): r | {"n": args.n} for r in summary})
    write_text_atomic(args.output / "summary.json", json.dumps(list(merged.values()), indent=1))
    this_length = [{k: v for k, v in r.items() if k != "n"} for (_, _, n), r in merged.items() if n == args.n]
    write_text_atomic(args.output / f"summary-n{args.n}.json", json.dumps(this_length, indent=1))

    def cell(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}"

    lines = ["| setting | N | edits | efficacy | generalization | specificity (unedited) | perplexity (unedited) | s / request |",
             "|---|---|---|---|---|---|---|---|"]
    for (setting, edits, n), r in sorted(merged.items(), key=lambda item: (item[0][2], item[0][0], item[0][1])):
        if edits and edits == max(e for (s, e, m) in merged if s == setting and m == n):
            lines.append(f"| {setting} | {n} | {edits} | {cell(r.get('efficacy'))} | {cell(r.get('generalization'))} | "
                         f"{cell(r.get('specificity'))} ({cell(r['specificity_unedited'])}) | "
                         f"{cell(r['perplexity'], 2)} ({cell(r['perplexity_unedited'], 2)}) | {cell(r['seconds_per_request'], 2)} |")
    write_text_atomic(args.output / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    draw(list(merged.values()), args.output / "curves.png")
    draw_frontier(list(merged.values()), args.output / "frontier.png")


def _read_summary(output: Path) -> list[dict]:
    path = output / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else []


def palette(keys) -> dict:
    """A distinct colour per key: the default cycle has 10, and there are more settings than that."""
    tab20 = matplotlib.colormaps["tab20"].colors
    colours = tab20[::2] + tab20[1::2]  # the ten dark shades first, then the light ones
    return {key: colours[i % len(colours)] for i, key in enumerate(sorted(keys))}


def draw(rows: list[dict], path: Path) -> None:
    """Efficacy, specificity and perplexity against edits, a line per setting (and stream length)."""
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    lines = sorted({(r["setting"], r["n"]) for r in rows}, key=lambda s: (s[1], s[0]))
    colour = palette({setting for setting, _ in lines})  # the frontier's colours; the stream length by marker
    marker = dict(zip(sorted({n for _, n in lines}), "osD^v"))
    for axis, (figure_name, unedited) in zip(axes, (("efficacy", None), ("specificity", "specificity_unedited"),
                                                     ("perplexity", "perplexity_unedited"))):
        for setting, n in lines:
            points = sorted((r["edits"], r[figure_name], r.get(unedited)) for r in rows
                            if r["setting"] == setting and r["n"] == n and r.get(figure_name) is not None)
            label = setting if len({m for _, m in lines}) == 1 else f"{setting} (N = {n})"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker[n], label=label,
                      color=colour[setting])
            if unedited:
                axis.plot([p[0] for p in points if p[2] is not None], [p[2] for p in points if p[2] is not None],
                          linestyle="--", color=colour[setting], alpha=0.5)
        axis.set_xlabel("edits applied")
        axis.set_title(figure_name + ("" if not unedited else " (dashed: unedited, same requests)"), fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    with atomic_file(path) as partial:
        figure.savefig(partial, format="png", dpi=110)
    plt.close(figure)


def draw_frontier(rows: list[dict], path: Path) -> None:
    """Efficacy and generalization against the perplexity rise at each setting's last validation,
    a panel per stream length: what each setting trades for what. A faint line joins a setting's
    earlier validations, so settings that stopped at different lengths still compare edit for edit."""
    lengths = sorted({r["n"] for r in rows})
    figure, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.8), squeeze=False)
    colour = palette({r["setting"] for r in rows})  # a setting keeps its colour across panels
    for axis, n in zip(axes[0], lengths):
        for setting in sorted({r["setting"] for r in rows if r["n"] == n}):
            own = sorted((r for r in rows if r["setting"] == setting and r["n"] == n and r["edits"]),
                         key=lambda r: r["edits"])
            if not own or not own[-1].get("perplexity") or not own[-1].get("perplexity_unedited"):
                continue
            # (rise, efficacy) at every validation: a run still going compares at equal edits
            trail = [(100 * (r["perplexity"] / r["perplexity_unedited"] - 1), r["efficacy"])
                     for r in own if r.get("perplexity") and r.get("perplexity_unedited")]
            axis.plot([x for x, _ in trail], [y for _, y in trail], color=colour[setting], alpha=0.3, linewidth=1,
                      marker=".", markersize=4)
            last, rise = own[-1], trail[-1][0]
            axis.scatter([rise], [last["efficacy"]], marker="o", color=colour[setting],
                         label=f"{setting} ({last['edits']} edits)")
            axis.scatter([rise], [last["generalization"]], marker="^", color=colour[setting])
        if n in TARGETS:  # the aims, dotted: a setting meeting them sits left of the line, above both
            efficacy, generalization, rise = TARGETS[n]
            axis.axvline(rise, color="grey", linestyle=":")
            axis.axhline(efficacy, color="grey", linestyle=":")
            axis.axhline(generalization, color="grey", linestyle=":")
        axis.set_xlabel("held-out perplexity rise over the unedited model (%)")
        axis.set_ylabel("efficacy (o), generalization (^)")
        axis.set_title(f"N = {n}: the last validation of each setting (faint: efficacy at earlier ones)", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_file(path) as partial:
        figure.savefig(partial, format="png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="edits in the stream (first N cases in file order)")
    parser.add_argument("--batch", type=int, default=100, help="requests per edit batch")
    parser.add_argument("--epoch", type=int, default=200, help="edits per edit epoch: a validation and a checkpoint after each")
    parser.add_argument("--settings", nargs="+", default=[], choices=sorted(SETTINGS), help="settings to run, in order")
    parser.add_argument("--summarize-only", action="store_true", help="only tabulate and draw what has run")
    parser.add_argument("--runs", type=Path, default=Path.home() / "lightning-alphaedit" / "bench" / "long-stream")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "long-stream")
    parser.add_argument("extra", nargs="*", help="further CLI overrides after --, e.g. -- --edit.l2 1.0")
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"benchmark skipped: {DATA} is absent (the shared CounterFact data)")
    args.runs = args.runs.expanduser()
    if not args.summarize_only:
        for name in args.settings:
            run_setting(name, SETTINGS[name], args)
    summarize(args)


if __name__ == "__main__":
    main()
