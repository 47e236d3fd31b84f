"""Causal tracing (ROME, Meng et al. 2022): which layers' MLPs carry a fact.

For each request the subject's token embeddings are corrupted with Gaussian noise, which
makes the model forget the true answer. Then, one layer at a time, the MLP output of the
clean run is put back at one token position; where restoring it brings the true answer's
probability back, that MLP is on the path that recalls the fact. The layers with the
largest effect at the subject's last token are the ones to edit.

Measured per request: p_clean, p_corrupted (mean over noise samples) and, per position
and layer, p_restored (mean over the same noise samples). The indirect effect is
p_restored - p_corrupted. The MLP output is the output of the block's MLP projection (the
module whose weight the editor changes), so nothing here depends on the architecture.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_alphaedit.hooks import add_to_all, capture_output, replace_output
from lightning_alphaedit.prompts import encode_prompts, target_token_ids
from lightning_alphaedit.readout import logits_at
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets

POSITIONS = ("subject_last", "prompt_last")
"""Where the clean MLP output is restored: the subject's last token, the prompt's last token."""


@dataclass
class TraceConfig:
    """Settings of ``lightning-alphaedit trace``."""

    limit: int = 20
    """Requests traced (the first of the edit stream, in order)."""
    samples: int = 10
    """Noise samples per request (ROME: 10)."""
    noise_scale: float = 3.0
    """Noise std as a multiple of the std of the subjects' token embeddings (ROME: 3)."""
    window: int = 1
    """Consecutive layers restored together, centred on the traced layer (1: that layer only)."""
    span: int = 5
    """Number of consecutive layers to recommend for editing, centred on the peak effect."""
    exclude_first: int = 1
    """Restorations touching the first layers are not candidates for the peak: the first MLP at
    the subject reads little but the (corrupted) embedding itself, so restoring it undoes the
    noise rather than locating where the fact is recalled."""
    seed: int = 0
    """Seed of the noise."""
    progress: bool = True
    """Show a progress bar."""
    output: str | None = None
    """Folder for trace.png and trace.json; None: ``<trainer.default_root_dir>/trace``."""

    def __post_init__(self) -> None:
        if self.limit < 1 or self.samples < 1 or self.window < 1 or self.span < 1:
            raise ValueError("trace.limit, samples, window and span must be >= 1")


