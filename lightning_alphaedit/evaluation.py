"""The evaluation protocol of docs/method.md §7 on a list of edit requests.

For a prompt p and answer a, NLL(p, a) is the mean over a's tokens of -log P(a_j | p, a_<j).
Per request (CounterFact):

- efficacy: 1[NLL(rewrite, new) < NLL(rewrite, true)]; ``_magnitude``: exp(-NLL new) -
  exp(-NLL true); ``_argmax``: every token of the new target is the argmax;
- generalization: the same on the paraphrase prompts, averaged per request;
- specificity: per neighbourhood prompt, 1[NLL(p, true) < NLL(p, new)], magnitude reversed;
  ``_argmax``: every token of the true answer is still the argmax;
- ``*_token_acc`` (zsRE): teacher-forced top-1 accuracy of the answer's tokens (the new
  target for efficacy and generalization, the neighbour's answer for specificity).

With ``generation``, also (the test stage):

- generation_efficacy / generation_generalization: greedy decoding from the rewrite /
  paraphrase prompts starts with the new target (the stricter reading later work argues for);
- fluency: n-gram entropy of top-k sampled texts, 100 tokens with the prompt, seeded, from
  the requests' generation prompts (their rewrite prompts where they have none);
- consistency: TF-IDF cosine with reference texts, when those files are configured.

Rates are `MeanMetric`s over per-item values, so they reduce across processes like any metric.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics import MeanMetric

from lightning_alphaedit.metrics import NgramEntropy, TfidfSimilarity, TfidfVocabulary, per_owner_mean
from lightning_alphaedit.prompts import target_token_ids
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.collective import Collective
from lightning_alphaedit.scoring import AnswerScores, generate, score_answers, starts_with_answer
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.wild import WildConfig, WildEvaluation

TEACHER_FORCED = tuple(
    f"{figure}{variant}"
    for figure in ("efficacy", "generalization", "specificity")
    for variant in ("", "_magnitude", "_argmax", "_token_acc")
)
"""The per-item figures of every validation (no generation), in table order."""
RATES = TEACHER_FORCED + ("generation_efficacy", "generation_generalization")
"""Every per-item figure, in table order (fluency and consistency follow)."""


@dataclass
class ConsistencyConfig:
    """Files of the CounterFact consistency score (reference: ``tfidf_vocab.json``, ``idf.npy``)."""

    vocabulary: str
    """JSON object word -> column of the TF-IDF space."""
    idf: str
    """IDF per column: ``.npy``, a ``.json`` list or a torch ``.pt`` tensor."""
    references: str
    """Reference texts about each request's new object: a JSON object case id -> text(s), or
    ROME's ``attribute_snippets.json`` (a list of relation_id, target_id, samples) with
    ``counterfact`` set."""
    counterfact: str | None = None
    """The original CounterFact file of the stream (``multi_counterfact.json``): its
    ``requested_rewrite`` relation and new-object ids find each case's snippets."""


@dataclass
class EvaluationConfig:
    """What the validation and test stages measure."""

    batch_size: int = 32
    """Prompts per forward pass when scoring, and per generate call."""
    generation: bool = True
    """Generation-based figures (success, fluency, consistency) at the test stage and baseline."""
    fluency_length: int = 100
    """Tokens of each fluency text, prompt included (the reference: 100)."""
    fluency_top_k: int = 5
    """Top-k sampling of the fluency texts (the reference: 5)."""
    consistency: ConsistencyConfig | None = None
    """TF-IDF files for the consistency score; None leaves it out."""
    wild: WildConfig = field(default_factory=WildConfig)
    """Free-generation ("in the wild") figures: the model asked, its whole answer read."""


