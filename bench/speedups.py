"""Each speed-up of the edit loop against its unoptimised path, on the same requests and seed.

    python bench/speedups.py                      # SmolLM2-135M, the first 10 CounterFact cases
    python bench/speedups.py --requests 20 --repeats 3

For every speed-up: the time of both paths (best of --repeats, same process, same inputs) and
how far their results are apart:
- value optimization with the blocks below the edited layer computed once per batch and
  replayed (``values.reuse_lower_layers``) vs recomputed at every step; compared on the edited
  weights after applying the batch (AlphaEdit, layers 4-8), relative Frobenius difference;
- the LM head only at the positions the loss reads (`readout.logits_at`) vs the full logits;
- keys read with the forward pass stopped after the layer vs a full forward pass;
- the AlphaEdit solve in the subspace form (r x r, symmetric) vs the reference's projector
  form (d_in x d_in general solve), in float32 and float64;
- statistics: tokens/s of the one-pass collection of all edited layers vs one pass per layer
  (the reference) vs a plain forward pass stopped at the last edited layer (the limit).

Needs ../shared/data and the cached demo assets (run the demo once). Writes JSON and Markdown
under --output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_alphaedit import algebra
from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.hooks import capture_input, stop_after
from lightning_alphaedit.keys import block_outputs, request_keys
from lightning_alphaedit.models import ModelConfig, load_model, load_tokenizer
from lightning_alphaedit.paths import write_text_atomic
from lightning_alphaedit.prompts import generate_context_templates
from lightning_alphaedit.readout import logits_at
from lightning_alphaedit.requests import read_requests
from lightning_alphaedit.statistics import StatisticsConfig, collect_key_moments, layer_statistics
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.update import SequentialEditor
from lightning_alphaedit.values import ValueOptimizationConfig, optimize_values

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
LAYERS = [4, 5, 6, 7, 8]


def best_of(repeats: int, work):
    """(fastest seconds, the last result)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return min(times), result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--texts", type=int, default=200, help="documents for the statistics timing")
    parser.add_argument("--output", type=Path, default=Path.home() / "lightning-alphaedit" / "bench" / "speedups")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig(name_or_path="smollm2-135m")
    tokenizer = load_tokenizer(config)
    model = load_model(config, tokenizer).eval().requires_grad_(False)
    targets = ModelTargets(model, config.templates)
    requests = read_requests(DATA)[: args.requests]
    templates = generate_context_templates(model, tokenizer, ["The", "Therefore", "Because", "I", "You"], 10, 0)
    statistics = StatisticsConfig(corpus="wikipedia-vital-en", sample_count=2000, max_length=64, batch_size=16, progress=False)
    corpus = load_corpus(statistics.corpus)
    moments = layer_statistics(model, tokenizer, targets, LAYERS, statistics, config.identity, corpus)
    original = {layer: targets.linear_weight(layer).detach().clone() for layer in LAYERS}
    rows = []

    # 1. value optimization: lower blocks replayed vs recomputed, judged on the edited weights
    edited = {}
    for reuse in (False, True):
        values_config = ValueOptimizationConfig(lr=0.5, reuse_lower_layers=reuse)
        seconds, result = best_of(args.repeats, lambda: optimize_values(
            model, tokenizer, targets, requests, LAYERS[-1], templates, values_config))
        editor = SequentialEditor(targets, LAYERS, moments)
        editor.apply_batch(
            result.targets,
            keys_at=lambda layer: request_keys(model, tokenizer, targets, requests, layer, templates),
            current_values=lambda: block_outputs(model, tokenizer, targets, requests, LAYERS[-1]),
        )
        edited[reuse] = {layer: targets.linear_weight(layer).detach().clone() for layer in LAYERS}
        for layer, weight in original.items():
            targets.set_linear_weight(layer, weight)
        rows.append({"speed-up": "values: lower blocks replayed" if reuse else "values: recomputed every step",
                     "seconds": seconds})
    rows[-1]["difference"] = max(relative(edited[True][l] - original[l], edited[False][l] - original[l]) for l in LAYERS)
    rows[-1]["compared"] = "edited weights' change, worst layer"

    # 2. the LM head at the read positions vs every position (one batch of rewrite prompts + targets)
    batch = tokenizer([r.text + " " + r.target_new for r in requests], return_tensors="pt", padding=True)
    read = batch["attention_mask"].bool()
    read[:, :-2] = False  # a couple of positions per row, like the value loss
    full_seconds, full = best_of(args.repeats, lambda: model(**batch, use_cache=False).logits[read])
    read_seconds, partial = best_of(args.repeats, lambda: logits_at(model, targets, batch["input_ids"], batch["attention_mask"], read))
    rows += [{"speed-up": "logits: full head", "seconds": full_seconds},
             {"speed-up": "logits: read positions only", "seconds": read_seconds,
              "difference": relative(partial, full), "compared": "logits"}]

    # 3. keys: stopped after the layer vs a full forward pass
    def full_forward_keys(layer: int) -> torch.Tensor:
        with capture_input(targets.projection(layer)) as keys:
            model(**tokenizer([r.text for r in requests], return_tensors="pt", padding=True), use_cache=False)
        return keys.value

    def stopped_keys(layer: int) -> torch.Tensor:
        encoded = tokenizer([r.text for r in requests], return_tensors="pt", padding=True)
        with capture_input(targets.projection(layer)) as keys, stop_after(targets.block(layer)):
            model(**encoded, use_cache=False)
        return keys.value

    seconds_full, keys_full = best_of(args.repeats, lambda: full_forward_keys(LAYERS[0]))
    seconds_stop, keys_stop = best_of(args.repeats, lambda: stopped_keys(LAYERS[0]))
    rows += [{"speed-up": f"keys (layer {LAYERS[0]}): full forward", "seconds": seconds_full},
             {"speed-up": f"keys (layer {LAYERS[0]}): stopped after the layer", "seconds": seconds_stop,
              "difference": relative(keys_stop, keys_full), "compared": "keys"}]

    # 4. the solve: projector form (reference) vs subspace form, per layer of one batch
    keys = request_keys(model, tokenizer, targets, requests, LAYERS[0], templates)  # (u, d_in)
    residuals = torch.randn(len(requests), targets.value_size(LAYERS[0]), generator=torch.Generator().manual_seed(0))
    c0 = moments[LAYERS[0]].mean()
    space64 = algebra.null_space(c0.double(), 2e-2)
    cache = keys.T.double() @ keys.double()  # a non-zero C_p
    reference_seconds, reference = best_of(args.repeats, lambda: algebra.alphaedit_delta(
        keys.double(), residuals.double(), space64.projector(), cache=cache, l2=10.0))
    for dtype in (torch.float64, torch.float32):
        space = space64.to(dtype=dtype)
        seconds, delta = best_of(args.repeats, lambda: algebra.alphaedit_delta(
            keys.to(dtype), residuals.to(dtype), space, cache=cache.to(dtype), l2=10.0, cache_in_subspace=False))
        rows.append({"speed-up": f"solve: subspace form, {str(dtype)[6:]}", "seconds": seconds,
                     "difference": relative(delta, reference), "compared": "delta vs projector form float64"})
    rows.append({"speed-up": "solve: projector form (reference), float64", "seconds": reference_seconds})

    # 5. statistics: tokens/s
    texts = corpus.texts[: args.texts]
    tokens = int(sum(min(64, len(tokenizer(t)["input_ids"])) for t in texts))
    one_pass, _ = best_of(1, lambda: collect_key_moments(model, tokenizer, targets, LAYERS, texts, 64, batch_size=16))
    per_layer, _ = best_of(1, lambda: [collect_key_moments(model, tokenizer, targets, [l], texts, 64, batch_size=16) for l in LAYERS])

    def plain_forward() -> None:
        for start in range(0, len(texts), 16):
            encoded = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True, truncation=True, max_length=64)
            with torch.no_grad(), stop_after(targets.block(LAYERS[-1])):
                model(**encoded, use_cache=False)

    limit, _ = best_of(1, plain_forward)
    rows += [{"speed-up": "statistics: one pass per layer (reference)", "seconds": per_layer, "tokens_per_second": tokens / per_layer},
             {"speed-up": "statistics: one pass, all layers", "seconds": one_pass, "tokens_per_second": tokens / one_pass},
             {"speed-up": "statistics: plain forward to the last layer (limit)", "seconds": limit, "tokens_per_second": tokens / limit}]

    lines = [f"SmolLM2-135M, {args.requests} CounterFact requests, layers 4-8, {torch.get_num_threads()} threads, "
             f"best of {args.repeats}; statistics over {len(texts)} documents ({tokens} tokens).", "",
             "| path | seconds | tokens/s | difference from the unoptimised path |", "|---|---|---|---|"]
    for row in rows:
        difference = f"{row['difference']:.1e} ({row['compared']})" if "difference" in row else ""
        rate = f"{row['tokens_per_second']:.0f}" if "tokens_per_second" in row else ""
        lines.append(f"| {row['speed-up']} | {row['seconds']:.3f} | {rate} | {difference} |")
    text = "\n".join(lines) + "\n"
    args.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output / "speedups.md", text)
    write_text_atomic(args.output / "speedups.json", json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
