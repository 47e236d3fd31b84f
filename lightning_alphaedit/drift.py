"""How far an edited model has moved from the unedited one, on text it was not edited on.

AlphaEdit's claim is that preserved knowledge stays in place: the outputs of the edited
layers for preserved keys, the final hidden states, the next-token distributions. This
module records those quantities once on the unedited model (held-out corpus text) and
compares the current model with them, so no second copy of the model is ever held:

- per edited layer, ‖ΔW k0‖ / ‖W k0‖ over the held-out keys k0 (Frobenius over all of them);
- the relative shift of the final hidden states (the final norm's input), same ratio;
- KL(unedited ‖ edited) of the next-token distributions, mean over positions;
- the perplexity of the held-out text under the edited model (and under the unedited one).

The KL is computed on the unedited model's top-k tokens plus one bucket for the rest of the
vocabulary: storing k + 1 numbers per position instead of the vocabulary. Merging outcomes
can only lower a KL divergence, so this is a lower bound of the full KL, and equal to it
when k covers the vocabulary (tested).

Pure torch: no Lightning here.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torchmetrics.regression import KLDivergence
from torchmetrics.text import Perplexity

from lightning_alphaedit.hooks import capture_input
from lightning_alphaedit.metrics import RelativeChange
from lightning_alphaedit.targets import ModelTargets


@dataclass
class DriftConfig:
    """Held-out text on which drift from the unedited model is measured."""

    texts: int = 16
    """How many held-out documents (0 turns drift off). They come after the statistics sample
    in the statistics corpus, so no preserved key the projector was built from is reused."""
    max_length: int = 64
    """Tokens per document (longer ones are truncated)."""
    top_k: int = 256
    """Next-token probabilities stored per position for the KL (plus one bucket for the rest)."""
    batch_size: int = 8
    """Documents per forward pass."""


def _logits_and_hidden(model, targets: ModelTargets, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with capture_input(targets.final_norm) as hidden:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.float(), hidden.value.float()  # (b, t, V), (b, t, d)


def _coarse_log_probs(log_probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log P over the k tokens ``top`` (n, k) plus one bucket for the rest: (n, k + 1), float64
    (in float32, 1 - Σ p_top rounds to 0 when k covers almost all the mass)."""
    picked = log_probs.gather(1, top).double()  # (n, k)
    rest = torch.log1p(-picked.exp().sum(dim=1).clamp(max=1.0 - 1e-15))  # (n,) log(1 - Σ p_top)
    return torch.cat([picked, rest[:, None]], dim=1)


class DriftReference:
    """What the unedited model computes on held-out text; ``measure`` compares a model with it."""

    def __init__(
        self, targets: ModelTargets, tokenizer, layers: Sequence[int], texts: Sequence[str], config: DriftConfig
    ) -> None:
        """Record the reference on ``targets.model`` as it is now (call it before any edit)."""
        if not texts:
            raise ValueError("drift needs at least one held-out text")
        self.targets, self.tokenizer, self.layers, self.config = targets, tokenizer, list(layers), config
        self.texts = [t for t in texts if t.strip()]
        self.keys: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}  # per batch (n, d_in)
        self.outputs: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}  # per batch (n, d_out) W k0
        self.hidden: list[torch.Tensor] = []  # per batch (n, d)
        self.top: list[torch.Tensor] = []  # per batch (n, k) token ids
        self.coarse: list[torch.Tensor] = []  # per batch (n, k + 1) log-probs
        self.batches = list(self._tokenized())  # tokenized once, reused by every measure()
        perplexity = Perplexity(ignore_index=-100, sync_on_compute=False).to(self._device)
        for batch, real in self.batches:
            with ExitStack() as stack:
                captures = {l: stack.enter_context(capture_input(targets.projection(l))) for l in self.layers}
                logits, hidden = _logits_and_hidden(targets.model, targets, batch)
            for layer in self.layers:
                keys = captures[layer].value[real].float()  # (n, d_in)
                self.keys[layer].append(keys)
                self.outputs[layer].append(keys @ targets.linear_weight(layer).float().T)  # (n, d_out)
            self.hidden.append(hidden[real])
            log_probs = torch.log_softmax(logits[real], dim=-1)  # (n, V)
            top = log_probs.topk(min(config.top_k, log_probs.shape[-1]), dim=-1).indices  # (n, k)
            self.top.append(top)
            self.coarse.append(_coarse_log_probs(log_probs, top))
            perplexity.update(*self._shifted(logits, batch))
        self.perplexity = float(perplexity.compute())

    @property
    def _device(self) -> torch.device:
        return next(self.targets.model.parameters()).device

    def _tokenized(self):
        size = self.config.batch_size
        for start in range(0, len(self.texts), size):
            batch = self.tokenizer(
                self.texts[start : start + size], truncation=True, max_length=self.config.max_length,
                padding=True, return_tensors="pt",
            ).to(self._device)
            yield batch, batch["attention_mask"].bool()  # (b, t) padding excluded

    def _shifted(self, logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (b, t-1)
        return logits[:, :-1], labels

    @torch.no_grad()
    def update_leakage(self, layer: int, change: torch.Tensor) -> float:
        """‖ΔW k0‖ / ‖W0 k0‖ (Frobenius over every held-out key) of one update ``change``
        (d_out, d_in): how much a single edit batch moves the outputs on preserved text."""
        moved = sum(float((keys @ change.float().T).square().sum()) for keys in self.keys[layer])  # Σ ‖ΔW k0‖²
        unedited = sum(float(out.square().sum()) for out in self.outputs[layer])  # Σ ‖W0 k0‖²
        return (moved / unedited) ** 0.5 if unedited > 0 else float("nan")

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """Drift of ``targets.model`` as it is now, from the reference: a flat dict of floats.

        Computed in this process alone (its metrics never synchronise), so that one rank of a
        multi-process run measures for all."""
        targets = self.targets
        device = self._device
        output_change = {l: RelativeChange(sync_on_compute=False).to(device) for l in self.layers}
        hidden_shift = RelativeChange(sync_on_compute=False).to(device)
        kl = KLDivergence(log_prob=True, sync_on_compute=False).to(device)
        perplexity = Perplexity(ignore_index=-100, sync_on_compute=False).to(device)
        for index, (batch, real) in enumerate(self.batches):
            for layer in self.layers:
                edited = self.keys[layer][index] @ targets.linear_weight(layer).float().T  # (n, d_out)
                output_change[layer].update(edited, self.outputs[layer][index])
            logits, hidden = _logits_and_hidden(targets.model, targets, batch)
            hidden_shift.update(hidden[real], self.hidden[index])
            log_probs = torch.log_softmax(logits[real], dim=-1)  # (n, V)
            kl.update(self.coarse[index], _coarse_log_probs(log_probs, self.top[index]))
            perplexity.update(*self._shifted(logits, batch))
        result = {f"output_change_layer{l}": float(m.compute()) for l, m in output_change.items()}
        result.update(
            hidden_shift=float(hidden_shift.compute()),
            kl=float(kl.compute()),
            perplexity=float(perplexity.compute()),
            perplexity_unedited=self.perplexity,
        )
        return result
