"""Turning edit requests into token batches, with the subject's last token located.

Every quantity of the method is read "at the last token of the subject" of a prompt. The
position is found from the tokenizer's character offsets (the token covering the
subject's last character), so it holds whatever the tokenizer merges across the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """A right-padded batch of prompts and where things are in it."""

    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    subject_last: torch.Tensor  # (b,) index of the subject's last token
    lengths: torch.Tensor  # (b,) real tokens per row
    subject_first: torch.Tensor  # (b,) index of the subject's first token

    def to(self, device: torch.device | str) -> PromptBatch:
        fields = (self.input_ids, self.attention_mask, self.subject_last, self.lengths, self.subject_first)
        return PromptBatch(*(t.to(device) for t in fields))


def target_token_ids(tokenizer, target: str, end: str = "") -> list[int]:
    """Token ids of an answer as it continues a prompt: a leading space, no BOS; ``end`` (e.g.
    ".") follows the answer, tokenized with it as the model would write it."""
    ids = tokenizer(" " + target.strip() + end, add_special_tokens=False)["input_ids"]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def encode_prompts(
    tokenizer,
    templates: Sequence[str],
    subjects: Sequence[str],
    suffix_ids: Sequence[Sequence[int]] | None = None,
) -> PromptBatch:
    """Fill each template's ``{}`` with its subject, tokenize, append ``suffix_ids`` (e.g. target tokens).

    Templates may carry a context prefix before the prompt; the subject must occur exactly
    once as ``{}``.
    """
    if len(templates) != len(subjects):
        raise ValueError(f"{len(templates)} templates but {len(subjects)} subjects")
    suffix_ids = suffix_ids if suffix_ids is not None else [()] * len(templates)
    rows, firsts, lasts = [], [], []
    for template, subject, suffix in zip(templates, subjects, suffix_ids):
        if template.count("{}") != 1:
            raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}'")
        start = template.index("{}")
        text = template.replace("{}", subject)
        subject_end = start + len(subject)
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        covering = [i for i, (a, b) in enumerate(offsets) if a < subject_end and b > start and b > a]
        if not covering:
            raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
        firsts.append(covering[0])
        lasts.append(covering[-1])
        rows.append(list(ids) + list(suffix))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, t)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    lengths = attention_mask.sum(1)
    return PromptBatch(input_ids, attention_mask, torch.tensor(lasts), lengths, torch.tensor(firsts))


@torch.no_grad()
@contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with every random generator it can touch seeded with ``seed``, and the
    caller's generator states restored afterwards (a forked RNG: nothing global changes)."""
    accelerators = [] if device.type == "cpu" else [device]  # the CPU generator is always forked
    with torch.random.fork_rng(devices=accelerators, device_type=device.type):
        torch.manual_seed(seed)
        yield


def generate_context_templates(
    model,
    tokenizer,
    starts: Sequence[str],
    length: int,
    seed: int,
) -> list[str]:
    """The reference's context prefixes, seeded: one short sampled text per start word.

    Returns ``["{}", "<text 1>. {}", ...]``; the bare ``"{}"`` comes first. Sampling is top-k 5
    with a forked RNG, so the caller's random state is untouched and runs are reproducible.
    """
    device = next(model.parameters()).device
    templates = ["{}"]
    with seeded(device, seed):
        for start in starts:
            encoded = tokenizer(start, return_tensors="pt").to(device)
            new_tokens = max(1, length - encoded["input_ids"].shape[1])
            out = model.generate(
                **encoded,
                do_sample=True,
                top_k=5,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates
