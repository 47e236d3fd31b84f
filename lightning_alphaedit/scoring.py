"""What a model says about an edit request: teacher-forced answer scores and generations.

Plain torch and transformers, no Lightning and no aggregation: each function returns one
value per prompt, and `lightning_alphaedit.metrics` turns them into the paper's figures
(docs/method.md §7). Teacher forcing reads the vocabulary only at the answer's positions
(`readout.logits_at`), so a 128k-token head costs a few rows per prompt, not the sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from lightning_alphaedit.prefix_cache import PrefixCache, cache_argument
from lightning_alphaedit.prefix_cache import unsupported as prefix_unsupported
from lightning_alphaedit.prompts import seeded, target_token_ids
from lightning_alphaedit.readout import logits_at
from lightning_alphaedit.targets import ModelTargets


@dataclass
class AnswerScores:
    """Teacher-forced scores of one answer after each of n prompts."""

    nll: torch.Tensor  # (n,) mean over the answer's tokens of -log P(a_j | p, a_<j)
    token_accuracy: torch.Tensor  # (n,) fraction of the answer's tokens that are the argmax (zsRE)
    all_argmax: torch.Tensor  # (n,) 1 when every answer token is the argmax, else 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def score_answers(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
) -> AnswerScores:
    """Score ``answers[i]`` (with a leading space) after ``prompts[i]``, batched and right-padded."""
    return score_answer_sets(model, tokenizer, targets, prompts, [answers], batch_size)[0]


@torch.no_grad()
def score_answer_sets(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    prompts: Sequence[str],
    answer_sets: Sequence[Sequence[str]],
    batch_size: int = 32,
) -> list[AnswerScores]:
    """Score each set's ``answers[i]`` after ``prompts[i]``: one `AnswerScores` per set.

    The protocol scores a prompt for two answers (the new target and the true one). Each prompt
    runs once: its last position gives every answer's first token, and an answer's further tokens
    run against the prompt's keys and values (`lightning_alphaedit.prefix_cache`), so a second
    answer costs its own tokens only. The first batch is also scored row by row in full; a model
    on which the two differ (or that cannot take the cache) is scored in full, with a warning.
    """
    for answers in answer_sets:
        if len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = _device(model)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    answer_ids = [[target_token_ids(tokenizer, a) for a in answers] for answers in answer_sets]
    longest = max((len(p) + max(len(ids[i]) for ids in answer_ids) for i, p in enumerate(prompt_ids)), default=0)
    why_not = prefix_unsupported(model, longest) if prompts and len(answer_sets) > 1 else "one answer per prompt"
    pieces: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in answer_sets]  # per set: (log p, hit) per answer
    for start in range(0, len(prompts), batch_size):
        batch = prompt_ids[start : start + batch_size]
        answers = [ids[start : start + batch_size] for ids in answer_ids]
        if why_not is None:
            scored = _score_on_prompt_cache(model, tokenizer, targets, batch, answers)
            if start == 0:
                whole = [_score_whole_rows(model, tokenizer, targets, batch, ids) for ids in answers]
                tolerance = max(1e-3, 16 * torch.finfo(next(model.parameters()).dtype).eps)
                if not all(_same_scores(a, b, tolerance) for s, w in zip(scored, whole) for a, b in zip(s, w)):
                    warnings.warn(f"scoring: on {type(model).__name__} answers scored on the prompt's cache differ "
                                  "from whole rows; scoring whole rows", stacklevel=2)
                    why_not, scored = "it differed", whole
        else:
            scored = [_score_whole_rows(model, tokenizer, targets, batch, ids) for ids in answers]
        for collected, rows in zip(pieces, scored):
            collected += rows
    results = []
    for collected in pieces:
        nll = [-log_p.mean() for log_p, _ in collected]
        accuracy = [hit.float().mean() for _, hit in collected]
        all_argmax = [hit.float().min() for _, hit in collected]
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        stack = lambda xs: torch.stack(xs) if xs else empty  # noqa: E731
        results.append(AnswerScores(nll=stack(nll), token_accuracy=stack(accuracy), all_argmax=stack(all_argmax)))
    return results


def _padded(tokenizer, rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (b, t) of right-padded rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)  # (b, t)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(list(row), dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _score_whole_rows(model, tokenizer, targets, prompts, answers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row (log p of each answer token, whether it is the argmax), prompt + answer in one row."""
    device = _device(model)
    ids, mask = _padded(tokenizer, [p + a for p, a in zip(prompts, answers)], device)
    read = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        read[i, len(p) - 1 : len(p) + len(a) - 1] = True  # positions p-1 .. p+a-2 predict tokens p .. p+a-1
    logits = logits_at(model, targets, ids, mask, read).float()  # (m, V), row-major
    wanted = torch.tensor([t for a in answers for t in a], device=device)  # (m,)
    return _per_row(logits, wanted, [len(a) for a in answers])


