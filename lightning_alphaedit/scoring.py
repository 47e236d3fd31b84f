"""What a model says about an edit request: teacher-forced answer scores and generations.

Plain torch and transformers, no Lightning and no aggregation: each function returns one
value per prompt, and `lightning_alphaedit.metrics` turns them into the paper's figures
(docs/method.md §7). Teacher forcing reads the vocabulary only at the answer's positions
(`readout.logits_at`), so a 128k-token head costs a few rows per prompt, not the sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

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
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = _device(model)
    nll, accuracy, all_argmax = [], [], []
    for start in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            prompt_ids, answer_ids = tokenizer(prompt)["input_ids"], target_token_ids(tokenizer, answer)
            spans.append((len(prompt_ids), len(answer_ids)))
            rows.append(prompt_ids + answer_ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)  # (b, t)
        mask = torch.zeros_like(ids)
        read = torch.zeros_like(ids, dtype=torch.bool)
        answer_tokens = []
        for i, (row, (p, a)) in enumerate(zip(rows, spans)):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            read[i, p - 1 : p + a - 1] = True  # positions p-1 .. p+a-2 predict tokens p .. p+a-1
            answer_tokens.append(ids[i, p : p + a])
        logits = logits_at(model, targets, ids.to(device), mask.to(device), read.to(device)).float()  # (m, V)
        log_probs = torch.log_softmax(logits, dim=-1)
        wanted = torch.cat(answer_tokens).to(device)  # (m,), row-major like the read positions
        picked = log_probs.gather(1, wanted[:, None])[:, 0]  # (m,)
        hit = (logits.argmax(dim=-1) == wanted).float()  # (m,)
        for piece_nll, piece_hit in zip(picked.split([a for _, a in spans]), hit.split([a for _, a in spans])):
            nll.append(-piece_nll.mean())
            accuracy.append(piece_hit.mean())
            all_argmax.append(piece_hit.min())
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    stack = lambda xs: torch.stack(xs) if xs else empty  # noqa: E731
    return AnswerScores(nll=stack(nll), token_accuracy=stack(accuracy), all_argmax=stack(all_argmax))


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
