"""Teacher-forced answer likelihoods and the CounterFact success rates built on them (ALGORITHM.md §7).

NLL(p, a) is the mean over a's tokens of -log P(a_j | p, a_<j), the answer with a leading
space. A request counts as edited (efficacy) when NLL(rewrite prompt, new) is below
NLL(rewrite prompt, true); paraphrases likewise; a neighbourhood prompt is kept
(specificity) when its true answer stays more likely than the new target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_alphaedit.prompts import target_token_ids
from lightning_alphaedit.requests import EditRequest


@torch.no_grad()
def answer_nll(model: torch.nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean token NLL of each answer after its prompt: (n,), float32, on the model's device."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = target_token_ids(tokenizer, answer)
            spans.append((len(prompt_ids), len(answer_ids)))
            rows.append(prompt_ids + answer_ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, t)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (b, t, V)
        log_probs = torch.log_softmax(logits, dim=-1)
        for i, (p, a) in enumerate(spans):
            # positions p-1 .. p+a-2 predict the answer tokens p .. p+a-1
            picked = log_probs[i, p - 1 : p + a - 1].gather(1, ids[i, p : p + a].to(device).unsqueeze(1))
            out.append(-picked.mean())
    return torch.stack(out)


def counterfact_success(model: torch.nn.Module, tokenizer, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
    """Per-request efficacy and generalization, per-prompt specificity (0/1 floats).

    Requests without a true target count for nothing (they are skipped).
    """
    requests = [r for r in requests if r.target_true]
    result: dict[str, torch.Tensor] = {}
    if not requests:
        return result
    rewrite = [r.text for r in requests]
    new = answer_nll(model, tokenizer, rewrite, [r.target_new for r in requests])
    true = answer_nll(model, tokenizer, rewrite, [r.target_true for r in requests])
    result["efficacy"] = (new < true).float()

    para = [(i, p) for i, r in enumerate(requests) for p in r.paraphrase_prompts]
    if para:
        owners = torch.tensor([i for i, _ in para], device=new.device)
        prompts = [p for _, p in para]
        hits = (
            answer_nll(model, tokenizer, prompts, [requests[i].target_new for i, _ in para])
            < answer_nll(model, tokenizer, prompts, [requests[i].target_true for i, _ in para])
        ).float()
        per_request = torch.zeros(len(requests), device=new.device).index_add_(0, owners, hits)
        counts = torch.zeros(len(requests), device=new.device).index_add_(0, owners, torch.ones_like(hits))
        result["generalization"] = per_request[counts > 0] / counts[counts > 0]

    neighbours = [(r, n) for r in requests for n in r.neighborhood_prompts]
    if neighbours:
        prompts = [n.prompt for _, n in neighbours]
        keep = answer_nll(model, tokenizer, prompts, [n.target for _, n in neighbours])
        moved = answer_nll(model, tokenizer, prompts, [r.target_new for r, _ in neighbours])
        result["specificity"] = (keep < moved).float()
    return result
