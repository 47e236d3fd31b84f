"""FT-L: constrained fine-tuning of the edited layers, the usual fine-tuning baseline of the
editing literature (ROME's "FT+L", the paper's "FT").

No target values, no keys, no closed form: Adam on the edited output projections' weights,
minimising the new target's NLL after each rewrite prompt, with every weight's change kept
inside an L-infinity ball of radius ``norm_constraint`` around its value before the batch
(`algebra.clamp_to_ball`). Plain torch; the ``NullSpaceUpdate`` callback runs it as the
``ft`` method inside the same all-or-nothing batch transaction as the other methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_alphaedit.algebra import clamp_to_ball
from lightning_alphaedit.prompts import encode_prompts, target_token_ids
from lightning_alphaedit.readout import logits_at
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets


@dataclass
class FineTuneConfig:
    """Hyperparameters of the ``ft`` method (ROME's constrained fine-tuning defaults for GPT-2 XL)."""

    steps: int = 25
    """Adam steps per edit batch at most."""
    lr: float = 5e-4
    """Adam learning rate on the edited weights."""
    norm_constraint: float = 5e-4
    """Radius of the L-infinity ball around the weights before the batch (every entry's change)."""
    early_stop_loss: float = 1e-2
    """Stop once the batch's mean target NLL is below this."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"finetune.steps must be >= 1, got {self.steps}")
        if not self.lr > 0 or not self.norm_constraint > 0:
            raise ValueError(f"finetune.lr and finetune.norm_constraint must be > 0, got {self.lr}, {self.norm_constraint}")


@dataclass
class FineTuneResult:
    loss: float  # the batch's mean target NLL at the last step
    initial_loss: float  # ... before the first step
    steps: int  # Adam steps taken


def target_nll(model: torch.nn.Module, tokenizer, targets: ModelTargets, requests: Sequence[EditRequest]) -> torch.Tensor:
    """Mean over requests of the mean token NLL of the new target after the rewrite prompt (u,),
    differentiable in the model's weights."""
    device = next(model.parameters()).device
    target_ids = [target_token_ids(tokenizer, r.target_new) for r in requests]
    batch = encode_prompts(
        tokenizer, [r.prompt for r in requests], [r.subject for r in requests], [ids[:-1] for ids in target_ids]
    ).to(device)
    labels = torch.full_like(batch.input_ids, -100)  # (u, t): the positions that predict a target token
    for row, ids in enumerate(target_ids):
        end = int(batch.lengths[row])
        labels[row, end - len(ids) : end] = torch.tensor(ids, device=device)
    read = labels != -100  # (u, t)
    log_probs = torch.log_softmax(logits_at(model, targets, batch.input_ids, batch.attention_mask, read).float(), -1)
    picked = log_probs.gather(1, labels[read].unsqueeze(1)).squeeze(1)  # (m,) row-major like read
    counts = read.sum(1)  # (u,)
    owner = torch.repeat_interleave(torch.arange(len(requests), device=device), counts)
    return -torch.zeros(len(requests), dtype=picked.dtype, device=device).index_add(0, owner, picked) / counts  # (u,)


def finetune(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    config: FineTuneConfig,
) -> FineTuneResult:
    """Fine-tune the output projections of ``layers`` on ``requests``, in place."""
    weights = [targets.weight(layer) for layer in layers]
    start = [w.detach().clone() for w in weights]
    trainable = [w.requires_grad for w in weights]
    optimizer = torch.optim.Adam(weights, lr=config.lr)
    initial, value, steps = None, None, 0
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for step in range(config.steps + 1):
                optimizer.zero_grad()
                loss = target_nll(model, tokenizer, targets, requests).mean()
                value = float(loss.detach())
                initial = value if initial is None else initial
                if step == config.steps or value < config.early_stop_loss:
                    break
                loss.backward()
                optimizer.step()
                steps += 1
                with torch.no_grad():
                    for w, w0 in zip(weights, start):
                        w.copy_(w0 + clamp_to_ball(w - w0, config.norm_constraint))
    finally:
        for w, flag in zip(weights, trainable):
            w.requires_grad_(flag)
            w.grad = None
    return FineTuneResult(loss=value, initial_loss=initial, steps=steps)