@dataclass
class TraceResult:
    """Probabilities of the true answer's first token, per request."""

    case_ids: list[str]
    clean: torch.Tensor  # (n,)
    corrupted: torch.Tensor  # (n,)
    restored: torch.Tensor  # (n, positions, layers)

    def effect(self) -> torch.Tensor:
        """Mean indirect effect (p_restored - p_corrupted) over requests: (positions, layers)."""
        return (self.restored - self.corrupted[:, None, None]).mean(0)

    def recommended_layers(self, span: int, window: int = 1, exclude_first: int = 0) -> list[int]:
        """``span`` consecutive layers centred on the largest effect at the subject's last token,
        among layers whose restoration window starts at or after ``exclude_first``."""
        at_subject = self.effect()[POSITIONS.index("subject_last")].clone()  # (layers,)
        n = at_subject.numel()
        eligible = torch.arange(n) - window // 2 >= exclude_first
        if not eligible.any():
            raise ValueError(f"no layer left after excluding the first {exclude_first} (window {window})")
        at_subject[~eligible] = -float("inf")
        peak, span = int(at_subject.argmax()), min(span, n)
        start = min(max(0, peak - span // 2), n - span)
        return list(range(start, start + span))

    def to_dict(self) -> dict:
        effect = self.effect()
        return {
            "case_ids": self.case_ids,
            "positions": list(POSITIONS),
            "p_clean": self.clean.tolist(),
            "p_corrupted": self.corrupted.tolist(),
            "p_restored": self.restored.tolist(),
            "mean_effect": {p: effect[i].tolist() for i, p in enumerate(POSITIONS)},
        }


def noise_std(model: torch.nn.Module, tokenizer, targets: ModelTargets, requests: Sequence[EditRequest]) -> float:
    """Standard deviation of the subjects' token embeddings (ROME's noise unit)."""
    batch = encode_prompts(tokenizer, [r.prompt for r in requests], [r.subject for r in requests])
    device = next(model.parameters()).device
    table = targets.embeddings.weight
    rows = [
        batch.input_ids[i, int(batch.subject_first[i]) : int(batch.subject_last[i]) + 1] for i in range(len(requests))
    ]
    return float(table[torch.cat(rows).to(device)].float().std())


@torch.no_grad()
def causal_trace(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    config: TraceConfig,
) -> TraceResult:
    """Trace every request; the noise is drawn from a generator seeded by ``config.seed``."""
    requests = [r for r in requests if r.target_true][: config.limit]
    if not requests:
        raise ValueError("causal tracing needs requests with a true target (target_true)")
    device = next(model.parameters()).device
    std = config.noise_scale * noise_std(model, tokenizer, targets, requests)
    generator = torch.Generator().manual_seed(config.seed)
    layers = range(targets.num_layers)
    clean, corrupted, restored = [], [], []
    for request in tqdm(requests, desc="causal trace", unit="request", disable=not config.progress):
        batch = encode_prompts(tokenizer, [request.prompt], [request.subject]).to(device)
        answer = target_token_ids(tokenizer, request.target_true)[0]
        length = int(batch.lengths[0])
        ids = batch.input_ids[:, :length]  # (1, t)
        first, last = int(batch.subject_first[0]), int(batch.subject_last[0])
        positions = {"subject_last": last, "prompt_last": length - 1}

        def answer_probability(input_ids: torch.Tensor, answer: int = answer) -> torch.Tensor:
            read = torch.zeros_like(input_ids, dtype=torch.bool)
            read[:, -1] = True
            logits = logits_at(model, targets, input_ids, torch.ones_like(input_ids), read).float()  # (b, V)
            return torch.softmax(logits, -1)[:, answer]  # (b,)

        with ExitStack() as stack:  # the clean run, recording every MLP output
            captures = [stack.enter_context(capture_output(targets.projection(layer))) for layer in layers]
            clean.append(answer_probability(ids)[0])
        clean_mlp = [c.value[0] for c in captures]  # layers x (t, d)

        s = config.samples
        noisy_ids = ids.expand(s, -1)  # (s, t)
        noise = torch.zeros(s, length, targets.embeddings.weight.shape[1])  # (s, t, d)
        noise[:, first : last + 1] = torch.randn(s, last + 1 - first, noise.shape[2], generator=generator) * std
        noise = noise.to(device)
        with add_to_all(targets.embeddings, noise):
            corrupted.append(answer_probability(noisy_ids).mean())
            per_position = []
            for name in POSITIONS:
                where = torch.full((s,), positions[name], device=device)
                per_layer = []
                for layer in layers:
                    window = range(max(0, layer - config.window // 2), min(len(layers), layer - config.window // 2 + config.window))
                    with ExitStack() as stack:
                        for restored_layer in window:
                            clean_value = clean_mlp[restored_layer][positions[name]].expand(s, -1)  # (s, d)
                            stack.enter_context(replace_output(targets.projection(restored_layer), clean_value, where))
                        per_layer.append(answer_probability(noisy_ids).mean())
                per_position.append(torch.stack(per_layer))
            restored.append(torch.stack(per_position))
    return TraceResult(
        case_ids=[r.case_id for r in requests],
        clean=torch.stack(clean).cpu(),
        corrupted=torch.stack(corrupted).cpu(),
        restored=torch.stack(restored).cpu(),
    )


def recommended(result: TraceResult, config: TraceConfig) -> list[int]:
    """The layers to edit by ``config``'s rule."""
    return result.recommended_layers(config.span, config.window, config.exclude_first)


def format_table(result: TraceResult) -> str:
    """Per layer: mean p_restored and indirect effect at each position (percent)."""
    effect = result.effect()
    restored = result.restored.mean(0)
    head = f"{'layer':>5} | " + " | ".join(f"{p + ' p':>16} {'effect':>7}" for p in POSITIONS)
    lines = [
        f"requests {len(result.case_ids)}: p_clean {100 * result.clean.mean():.1f} %, "
        f"p_corrupted {100 * result.corrupted.mean():.1f} %",
        head,
        "-" * len(head),
    ]
    for layer in range(effect.shape[1]):
        cells = " | ".join(f"{100 * restored[i, layer]:15.1f}% {100 * effect[i, layer]:6.1f}%" for i in range(len(POSITIONS)))
        lines.append(f"{layer:>5} | {cells}")
    return "\n".join(lines)


def save_trace(result: TraceResult, config: TraceConfig, folder: Path, title: str) -> tuple[Path, Path]:
    """Write trace.json (every number) and trace.png (the heat map) into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from lightning_alphaedit.paths import atomic_file, write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    data = result.to_dict() | {"config": asdict(config), "recommended_layers": recommended(result, config)}
    json_path, png_path = folder / "trace.json", folder / "trace.png"
    write_text_atomic(json_path, json.dumps(data, indent=1))

    effect = 100 * result.effect().numpy()  # (positions, layers)
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * effect.shape[1] + 2), 2.4))
    image = axis.imshow(effect, aspect="auto", cmap="Purples", vmin=min(0.0, effect.min()))
    axis.set_yticks(range(len(POSITIONS)), [p.replace("_", " ") for p in POSITIONS])
    axis.set_xticks(range(effect.shape[1]))
    axis.tick_params(axis="x", labelsize=7)
    axis.set_xlabel(f"layer (MLP output restored, window {config.window})")
    axis.set_title(f"{title}: indirect effect on p(true answer), %, mean of {len(result.case_ids)} requests", fontsize=9)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    with atomic_file(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return json_path, png_path