def _score_on_prompt_cache(model, tokenizer, targets, prompts, answer_sets) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Like `_score_whole_rows` for every answer set, the prompts run once."""
    device = _device(model)
    ids, mask = _padded(tokenizer, prompts, device)
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])] = True
    cache, argument = DynamicCache(), cache_argument(model)
    first = logits_at(model, targets, ids, mask, last, **{argument: cache, "use_cache": True}).float()  # (b, V)
    starts = torch.tensor([len(p) for p in prompts], device=device)  # (b,) each answer's first position
    dtype = next(model.parameters()).dtype
    scored = []
    for answers in answer_sets:
        rows, _ = _padded(tokenizer, [p + a for p, a in zip(prompts, answers)], device)
        ends = starts + torch.tensor([len(a) - 1 for a in answers], device=device)  # (b,) one past the last read
        prefix = PrefixCache.from_cache(cache, ids.shape[1], starts, ends, rows, argument)
        if prefix is None:
            raise RuntimeError("the prompt pass left no plain key/value cache")
        members = torch.nonzero(ends > starts).squeeze(1)  # answers of two tokens or more
        rest = None
        if members.numel():
            inputs = prefix.inputs(members, dtype)
            rest = logits_at(model, targets, inputs.pop("input_ids"), inputs.pop("attention_mask"),
                             prefix.valid(members), **inputs).float()  # (n, V) row-major over members
        # per row: the prompt's last position, then the answer's own positions
        order, taken = [], 0
        counts = {int(m): len(answers[int(m)]) - 1 for m in members}
        for i in range(len(prompts)):
            order.append(first[i : i + 1])
            if i in counts:
                order.append(rest[taken : taken + counts[i]])
                taken += counts[i]
        wanted = torch.tensor([t for a in answers for t in a], device=device)
        scored.append(_per_row(torch.cat(order), wanted, [len(a) for a in answers]))
    return scored


def _per_row(logits: torch.Tensor, wanted: torch.Tensor, lengths: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(1, wanted[:, None])[:, 0]  # (m,)
    hit = logits.argmax(dim=-1) == wanted  # (m,)
    return list(zip(picked.split(list(lengths)), hit.split(list(lengths))))


def _same_scores(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], tolerance: float) -> bool:
    """Two scorings of one answer agree up to round-off: log p of every token within ``tolerance`` nats."""
    return bool((a[0] - b[0]).abs().max() <= tolerance)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    include_prompt: bool = False,
    stop: Callable[[str], bool] | None = None,
) -> list[str]:
    """The continuation of each prompt (with the prompt when ``include_prompt``): greedy when ``top_k`` is None,
    else top-k sampling from a generator seeded with ``seed`` (the same texts on every run).

    ``max_length`` counts the prompt's tokens too (the fluency protocol: 100 tokens in all).
    Prompts are left-padded, as generation appends on the right. With ``stop``, a row stops
    once ``stop(its continuation so far)`` is true (an answer that has ended), which saves
    the tokens nobody reads.
    """
    device = _device(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs: list[str] = []
    try:
        with seeded(device, seed):
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                width = batch["input_ids"].shape[1]
                length = {"max_new_tokens": max_new_tokens} if max_length is None else {"max_length": max_length}
                # plain top-k sampling whatever the model's generation_config says (an instruct
                # model's default temperature and top-p would change the protocol)
                mode = {"do_sample": False} if top_k is None else {
                    "do_sample": True, "top_k": top_k, "top_p": 1.0, "temperature": 1.0
                }
                stopping = [_StopWhen(tokenizer, width, stop)] if stop is not None else None
                sampled = model.generate(**batch, **length, **mode, pad_token_id=_pad_id(tokenizer),
                                         stopping_criteria=StoppingCriteriaList(stopping or []))
                outputs += tokenizer.batch_decode(sampled[:, 0 if include_prompt else width :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


class _StopWhen(StoppingCriteria):
    """Per row: done once ``stop`` holds for the text generated after the prompt's ``width`` tokens."""

    def __init__(self, tokenizer, width: int, stop: Callable[[str], bool]) -> None:
        self.tokenizer, self.width, self.stop = tokenizer, width, stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([self.stop(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def starts_with_answer(continuation: str, answer: str) -> bool:
    """Generation-based success: the continuation, after leading space, begins with the answer
    as a whole word (so "Paris" is not matched by "Parisian")."""
    text, answer = continuation.lstrip(), answer.strip()
    return text.startswith(answer) and (len(text) == len(answer) or not text[len(answer)].isalnum())
