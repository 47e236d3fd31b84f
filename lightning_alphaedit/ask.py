"""``lightning-alphaedit ask``: the unedited and the edited model answer the same prompts.

    lightning-alphaedit ask RUN_DIR                       # the run's own edit requests
    lightning-alphaedit ask RUN_DIR/edited_model "The capital of Norway is" "Oslo is in"
    lightning-alphaedit ask RUN_DIR --file prompts.txt    # one prompt a line (or an edit file)
    lightning-alphaedit ask RUN_DIR --chat                # through the model's chat template

After an edit the first thing anyone does is ask the model. Both answers are greedy and a
few tokens long, and come from one model: the edited weights, and the same weights with
the run's deltas taken off (the unedited model, without loading it a second time). Where
a prompt belongs to an edit request its new target is marked, and a final line counts the
prompts whose edited answer begins with it. With ``chat`` every prompt is the user turn of
the model's chat template, as a chat model is asked, and the answers are read to their end
(`lightning_alphaedit.wild`); an answer then holds the edit when it contains the new target.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_alphaedit.export import DELTAS_FILE, EDITS_FILE, SUMMARY_FILE
from lightning_alphaedit.run_folder import EDITED_MODEL
from lightning_alphaedit.requests import EditRequest, read_jsonl, read_requests
from lightning_alphaedit.scoring import generate, starts_with_answer
from lightning_alphaedit.wild import answers as free_answers, contains

MARK = "»{}«"
"""How the new target is marked inside an answer."""


@dataclass(frozen=True)
class Answer:
    """One prompt answered by both models; ``target`` is the new target of its edit, if any."""

    prompt: str
    unedited: str
    edited: str
    target: str | None = None
    chat: bool = False

    @property
    def takes_hold(self) -> bool | None:
        """Whether the edited answer begins with the new target (through the chat template: contains
        it); None without one."""
        return None if self.target is None else _holds(self.edited, self.target, self.chat)


def _holds(answer: str, target: str, chat: bool) -> bool:
    return contains(answer, target) if chat else starts_with_answer(answer, target)


class Answers(list):
    """A list of `Answer`s that prints as the side-by-side table (a notebook shows it as is)."""

    def __str__(self) -> str:
        return format_answers(self)

    def __repr__(self) -> str:
        return format_answers(self)


@contextmanager
def unedited_weights(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """The model with each edited parameter set back to (edited - delta) inside the block;
    the edited weights are copied back exactly afterwards, whatever happens inside."""
    parameters = dict(model.named_parameters())
    missing = sorted(set(deltas) - set(parameters))
    if missing:
        raise KeyError(f"the deltas name parameters the model does not have: {missing}")
    edited = {name: parameters[name].detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = parameters[name]
                weight.copy_((weight.double() - delta.to(weight.device, torch.float64)).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in edited.items():
                parameters[name].copy_(weight)


def ask(
    model: torch.nn.Module,
    tokenizer,
    deltas: Mapping[str, torch.Tensor],
    prompts: Sequence[str | EditRequest | tuple[str, str]],
    max_new_tokens: int | None = None,
    chat: bool = False,
) -> Answers:
    """Greedy answers of the edited ``model`` and of the unedited one (``model`` minus ``deltas``).

    A prompt is a string, a ``(prompt, new target)`` pair, or an `EditRequest` (its rewrite
    prompt and new target); a new target is marked in the answers. ``chat``: each prompt is
    the user turn of the chat template and each answer is read to its end (at most
    ``max_new_tokens``, default 50; else 8 tokens of continuation).
    """
    pairs = [_prompt_and_target(p) for p in prompts]
    texts, targets = [t for t, _ in pairs], [t for _, t in pairs]
    if not texts:
        return Answers()

    def answer(current: torch.nn.Module) -> list[str]:
        if chat:  # read as the WILD evaluation reads it
            return free_answers(current, tokenizer, texts, "chat", max_new_tokens or 50, batch_size=16)
        return generate(current, tokenizer, texts, max_new_tokens=max_new_tokens or 8)

    edited = answer(model)
    with unedited_weights(model, deltas):
        unedited = answer(model)
    return Answers(Answer(p, u, e, t, chat) for p, u, e, t in zip(texts, unedited, edited, targets))


def _prompt_and_target(prompt: str | EditRequest | tuple[str, str]) -> tuple[str, str | None]:
    if isinstance(prompt, EditRequest):
        return prompt.text, prompt.target_new
    if isinstance(prompt, str):
        return prompt, None
    text, target = prompt
    return text, target


def with_paraphrases(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    """Each request's rewrite prompt and its paraphrases, each with the request's new target."""
    return [(text, r.target_new) for r in requests for text in (r.text, *r.paraphrase_prompts)]


def _marked(text: str, target: str | None) -> str:
    text = " ".join(text.split())  # one line, whatever the model generated
    if target and target in text:
        return text.replace(target, MARK.format(target), 1)
    return text


def format_answers(answers: Sequence[Answer]) -> str:
    """Each prompt, then its unedited and edited answer beneath it; the new target marked »so«."""
    lines = []
    for answer in answers:
        lines.append(answer.prompt + (f"   (new target: {answer.target})" if answer.target else ""))
        lines.append(f"    unedited: {_marked(answer.unedited, answer.target)}")
        flag = {True: "   <- new target", False: "", None: ""}[answer.takes_hold]
        lines.append(f"    edited:   {_marked(answer.edited, answer.target)}{flag}")
    judged = [a for a in answers if a.target is not None]
    if judged:
        before = sum(_holds(a.unedited, a.target, a.chat) for a in judged)
        after = sum(bool(a.takes_hold) for a in judged)
        rule = "contains" if judged[0].chat else "begins with"
        lines.append(f"answer {rule} the new target: edited {after} of {len(judged)}, unedited {before} of {len(judged)}")
    return "\n".join(lines)


# --- an exported edited model ------------------------------------------------------------------


def edited_model_folder(path: str | Path) -> Path:
    """The edited model's folder: ``path`` itself, or a run folder's ``edited_model``."""
    path = Path(path).expanduser()
    for folder in (path, path / EDITED_MODEL):
        if (folder / SUMMARY_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"{path}: neither an edited model (no {SUMMARY_FILE}) nor a run folder with {EDITED_MODEL}/ inside "
        "(a run writes it unless export.enabled is false)"
    )


def load_edited(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, deltas, applied requests, summary) of an exported edited model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = edited_model_folder(path)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    deltas = load_file(str(folder / DELTAS_FILE))
    requests = read_jsonl(folder / EDITS_FILE) if (folder / EDITS_FILE).is_file() else []
    return model, tokenizer, deltas, requests, summary


def _default_device() -> torch.device:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: whichever accelerator there is
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator()
    return torch.device("cpu")


def _prompts_from_file(path: Path) -> list[str | EditRequest]:
    """An edit request file (JSON or JSONL: its rewrite prompts, targets marked), else one prompt a line."""
    if path.suffix in (".json", ".jsonl"):
        return list(read_requests(path))
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(args: list[str]) -> Answers:
    parser = argparse.ArgumentParser(
        prog="lightning-alphaedit ask",
        description="Greedy answers of the unedited and the edited model, side by side.",
    )
    parser.add_argument("model", help="a run folder or its exported edited_model folder")
    parser.add_argument("prompts", nargs="*", help="prompts to answer (default: the run's edit requests)")
    parser.add_argument("--file", type=Path, help="prompts, one a line, or an edit request file (their targets marked)")
    parser.add_argument("--limit", type=int, default=10, help="at most this many of the run's edit requests (default 10)")
    parser.add_argument("--paraphrases", action="store_true", help="also each edit request's paraphrase prompts")
    parser.add_argument("--chat", action="store_true",
                        help="ask through the model's chat template (each prompt the user turn), answers read to their end")
    parser.add_argument("--tokens", type=int, help="tokens generated per answer at most (default 8; with --chat 50)")
    parser.add_argument("--device", help="where the model runs (default: the accelerator if any, else the CPU)")
    options = parser.parse_args(args)
    model, tokenizer, deltas, requests, summary = load_edited(options.model, options.device or _default_device())
    prompts: list[str | EditRequest | tuple[str, str]] = list(options.prompts)
    if options.file:
        prompts += _prompts_from_file(options.file)
    if not prompts:
        if not requests:
            parser.error(f"{options.model} records no edit requests: give prompts or --file")
        prompts = list(requests[: options.limit])
    if options.paraphrases:
        prompts = [q for p in prompts for q in (with_paraphrases([p]) if isinstance(p, EditRequest) else [p])]
    base = summary.get("base_model") or {"name_or_path": summary.get("model")}
    print(f"edited: {edited_model_folder(options.model)}  ({summary.get('method')}, {summary.get('edits_applied')} edits, "
          f"layers {summary.get('layers')})\nunedited: the same weights without the edit deltas "
          f"(base model {base.get('name_or_path') or 'tiny random model'})\n")
    answers = ask(model, tokenizer, deltas, prompts, options.tokens, chat=options.chat)
    print(format_answers(answers))
    return answers

