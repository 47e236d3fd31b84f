"""The eigenvalue spectrum of the key statistics C0, and what each null-space rule keeps of it.

AlphaEdit's null space is the set of C0's eigen-directions the preserved keys barely use. The
reference picks them with an absolute eigenvalue threshold (2e-2), which means something
different on every model: on SmolLM2 it keeps 60-79 % of the directions, elsewhere it can
keep almost all or none. ``lightning-alphaedit spectrum`` shows the spectrum of each edited
layer (from the statistics cache) and the kept dimension under every rule of
`algebra.NULL_SPACE_RULES`, so a threshold can be chosen by looking, not by guessing.

Pure torch and matplotlib: no Lightning here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_alphaedit.algebra import NULL_SPACE_RULES, KeyMoments, kept_dimension
from lightning_alphaedit.paths import atomic_file, write_text_atomic


@dataclass
class SpectrumConfig:
    """What `lightning-alphaedit spectrum` shows."""

    rules: list[str] = field(default_factory=lambda: [
        "absolute:0.02", "relative:0.001", "relative:0.01", "energy:0.01", "energy:0.05", "fraction:0.25",
        "fraction:0.5",
    ])
    """Selection rules to tabulate, as ``rule:threshold`` (the config's own rule comes first)."""
    quantiles: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.5, 0.9, 1.0])
    """Eigenvalue quantiles to tabulate."""
    output: str | None = None
    """Folder for ``spectrum.png``, ``spectrum.json`` and ``spectrum.md``; None = ``<default_root_dir>/spectrum``."""


def parse_rule(text: str) -> tuple[str, float]:
    """``"energy:0.05"`` -> ("energy", 0.05), checked."""
    rule, _, threshold = text.partition(":")
    try:
        value = float(threshold)
    except ValueError:
        raise ValueError(f"rule {text!r}: expected RULE:THRESHOLD, RULE one of {NULL_SPACE_RULES}") from None
    kept_dimension(torch.ones(1), rule, value)  # raises on an unknown rule or a bad threshold
    return rule, value


def eigenvalues(moments: Mapping[int, KeyMoments]) -> dict[int, torch.Tensor]:
    """Ascending eigenvalues of each layer's C0 = E[k kᵀ] (float64, symmetrised as `null_space` does)."""
    result = {}
    for layer, moment in moments.items():
        c0 = moment.mean().double()  # (d_in, d_in)
        result[layer] = torch.linalg.eigvalsh((c0 + c0.T) / 2).cpu()  # (d_in,)
    return result


def spectrum_rows(
    spectra: Mapping[int, torch.Tensor], rules: Sequence[tuple[str, float]], quantiles: Sequence[float]
) -> list[dict]:
    """Per layer: d_in, the eigenvalue quantiles and the kept dimension under each rule."""
    rows = []
    for layer, values in spectra.items():
        q = torch.quantile(values, torch.tensor(list(quantiles), dtype=values.dtype))
        rows.append({
            "layer": layer,
            "d_in": len(values),
            "quantiles": {f"q{p:g}": float(v) for p, v in zip(quantiles, q)},
            "kept": {f"{rule}:{t:g}": kept_dimension(values, rule, t) for rule, t in rules},
        })
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table: one row per layer, quantiles then kept dimension (and %) per rule."""
    quantiles, rules = list(rows[0]["quantiles"]), list(rows[0]["kept"])
    lines = ["| layer | d_in | " + " | ".join(f"λ {q}" for q in quantiles) + " | " + " | ".join(f"kept {r}" for r in rules) + " |",
             "|" + "---|" * (2 + len(quantiles) + len(rules))]
    for row in rows:
        cells = [str(row["layer"]), str(row["d_in"])]
        cells += [f"{row['quantiles'][q]:.3g}" for q in quantiles]
        cells += [f"{row['kept'][r]} ({100 * row['kept'][r] / row['d_in']:.0f} %)" for r in rules]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(spectra: Mapping[int, torch.Tensor], threshold: tuple[str, float], path: Path, title: str) -> Path:
    """Sorted eigenvalues per layer on a log scale, with the configured rule's cut drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    rule, value = threshold
    for index, (layer, values) in enumerate(spectra.items()):
        color = f"C{index % 10}"
        axes.plot(range(len(values)), values.clamp(min=1e-12).numpy(), color=color, label=f"layer {layer}")
        cut = kept_dimension(values, rule, value)
        axes.axvline(cut, color=color, linestyle=":", linewidth=1)
    if rule == "absolute":
        axes.axhline(value, color="black", linestyle="--", linewidth=1, label=f"threshold {value:g}")
    axes.set_yscale("log")
    axes.set_xlabel("eigen-direction (ascending eigenvalue); dotted: kept dimension")
    axes.set_ylabel("eigenvalue of E[k kᵀ]")
    axes.set_title(f"{title}: null space by {rule} {value:g}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return path


def save(rows: Sequence[dict], spectra: Mapping[int, torch.Tensor], configured: tuple[str, float], folder: Path,
         title: str) -> dict[str, Path]:
    """Write ``spectrum.png``, ``spectrum.json`` (rows and every eigenvalue) and ``spectrum.md``."""
    data = {"model": title, "configured_rule": f"{configured[0]}:{configured[1]:g}", "layers": list(rows),
            "eigenvalues": {str(l): v.tolist() for l, v in spectra.items()}}
    return {
        "png": plot(spectra, configured, folder / "spectrum.png", title),
        "json": write_text_atomic(folder / "spectrum.json", json.dumps(data)),
        "md": write_text_atomic(folder / "spectrum.md", format_table(rows)),
    }
