"""Target values z = h0 + δ: the value-vector optimization of ROME/MEMIT/AlphaEdit.

For each request a free vector δ is added to the output of the last edited block at the
subject's last token, and optimised so that the model predicts the new target after the
rewrite prompt and its context-prefixed variants, while a KL term keeps the subject's
"{subject} is a" distribution near the original. The δ of different requests are
independent, so the requests of a batch are optimised in one batched forward pass (or in
passes of ``requests_per_pass`` requests, which bounds the memory), each with its own early
stop and norm clamp (Adam is element-wise, so each row follows the trajectory it would
follow alone). With ``early_stop: most_probable`` a request also stops once its new target is
the argmax at every target position of every rewrite prompt (most-probable early stopping).

What each step costs is kept to what changes with δ (measured on SmolLM2-135M, 2 CPU cores,
20 requests with 2 context prefixes: 61.5 s -> 44.2 s for the length groups alone):
- the blocks up to the edited one run once per batch and are replayed (`replay_blocks`);
- the positions before the subject's last token run once per batch too: every step runs the
  rest of each row against their cached keys and values (`lightning_alphaedit.prefix_cache`);
- the LM head runs only at the positions the loss reads (`readout.logits_at`);
- requests that stopped early leave the batch;
- short rows (bare and KL prompts) and long rows (context-prefixed) run as separate passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from transformers import DynamicCache

from lightning_alphaedit.chat import chat_answer_ids
from lightning_alphaedit.hooks import (
    add_to_output,
    capture_output,
    replay_blocks,
    stop_after,
)
from lightning_alphaedit.prefix_cache import PrefixCache, cache_argument
from lightning_alphaedit.prefix_cache import unsupported as prefix_unsupported
from lightning_alphaedit.prompts import encode_prompts, target_token_ids
from lightning_alphaedit.readout import logits_at
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets


EARLY_STOP_RULES = (None, "most_probable")


@dataclass
class ValueOptimizationConfig:
    """Hyperparameters of the value-vector optimization (docs/method.md §4)."""

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
    early_stop: str | None = None
    """An extra stopping rule. ``most_probable`` (most-probable early stopping): a request also
    stops once its new target is the argmax at every teacher-forced target position of every
    rewrite prompt (bare and context-prefixed), after ``extra_steps`` more such steps. Stopping
    there instead of driving the target's probability towards 1 saves steps and over-fits less.
    null: only the loss threshold and the step cap."""
    extra_steps: int = 0
    """With ``early_stop: most_probable``: the steps at which the target is most probable are
    counted (cumulatively, not necessarily in a row); the request stops at the
    ``extra_steps + 1``-th. 0 stops at the first."""
    kl_prompt: str = "{} is a"
    """Template of the essence (KL) prompt."""
    answer_end: str = ""
    """Text the new target is followed by in the loss of the prompts that are not chat turns, e.g.
    "." or "\n": the edit then also teaches the answer to end after the target, which is what a
    free answer is judged on (a chat turn ends with the template's end-of-turn token anyway).
    "" (the paper's way): the target alone, and nothing says where the answer stops."""
    reuse_lower_layers: bool = True
    """Compute the blocks up to the edited one once per batch instead of at every step (they do
    not depend on δ; same result, about a fifth less time). Off: recompute them every step."""
    prefix_cache: bool = True
    """Run each step only over the positions δ can change (from the subject's last token on),
    attending to the keys and values of the earlier positions computed once per batch. Same
    result up to float round-off. Off, or on a model that cannot take it (one warning says
    why): every step runs the whole rows."""
    requests_per_pass: int | None = None
    """Requests optimised together in one batched pass; the batch is run in passes of at most
    this many, one after the other. None: the whole batch at once. Memory grows with it
    (SmolLM2-135M, five context prefixes, float32: about 0.19 GB per request on a CPU, more on a
    GPU); the result does not depend on it (each δ follows its own trajectory)."""

    def __post_init__(self) -> None:
        if self.num_grad_steps < 1:
            raise ValueError("values.num_grad_steps must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):  # lr 0 would edit nothing and call it applied
            raise ValueError(f"values.lr must be a positive finite number, got {self.lr!r}")
        if self.requests_per_pass is not None and self.requests_per_pass < 1:
            raise ValueError(f"values.requests_per_pass must be >= 1 or null, got {self.requests_per_pass}")
        if self.early_stop not in EARLY_STOP_RULES:
            raise ValueError(f"values.early_stop must be one of {EARLY_STOP_RULES}, got {self.early_stop!r}")
        if self.extra_steps < 0:
            raise ValueError(f"values.extra_steps must be >= 0, got {self.extra_steps}")
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
    reached: torch.Tensor  # (u,) bool: the new target is the argmax at every target position of every rewrite prompt


def optimize_values(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layer: int,
    context_templates: Sequence[str],
    config: ValueOptimizationConfig,
    chat: bool | Sequence[bool] = False,
) -> ValueResult:
    """Optimise one δ per request at block ``layer``; returns z = h0 + δ.

    Runs the requests in passes of ``config.requests_per_pass`` (all at once when None). After a
    template that is a chat rendering (``chat``: one flag for all, or one per template) the new
    target is the assistant's whole turn (`lightning_alphaedit.chat.chat_answer_ids`) instead of a
    continuation with a leading space.
    """
    size = config.requests_per_pass or len(requests)
    if len(requests) <= size:
        return _optimize_pass(model, tokenizer, targets, requests, layer, context_templates, config, chat)
    passes = [
        _optimize_pass(model, tokenizer, targets, requests[i : i + size], layer, context_templates, config, chat)
        for i in range(0, len(requests), size)
    ]
    return ValueResult(*(torch.cat([getattr(p, f.name) for p in passes]) for f in fields(ValueResult)))


def _optimize_pass(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layer: int,
    context_templates: Sequence[str],
    config: ValueOptimizationConfig,
    chat: bool | Sequence[bool] = False,
) -> ValueResult:
    """One batched pass over ``requests`` (every δ optimised together)."""
    device = next(model.parameters()).device
    u, c = len(requests), len(context_templates)
    chat = [chat] * c if isinstance(chat, bool) else list(chat)
    if len(chat) != c:
        raise ValueError(f"{len(chat)} chat flags for {c} context templates")
    answers = {(r.target_new, flag) for r in requests for flag in chat}
    answer_ids = {
        (t, flag): chat_answer_ids(tokenizer, t) if flag else target_token_ids(tokenizer, t, config.answer_end)
        for t, flag in answers
    }
    target_ids = [answer_ids[r.target_new, flag] for r in requests for flag in chat]  # (u*c) one per rewrite row

    # Rows: u*c rewrite prompts (context + prompt + target[:-1]), then u KL prompts.
    templates = [ctx.replace("{}", r.prompt) for r in requests for ctx in context_templates]
    templates += [config.kl_prompt for _ in requests]
    subjects = [r.subject for r in requests for _ in context_templates] + [r.subject for r in requests]
    suffixes = [ids[:-1] for ids in target_ids] + [[] for _ in requests]
    batch = encode_prompts(tokenizer, templates, subjects, suffixes).to(device)
    owner = torch.arange(u, device=device).repeat_interleave(c)  # (u*c,) request of each rewrite row
    row_owner = torch.cat([owner, torch.arange(u, device=device)])  # (u*c + u,)

    # Labels: a row is prompt + target[:-1], so its last len(target) positions (the prompt's
    # last token onwards) are the ones whose logits predict the target tokens.
    labels = torch.full_like(batch.input_ids, -100)  # (rows, t)
    for row in range(u * c):
        ids = target_ids[row]
        end = int(batch.lengths[row])
        labels[row, end - len(ids) : end] = torch.tensor(ids, device=device)
    # Where the loss reads logits: the label positions of rewrite rows, the subject of KL rows.
    read = labels != -100  # (rows, t)
    read[torch.arange(u * c, u * c + u, device=device), batch.subject_last[u * c :]] = True
    rows_of = [torch.cat([torch.arange(i * c, (i + 1) * c), torch.tensor([u * c + i])]).to(device) for i in range(u)]

    block = targets.block(layer)
    lower = [targets.block(i) for i in range(layer + 1)]
    # One pass over the whole rows, δ = 0: the edited block's output (blocks 0..layer do not
    # depend on δ, so it is replayed at every step) and, with the prefix cache, every block's
    # keys and values before the subject's last token, plus the final norm's output at the read
    # positions to check the cached path against.
    prefix, why_not = None, None
    if config.prefix_cache:
        why_not = prefix_unsupported(model, int(batch.lengths.max()))
    raw = {}
    record = block.register_forward_hook(lambda module, args, output: raw.__setitem__("output", output))
    try:
        with torch.no_grad(), capture_output(block) as below:
            if config.prefix_cache and why_not is None:
                cache, argument = DynamicCache(), cache_argument(model)
                with capture_output(targets.final_norm) as top, stop_after(targets.final_norm):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **{argument: cache, "use_cache": True})
                end = torch.where(read, torch.arange(read.shape[1], device=device), -1).max(1).values + 1  # (rows,)
                prefix = PrefixCache.from_cache(
                    cache, batch.input_ids.shape[1], batch.subject_last, end, batch.input_ids, argument
                )
                if prefix is None:
                    why_not = "its cache does not hold one key/value tensor per block"
                reference = top.value[read]  # (n, d) row-major over the rows
                del cache, top
            else:
                with stop_after(block):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        record.remove()
    if why_not is not None:
        warnings.warn(f"values.prefix_cache: {type(model).__name__} runs the full rows ({why_not})", stacklevel=2)
    read_index = torch.full(read.shape, -1, dtype=torch.long, device=device)  # (rows, t)
    read_index[read] = torch.arange(int(read.sum()), device=device)
    param_dtype = next(model.parameters()).dtype

    def step_logits(rows: torch.Tensor, width: int, check: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at the read positions of ``rows``, row-major in the order of ``rows``; with
        ``check`` also the final norm's output there (to compare with the whole-row pass)."""
        # Rows differ a lot in length (bare prompt, context-prefixed prompts, KL prompt): run
        # short and long rows as separate passes, each padded only to its own width.
        span = prefix.end[rows] - prefix.start[rows] if prefix is not None else batch.lengths[rows]
        parts, hidden, order = [], [], []
        for group in _length_groups(span):
            members = rows[group]
            if prefix is None:
                w = int(batch.lengths[members].max())
                inputs = {"input_ids": batch.input_ids[members, :w], "attention_mask": batch.attention_mask[members, :w]}
                lower_output, reads = below.value[members, :w], read[members, :w]
                at, offset = batch.subject_last[members], torch.zeros_like(members)
            else:
                inputs = prefix.inputs(members, param_dtype)
                lower_output = prefix.suffix(members, below.value)
                reads = prefix.suffix(members, read) & prefix.valid(members)
                at, offset = torch.zeros_like(members), prefix.start[members]
            replay = replay_blocks(lower, lower_output, raw["output"]) if config.reuse_lower_layers else nullcontext()
            observe = capture_output(targets.final_norm) if check else nullcontext(None)
            with replay, add_to_output(block, delta[row_owner[members]].to(param_dtype), at), observe as top:
                parts.append(logits_at(model, targets, inputs.pop("input_ids"), inputs.pop("attention_mask"), reads, **inputs))
            if check:
                hidden.append(top.value[reads])
            where = torch.nonzero(reads)  # (n, 2) read positions, row-major
            order.append(group[where[:, 0]] * width + offset[where[:, 0]] + where[:, 1])  # place in the rows' order
        order = torch.cat(order).argsort()
        return torch.cat(parts)[order], torch.cat(hidden)[order] if check else None

    bare = torch.arange(0, u * c, c, device=device)  # (u,) the rows without a context prefix
    h0 = below.value[bare, batch.subject_last[bare]].float()  # (u, d) original value at the subject
    h0_norm = h0.norm(dim=1)  # (u,)

    delta = torch.zeros_like(h0, requires_grad=True)  # (u, d)
    optimizer = torch.optim.Adam([delta], lr=config.lr)
    active = torch.ones(u, dtype=torch.bool, device=device)
    steps = torch.zeros(u, dtype=torch.long, device=device)
    most_probable_steps = torch.zeros(u, dtype=torch.long, device=device)  # (u,) steps with the target the argmax
    final_loss = torch.zeros(u, dtype=torch.float32, device=device)
    final_nll = torch.zeros(u, dtype=torch.float32, device=device)
    final_reached = torch.zeros(u, dtype=torch.bool, device=device)
    kl_initial = None  # (u, V) the unedited KL distributions, from the first step
    for step in range(config.num_grad_steps):
        # Only requests still optimising are run: a stopped request's loss cannot change.
        live = torch.nonzero(active).squeeze(1)  # (a,)
        a = live.numel()
        rows = torch.cat([rows_of[i] for i in live.tolist()])  # (a*(c+1),): c rewrite rows, then the KL row
        width = int(batch.lengths[rows].max())
        optimizer.zero_grad()
        logits, hidden = step_logits(rows, width, check=prefix is not None and step == 0)
        if hidden is not None and not _agrees(hidden, reference[read_index[rows, :width][read[rows, :width]]]):
            warnings.warn(
                f"values.prefix_cache: on {type(model).__name__} the cached rows differ from the whole rows; "
                "running the whole rows", stacklevel=2,
            )
            prefix = None
            logits, _ = step_logits(rows, width)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        counts = read[rows, :width].sum(1).view(a, c + 1)  # (a, c+1) positions read per row
        rewrite_mask = torch.ones(a, c + 1, dtype=torch.bool, device=device)
        rewrite_mask[:, c] = False
        is_rewrite = torch.repeat_interleave(rewrite_mask.flatten(), counts.flatten())  # (read positions,)
        wanted = labels[rows, :width][read[rows, :width]][is_rewrite]  # (rewrite positions,)
        picked = log_probs[is_rewrite].gather(1, wanted.unsqueeze(1)).squeeze(1)
        token_owner = torch.repeat_interleave(torch.arange(a * c, device=device), counts[:, :c].flatten())
        per_prompt = -torch.zeros(a * c, dtype=picked.dtype, device=device).index_add(0, token_owner, picked) / counts[:, :c].flatten()
        nll = per_prompt.view(a, c).mean(1)  # (a,) mean over prompts of the mean target-token NLL
        hit = (log_probs[is_rewrite].argmax(-1) == wanted).long()  # (rewrite positions,)
        hits = torch.zeros(a * c, dtype=torch.long, device=device).index_add(0, token_owner, hit)  # (a*c,)
        reached = (hits == counts[:, :c].flatten()).view(a, c).all(1)  # (a,) every target token on top

        kl_log_probs = log_probs[~is_rewrite]  # (a, V) one read position per KL row
        if kl_initial is None:
            kl_initial = kl_log_probs.detach()
        initial = kl_initial[live]
        kl = (initial.exp() * (initial - kl_log_probs)).sum(-1)  # (a,) KL(p_initial || p_now)
        decay = config.weight_decay * delta[live].norm(dim=1) / h0_norm[live] ** 2  # (a,)
        loss = nll + config.kl_factor * kl + decay  # (a,)
        final_loss[live], final_nll[live], final_reached[live] = loss.detach(), nll.detach(), reached

        going = loss.detach() >= config.early_stop_loss  # (a,)
        if config.early_stop == "most_probable":
            most_probable_steps[live] += reached.long()
            going &= most_probable_steps[live] <= config.extra_steps
        active[live] = going
        if step == config.num_grad_steps - 1 or not active.any():
            break
        (loss * going).sum().backward()
        frozen = delta.detach()[~active].clone()
        optimizer.step()
        steps += active.long()
        with torch.no_grad():
            delta[~active] = frozen  # stopped requests keep their δ (Adam's momentum would move it)
            max_norm = config.clamp_norm_factor * h0_norm  # (u,)
            scale = (max_norm / delta.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
            delta.mul_(scale.unsqueeze(1))

    delta = delta.detach()
    return ValueResult(
        targets=h0 + delta,
        initial=h0,
        loss=final_loss,
        nll=final_nll,
        steps=steps,
        reached=final_reached,
    )


def _agrees(cached: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether the cached path's hidden states equal the whole rows' up to round-off."""
    if cached.shape != whole.shape:
        return False
    tolerance = max(1e-4, 8 * torch.finfo(whole.dtype).eps)
    scale = whole.abs().max().clamp(min=1e-6)
    return bool(((cached - whole).abs().max() <= tolerance * scale).item())


def _length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices of ``lengths`` split into at most two groups (short, long) when that saves at
    least a fifth of the padded tokens; else one group."""
    order = lengths.argsort()
    sorted_lengths = lengths[order]
    n = len(lengths)
    whole = n * int(sorted_lengths[-1])
    best, split = whole, n
    for k in range(1, n):  # the first k (shortest) rows in one pass, the rest in another
        cost = k * int(sorted_lengths[k - 1]) + (n - k) * int(sorted_lengths[-1])
        if cost < best:
            best, split = cost, k
    if best > 0.8 * whole:
        return [torch.arange(n, device=lengths.device)]
    return [order[:split].sort().values, order[split:].sort().values]