class EditEvaluation(torch.nn.Module):
    """The §7 figures over every request passed to ``update``; ``compute`` gives plain floats."""

    def __init__(self, config: EvaluationConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config, self.seed = config or EvaluationConfig(), seed
        self.rates = torch.nn.ModuleDict({name: MeanMetric() for name in RATES})
        self.fluency = NgramEntropy()
        self.consistency: TfidfSimilarity | None = None
        self.references: dict[str, str] = {}
        if self.config.consistency is not None:
            files = self.config.consistency
            self.consistency = TfidfSimilarity(TfidfVocabulary.load(files.vocabulary, files.idf))
            self.references = read_references(Path(files.references), files.counterfact)
        self.wild = WildEvaluation(self.config.wild) if self.config.wild.enabled else None

    def _add(self, name: str, values: torch.Tensor) -> None:
        if values.numel():
            self.rates[name].to(values.device).update(values)

    @torch.no_grad()
    def update(
        self, model: torch.nn.Module, tokenizer, targets: ModelTargets, requests: Sequence[EditRequest],
        generation: bool = False, wild: bool = False, wild_reference: dict[str, str] | None = None,
        record_wild: bool = False,
    ) -> None:
        """Score ``requests`` on ``model`` as it is now; ``generation`` adds the generated-text figures,
        ``wild`` the free-generation ones, whose locality compares with ``wild_reference`` (the unedited
        model's answers, filled in when ``record_wild``)."""
        if not requests:
            return
        if wild and self.wild is not None:
            reference = {} if wild_reference is None else wild_reference
            self.wild.update(model, tokenizer, requests, reference, record_wild, self.config.batch_size)
        score = lambda prompts, answers: score_answers(  # noqa: E731
            model, tokenizer, targets, prompts, answers, self.config.batch_size
        )
        rewrite = [r.text for r in requests]
        new = score(rewrite, [r.target_new for r in requests])
        self._add("efficacy_token_acc", new.token_accuracy)
        self._add("efficacy_argmax", new.all_argmax)
        known = [i for i, r in enumerate(requests) if r.target_true]
        if known:
            true = score([rewrite[i] for i in known], [requests[i].target_true for i in known])
            self._comparison("efficacy", _select(new, known), true, range(len(known)))

        para = [(i, p) for i, r in enumerate(requests) for p in r.paraphrase_prompts]
        if para:
            prompts = [p for _, p in para]
            para_new = score(prompts, [requests[i].target_new for i, _ in para])
            owners = [i for i, _ in para]
            self._add("generalization_token_acc", per_owner_mean(para_new.token_accuracy, owners))
            self._add("generalization_argmax", per_owner_mean(para_new.all_argmax, owners))
            with_true = [j for j, (i, _) in enumerate(para) if requests[i].target_true]
            if with_true:
                para_true = score([prompts[j] for j in with_true], [requests[para[j][0]].target_true for j in with_true])
                self._comparison("generalization", _select(para_new, with_true), para_true, [owners[j] for j in with_true])

        neighbours = [(r, n) for r in requests for n in r.neighborhood_prompts]
        if neighbours:
            prompts = [n.prompt for _, n in neighbours]
            keep = score(prompts, [n.target for _, n in neighbours])
            self._add("specificity_token_acc", keep.token_accuracy)
            self._add("specificity_argmax", keep.all_argmax)
            moved = score(prompts, [r.target_new for r, _ in neighbours])
            self._add("specificity", (keep.nll < moved.nll).float())
            self._add("specificity_magnitude", (-keep.nll).exp() - (-moved.nll).exp())

        if generation and self.config.generation:
            self._generation(model, tokenizer, requests)

    def _comparison(self, name: str, new: AnswerScores, true: AnswerScores, owners: Sequence[int]) -> None:
        """Success and magnitude of the new target over the true one, averaged per owner request."""
        self._add(name, per_owner_mean((new.nll < true.nll).float(), owners))
        self._add(f"{name}_magnitude", per_owner_mean((-new.nll).exp() - (-true.nll).exp(), owners))

    def _generation(self, model, tokenizer, requests: Sequence[EditRequest]) -> None:
        device = next(model.parameters()).device
        # (owner, prompt, is the rewrite prompt) for every rewrite and paraphrase prompt
        prompts = [(i, p, j == 0) for i, r in enumerate(requests) for j, p in enumerate((r.text, *r.paraphrase_prompts))]
        longest = max(len(target_token_ids(tokenizer, r.target_new)) for r in requests)
        continuations = generate(model, tokenizer, [p for _, p, _ in prompts], max_new_tokens=longest + 1,
                                 batch_size=self.config.batch_size)
        hits = [float(starts_with_answer(c, requests[i].target_new)) for (i, _, _), c in zip(prompts, continuations)]
        self._add("generation_efficacy", torch.tensor([h for h, (_, _, rw) in zip(hits, prompts) if rw], device=device))
        paraphrases = [(h, i) for h, (i, _, rw) in zip(hits, prompts) if not rw]
        if paraphrases:
            values = torch.tensor([h for h, _ in paraphrases], device=device)
            self._add("generation_generalization", per_owner_mean(values, [i for _, i in paraphrases]))

        fluency_prompts = [(i, p) for i, r in enumerate(requests) for p in (r.generation_prompts or (r.text,))]
        texts = generate(
            model, tokenizer, [p for _, p in fluency_prompts], max_length=self.config.fluency_length,
            top_k=self.config.fluency_top_k, seed=self.seed, include_prompt=True, batch_size=self.config.batch_size,
        )
        self.fluency.to(device).update(texts)
        if self.consistency is not None:
            joined: dict[int, list[str]] = {}
            for (i, _), text in zip(fluency_prompts, texts):
                joined.setdefault(i, []).append(text)
            pairs = [(" ".join(t), self.references[requests[i].case_id]) for i, t in joined.items()
                     if requests[i].case_id in self.references]
            if pairs:
                self.consistency.update([g for g, _ in pairs], [r for _, r in pairs])

    def compute(self) -> dict[str, float]:
        """Every figure that has seen data, as floats (rates in [0, 1], fluency and consistency x 100).

        Under several processes the metrics sum their states over the ranks (torchmetrics'
        synchronisation); a figure is computed on every rank when any rank has data for it, so
        all ranks take part in the same synchronisations in the same order."""
        metrics = {**self.rates, "fluency": self.fluency, **(self.wild.metrics if self.wild is not None else {})}
        seen = [bool(m.update_count) for m in metrics.values()]
        if self.consistency is not None:
            metrics["consistency"] = self.consistency
            seen.append(bool(self.consistency.update_count) and float(self.consistency.count) > 0)
        device = self.fluency.total.device
        seen = Collective().any(torch.tensor(seen, device=device)).tolist()
        return {name: float(metric.compute()) for (name, metric), flag in zip(metrics.items(), seen) if flag}

    def reset(self) -> None:
        wild = list(self.wild.metrics.values()) if self.wild is not None else []
        for metric in [*self.rates.values(), self.fluency, *wild] + ([self.consistency] if self.consistency else []):
            metric.reset()


def _select(scores: AnswerScores, rows: Sequence[int]) -> AnswerScores:
    index = torch.tensor(list(rows), dtype=torch.long, device=scores.nll.device)
    return AnswerScores(scores.nll[index], scores.token_accuracy[index], scores.all_argmax[index])


def read_references(path: Path, counterfact: str | None = None) -> dict[str, str]:
    """case id -> one reference text (a case's texts joined with spaces, as the reference does)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return {str(case_id): _joined(texts, path, f"case {case_id!r}") for case_id, texts in data.items()}
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON object (case id -> texts) or ROME's attribute snippets (a list)")
    if counterfact is None:
        raise ValueError(f"{path} holds attribute snippets: set consistency.counterfact to the CounterFact "
                         "file whose relation and object ids select them")
    snippets: dict[tuple[str, str], list[str]] = {}
    for index, item in enumerate(data):
        try:
            key = (str(item["relation_id"]), str(item["target_id"]))
            snippets.setdefault(key, []).extend(str(sample["text"]) for sample in item["samples"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: record {index}: field {error} missing (relation_id, target_id, samples[].text)") from None
    result = {}
    for index, record in enumerate(json.loads(Path(counterfact).read_text(encoding="utf-8"))):
        try:
            rewrite = record["requested_rewrite"]
            key = (str(rewrite["relation_id"]), str(rewrite["target_new"]["id"]))
            case_id = str(record["case_id"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{counterfact}: record {index}: field {error} missing "
                             "(case_id, requested_rewrite.relation_id, requested_rewrite.target_new.id)") from None
        if key in snippets:
            result[case_id] = " ".join(snippets[key])
    return result


def _joined(texts, path: Path, where: str) -> str:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: {where}: value must be a text or a list of texts")
    return " ".join(texts)


def evaluate(
    model: torch.nn.Module, tokenizer, targets: ModelTargets, requests: Sequence[EditRequest],
    config: EvaluationConfig | None = None, generation: bool = False, seed: int = 0,
    wild: bool = False, wild_reference: dict[str, str] | None = None, record_wild: bool = False,
) -> dict[str, float]:
    """All figures for ``requests`` on ``model`` in one call (the metric used on its own)."""
    evaluation = EditEvaluation(config, seed).to(next(model.parameters()).device)
    evaluation.update(model, tokenizer, targets, requests, generation=generation, wild=wild,
                      wild_reference=wild_reference, record_wild=record_wild)
    return evaluation.compute()
