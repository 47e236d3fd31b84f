"""Free-generation ("in the wild") evaluation: ask the model and read its whole answer.

The paper's figures are teacher-forced: is the new target more probable than the old one
right after the prompt? A person asks instead (bare, as a QA instruction, or through the
chat template) and reads a free answer, which may begin with the target and go on to say
something else, or never say it at all. Here every prompt is answered greedily, at most
``max_new_tokens`` tokens, until the answer ends: at the first newline, the first full
stop followed by a space (not an initial such as "C. Newton", nor a decimal point), or
EOS. Leading whitespace is skipped, so an answer that starts on a new line is still read.

Per input form (`lightning_alphaedit.chat.FORMS`) and request:

- efficacy: the answer to the rewrite prompt equals the new target after SQuAD
  normalisation (lower case, no punctuation, no articles, single spaces);
  ``efficacy_contains``: the normalised answer contains the normalised target as whole words;
- generalization (and ``_contains``): the same on the paraphrases, averaged per request;
- locality: per neighbourhood prompt, the answer is exactly the unedited model's answer,
  recorded once at the baseline and never regenerated (a resumed run keeps it);
- with a judge (`lightning_alphaedit.judge`): ``efficacy_judge`` and
  ``generalization_judge``, the share the judge calls correct (a failed judgement counts as
  not correct), and ``judge_failed``, the share of judgements that failed.

Rates are fractions in [0, 1] like every other rate of `EditEvaluation`; tables print percent.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchmetrics import MeanMetric

from lightning_alphaedit.chat import FORMS, render
from lightning_alphaedit.judge import Judge, JudgeConfig
from lightning_alphaedit.metrics import per_owner_mean
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.scoring import generate

FIGURES = ("efficacy", "efficacy_contains", "generalization", "generalization_contains", "locality")
"""The WILD figures of every input form, in table order."""
JUDGE_FIGURES = ("efficacy_judge", "generalization_judge", "judge_failed")
"""Added when a judge is configured."""


@dataclass
class WildConfig:
    """Free-generation evaluation: greedy answers to the prompts, as a person would read them."""

    enabled: bool = True
    """Measure the WILD figures at the baseline, after edit epochs and at the test."""
    forms: list[str] = field(default_factory=lambda: ["question"])
    """Input forms: ``question`` (the prompt as it is), ``qa_instruction`` ("Please answer the
    question:\\n\\nQ: ...\\nA:") and ``chat`` (the user turn of the model's chat template)."""
    max_new_tokens: int = 50
    """Tokens at most per answer (it usually ends earlier, at a newline, full stop or EOS)."""
    every_epoch: bool = True
    """Also after every edit epoch; False: at the baseline and the test only."""
    judge: JudgeConfig | None = None
    """An OpenAI-compatible chat endpoint that judges each answer against the target; None: exact
    match and containment only."""

    def __post_init__(self) -> None:
        unknown = [f for f in self.forms if f not in FORMS]
        if unknown or not self.forms:
            raise ValueError(f"wild.forms must be a non-empty list of {FORMS}, got {self.forms!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"wild.max_new_tokens must be >= 1, got {self.max_new_tokens}")


WILD_PREFIX = "wild/"


def figure_name(form: str, figure: str) -> str:
    """``wild/<form>/<figure>``: how the figure is logged and written."""
    return f"{WILD_PREFIX}{form}/{figure}"


# --- reading an answer --------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<!\b[A-Z])\.(?=\s)")
"""A full stop followed by whitespace, not right after a lone capital (an initial)."""
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_ended(continuation: str) -> bool:
    """Whether the answer in ``continuation`` (so far) has ended: generation may stop."""
    text = continuation.lstrip()
    return "\n" in text or _SENTENCE_END.search(text) is not None


def cut_answer(continuation: str) -> str:
    """The answer a person reads: leading whitespace skipped, up to the first newline or full stop."""
    text = continuation.lstrip()
    text = text.split("\n", 1)[0]
    end = _SENTENCE_END.search(text + " ")  # a full stop at the very end ends it too
    return (text[: end.start()] if end else text).strip()


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, target: str) -> bool:
    """The normalised answer is the normalised target; a target with nothing left after
    normalisation (QAEdit has ")") matches nothing, not every empty answer."""
    wanted = normalize_answer(target)
    return bool(wanted) and normalize_answer(answer) == wanted


def contains(answer: str, target: str) -> bool:
    """The normalised target occurs in the normalised answer as whole words."""
    wanted = normalize_answer(target)
    return bool(wanted) and f" {wanted} " in f" {normalize_answer(answer)} "


def answers(model, tokenizer, prompts: Sequence[str], form: str, max_new_tokens: int, batch_size: int) -> list[str]:
    """The cut greedy answer to each prompt asked in ``form``."""
    rendered = [render(tokenizer, form, p) for p in prompts]
    raw = generate(model, tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=answer_ended)
    return [cut_answer(text) for text in raw]


# --- the figures ----------------------------------------------------------------------------------


def reference_key(form: str, prompt: str) -> str:
    """Where the unedited answer to ``prompt`` asked in ``form`` is kept."""
    return f"{form}\n{prompt}"


class WildEvaluation(torch.nn.Module):
    """The WILD figures over every request passed to ``update``."""

    def __init__(self, config: WildConfig) -> None:
        super().__init__()
        self.config = config
        figures = FIGURES + (JUDGE_FIGURES if config.judge is not None else ())
        self.rates = torch.nn.ModuleDict({
            figure_name(form, figure).replace("/", ":"): MeanMetric() for form in config.forms for figure in figures
        })  # ModuleDict keys: ":" for "/", turned back in `metrics`
        self.judge = Judge(config.judge) if config.judge is not None else None

    @property
    def metrics(self) -> dict[str, MeanMetric]:
        return {name.replace(":", "/"): metric for name, metric in self.rates.items()}

    def _add(self, form: str, figure: str, values: Sequence[float] | torch.Tensor, device) -> None:
        values = torch.as_tensor(values, dtype=torch.float32, device=device)
        if values.numel():
            self.rates[figure_name(form, figure).replace("/", ":")].to(device).update(values)

    @torch.no_grad()
    def update(self, model, tokenizer, requests: Sequence[EditRequest], reference: dict[str, str],
               record: bool = False, batch_size: int = 32) -> None:
        """Answer every prompt of ``requests`` in every form and score the answers. ``record``: this
        is the unedited model, whose answers become ``reference`` (locality is then 1 by definition)."""
        device = next(model.parameters()).device
        for form in self.config.forms:
            asked = [(i, r.text, True) for i, r in enumerate(requests)]
            asked += [(i, p, False) for i, r in enumerate(requests) for p in r.paraphrase_prompts]
            neighbours = [n.prompt for r in requests for n in r.neighborhood_prompts]
            said = answers(model, tokenizer, [p for _, p, _ in asked] + neighbours, form,
                           self.config.max_new_tokens, batch_size)
            own, theirs = said[: len(asked)], said[len(asked):]
            if record:
                reference.update({reference_key(form, p): a for (_, p, rewrite), a in zip(asked, own) if rewrite})
                reference.update({reference_key(form, p): a for p, a in zip(neighbours, theirs)})

            targets = [requests[i].target_new for i, _, _ in asked]
            rewrite = [k for k, (_, _, is_rewrite) in enumerate(asked) if is_rewrite]
            para = [k for k, (_, _, is_rewrite) in enumerate(asked) if not is_rewrite]
            owners = [asked[k][0] for k in para]
            for suffix, test in (("", exact_match), ("_contains", contains)):
                hits = [float(test(a, t)) for a, t in zip(own, targets)]
                self._add(form, "efficacy" + suffix, [hits[k] for k in rewrite], device)
                if para:
                    values = torch.tensor([hits[k] for k in para], device=device)
                    self._add(form, "generalization" + suffix, per_owner_mean(values, owners), device)
            kept = [float(a == reference[reference_key(form, p)]) for p, a in zip(neighbours, theirs)
                    if reference_key(form, p) in reference]
            self._add(form, "locality", kept, device)

            if self.judge is not None:
                verdicts = self.judge.grade_many([(p, t, a) for (_, p, _), t, a in zip(asked, targets, own)])
                correct = [float(v.correct) for v in verdicts]
                self._add(form, "efficacy_judge", [correct[k] for k in rewrite], device)
                if para:
                    values = torch.tensor([correct[k] for k in para], device=device)
                    self._add(form, "generalization_judge", per_owner_mean(values, owners), device)
                self._add(form, "judge_failed", [float(v.label == "failed") for v in verdicts], device)
