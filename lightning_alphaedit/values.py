"""Target values z = h0 + δ: the value-vector optimization of ROME/MEMIT/AlphaEdit.

For each request a free vector δ is added to the output of the last edited block at the
subject's last token, and optimised so that the model predicts the new target after the
rewrite prompt and its context-prefixed variants, while a KL term keeps the subject's
"{subject} is a" distribution near the original. The δ of different requests are
independent, so all requests of a batch are optimised in ONE batched forward pass, each
with its own early stop and norm clamp (Adam is element-wise, so each row follows the
trajectory it would follow alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_alphaedit.hooks import add_to_output, capture_output, stop_after
from lightning_alphaedit.prompts import encode_prompts, target_token_ids
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets


@dataclass
class ValueOptimizationConfig:
    """Hyperparameters of the value-vector optimization (ALGORITHM.md section 4)."""

    num_grad_steps: int = 25
    """Forward passes at most per batch (the last one only measures the loss)."""
    lr: float = 0.1
    """Adam learning rate on δ (``v_lr``)."""
    weight_decay: float = 0.5
    """Weight of ||δ|| / ||h0||² in the loss (``v_weight_decay``)."""
    clamp_norm_factor: float = 0.75
    """||δ|| is clamped to this factor times ||h0|| after every step."""
    kl_factor: float = 0.0625
    """Weight of KL(p_initial || p_now) at the subject of the "{subject} is a" prompt."""
    early_stop_loss: float = 5e-2
    """A request stops optimising once its loss is below this."""
    kl_prompt: str = "{} is a"
    """Template of the essence (KL) prompt."""

    def __post_init__(self) -> None:
        if self.num_grad_steps < 1:
            raise ValueError("values.num_grad_steps must be >= 1")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError("values.kl_prompt must contain exactly one '{}'")


@dataclass
class ValueResult:
    """What the optimization produced for a batch of u requests."""

    targets: torch.Tensor  # (u, d) z = h0 + δ, float32
    initial: torch.Tensor  # (u, d) h0
    loss: torch.Tensor  # (u,) final loss per request
    nll: torch.Tensor  # (u,) final target NLL per request
    steps: torch.Tensor  # (u,) gradient steps taken per request


def optimize_values(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layer: int,
    context_templates: Sequence[str],
    config: ValueOptimizationConfig,
) -> ValueResult:
    """Optimise one δ per request at block ``layer``; returns z = h0 + δ."""
    device = next(model.parameters()).device
    u, c = len(requests), len(context_templates)
    target_ids = [target_token_ids(tokenizer, r.target_new) for r in requests]

    # Rows: u*c rewrite prompts (context + prompt + target[:-1]), then u KL prompts.
    templates = [ctx.replace("{}", r.prompt) for r in requests for ctx in context_templates]
    templates += [config.kl_prompt for _ in requests]
    subjects = [r.subject for r in requests for _ in context_templates] + [r.subject for r in requests]
    suffixes = [ids[:-1] for ids in target_ids for _ in context_templates] + [[] for _ in requests]
    batch = encode_prompts(tokenizer, templates, subjects, suffixes).to(device)
    owner = torch.arange(u, device=device).repeat_interleave(c)  # (u*c,) request of each rewrite row
    row_owner = torch.cat([owner, torch.arange(u, device=device)])  # (u*c + u,)

    # Labels: a row is prompt + target[:-1], so its last len(target) positions (the prompt's
    # last token onwards) are the ones whose logits predict the target tokens.
    labels = torch.full_like(batch.input_ids, -100)  # (rows, t)
    for row in range(u * c):
        ids = target_ids[row // c]
        end = int(batch.lengths[row])
        labels[row, end - len(ids) : end] = torch.tensor(ids, device=device)
    label_mask = labels[: u * c] != -100  # (u*c, t)
    kl_rows = torch.arange(u * c, u * c + u, device=device)
    kl_positions = batch.subject_last[u * c :]  # (u,)

    block = targets.block(layer)
    with torch.no_grad(), capture_output(block, batch.subject_last[: u * c : c]) as h, stop_after(block):
        bare = slice(0, u * c, c)
        model(input_ids=batch.input_ids[bare], attention_mask=batch.attention_mask[bare])
    h0 = h.value.float()  # (u, d) original value at the bare prompt's subject
    h0_norm = h0.norm(dim=1)  # (u,)

    delta = torch.zeros_like(h0, requires_grad=True)  # (u, d)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    active = torch.ones(u, dtype=torch.bool, device=device)
    steps = torch.zeros(u, dtype=torch.long, device=device)
    kl_initial = None
    param_dtype = next(model.parameters()).dtype
    for step in range(config.num_grad_steps):
        optimizer.zero_grad()
        with add_to_output(block, delta[row_owner].to(param_dtype), batch.subject_last):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (rows, t, V)
        log_probs = torch.log_softmax(logits[: u * c].float(), dim=-1)
        # labels sit at the positions whose logits predict them (no further shift)
        picked = torch.gather(log_probs, 2, labels[: u * c].clamp(min=0).unsqueeze(2)).squeeze(2)  # (u*c, t)
        per_prompt = -(picked * label_mask).sum(1) / label_mask.sum(1)  # (u*c,) mean target-token NLL
        nll = per_prompt.view(u, c).mean(1)  # (u,)

        kl_log_probs = torch.log_softmax(logits[kl_rows, kl_positions].float(), dim=-1)  # (u, V)
        if kl_initial is None:
            kl_initial = kl_log_probs.detach()
        # KL(p_initial || p_now), one value per request
        kl = (kl_initial.exp() * (kl_initial - kl_log_probs)).sum(-1)  # (u,)
        decay = config.weight_decay * delta.norm(dim=1) / h0_norm**2  # (u,)
        loss = nll + config.kl_factor * kl + decay  # (u,)

        active &= loss.detach() >= config.early_stop_loss
        if step == config.num_grad_steps - 1 or not active.any():
            break
        (loss * active).sum().backward()
        frozen = delta.detach()[~active].clone()
        optimizer.step()
        steps += active.long()
        with torch.no_grad():
            delta[~active] = frozen  # stopped requests keep their δ
            max_norm = config.clamp_norm_factor * h0_norm  # (u,)
            scale = (max_norm / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
            delta.mul_(scale.unsqueeze(1))

    delta = delta.detach()
    return ValueResult(
        targets=h0 + delta,
        initial=h0,
        loss=loss.detach(),
        nll=nll.detach(),
        steps=steps,
    )
