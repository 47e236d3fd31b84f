"""The §7 metrics against hand-computed values and an independent unbatched path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_alphaedit.evaluation import ConsistencyConfig, EditEvaluation, EvaluationConfig, evaluate
from lightning_alphaedit.metrics import NgramEntropy, RelativeChange, TfidfSimilarity, TfidfVocabulary, fluency, ngram_entropy
from lightning_alphaedit.requests import EditRequest, NeighborhoodPrompt, read_requests
from lightning_alphaedit.scoring import generate, score_answers, starts_with_answer
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

TINY_EDITS = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    # a larger init than the default gives confident predictions, so argmax hits happen
    model, tokenizer = tiny_model_and_tokenizer(
        TinyModelConfig(architecture=request.param, tokenizer="words", initializer_range=0.3)
    )
    return model.requires_grad_(False), tokenizer, ModelTargets(model)


def reference_scores(model, tokenizer, prompt: str, answer: str) -> tuple[float, float, float]:
    """(mean NLL, token accuracy, all-argmax) of ' answer' after prompt: one unbatched forward
    with full logits in float64, nothing shared with `score_answers` but the tokenizer."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    rows = [len(prompt_ids) + j - 1 for j in range(len(answer_ids))]
    nll = -sum(float(logp[r, t]) for r, t in zip(rows, answer_ids)) / len(answer_ids)
    hits = [int(logits[r].argmax()) == t for r, t in zip(rows, answer_ids)]
    return nll, sum(hits) / len(hits), float(all(hits))


def test_answer_scores_match_an_unbatched_full_logit_path(tiny):
    model, tokenizer, targets = tiny
    requests = read_requests(TINY_EDITS)
    prompts = [r.text for r in requests] + [n.prompt for r in requests for n in r.neighborhood_prompts]
    answers = [r.target_new for r in requests] + [n.target for r in requests for n in r.neighborhood_prompts]
    # the model's own greedy continuations, so that argmax hits occur (a random model rarely hits a fact)
    prompts += [r.text for r in requests]
    answers += generate(model, tokenizer, [r.text for r in requests], max_new_tokens=2)
    scores = score_answers(model, tokenizer, targets, prompts, answers, batch_size=7)  # ragged batches
    expected = torch.tensor([reference_scores(model, tokenizer, p, a) for p, a in zip(prompts, answers)], dtype=torch.float64)
    torch.testing.assert_close(scores.nll.double(), expected[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(scores.token_accuracy.double(), expected[:, 1])
    assert torch.equal(scores.all_argmax.double(), expected[:, 2])
    assert float(expected[-len(requests):, 2].sum()) == len(requests), "greedy answers are argmax by definition"


def test_rates_follow_the_definitions_on_an_independent_path(tiny):
    model, tokenizer, targets = tiny
    requests = read_requests(TINY_EDITS)[:6]
    got = evaluate(model, tokenizer, targets, requests, EvaluationConfig(batch_size=5))

    def nll(p, a):
        return reference_scores(model, tokenizer, p, a)[0]

    eff = [nll(r.text, r.target_new) < nll(r.text, r.target_true) for r in requests]
    mag = [math.exp(-nll(r.text, r.target_new)) - math.exp(-nll(r.text, r.target_true)) for r in requests]
    gen = [np.mean([nll(p, r.target_new) < nll(p, r.target_true) for p in r.paraphrase_prompts]) for r in requests]
    spec = [nll(n.prompt, n.target) < nll(n.prompt, r.target_new) for r in requests for n in r.neighborhood_prompts]
    spec_mag = [math.exp(-nll(n.prompt, n.target)) - math.exp(-nll(n.prompt, r.target_new))
                for r in requests for n in r.neighborhood_prompts]
    acc = [reference_scores(model, tokenizer, n.prompt, n.target)[1] for r in requests for n in r.neighborhood_prompts]
    assert got["efficacy"] == pytest.approx(np.mean(eff))
    assert got["efficacy_magnitude"] == pytest.approx(np.mean(mag), rel=1e-4, abs=1e-7)
    assert got["generalization"] == pytest.approx(np.mean(gen))
    assert got["specificity"] == pytest.approx(np.mean(spec))
    assert got["specificity_magnitude"] == pytest.approx(np.mean(spec_mag), rel=1e-4, abs=1e-7)
    assert got["specificity_token_acc"] == pytest.approx(np.mean(acc))
    assert "fluency" not in got and "generation_efficacy" not in got  # generation only when asked


def test_requests_without_a_true_target_get_token_accuracy_only(tiny):
    model, tokenizer, targets = tiny
    request = EditRequest("q", "UniFirst", "What does {} make?", "uniform", None, ("What is made by UniFirst?",),
                          (NeighborhoodPrompt("Who plays Walter?", "John Goodman"),))
    got = evaluate(model, tokenizer, targets, [request])
    assert "efficacy" not in got and "generalization" not in got
    assert got["efficacy_token_acc"] == reference_scores(model, tokenizer, "What does UniFirst make?", "uniform")[1]
    assert {"generalization_token_acc", "specificity", "specificity_token_acc"} <= set(got)


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b", 2) == pytest.approx(h2)
    assert ngram_entropy("a b a b", 3) == pytest.approx(1.0)
    assert fluency("a b a b") == pytest.approx((h2 + 2) / 3)
    assert fluency("x y") == 0.0  # one bigram, no trigram: nothing uncertain
    assert ngram_entropy("Paris, Paris.", 2) == pytest.approx(math.log2(3))  # punctuation is a word
    metric = NgramEntropy()
    metric.update(["a b a b"])
    metric.update(["x y"])
    assert float(metric.compute()) == pytest.approx(100 * (h2 + 2) / 3 / 2)


def test_tfidf_cosine_by_hand(tmp_path):
    vocabulary = {"paris": 0, "france": 1, "london": 2}
    (tmp_path / "vocab.json").write_text(json.dumps(vocabulary))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0]))
    space = TfidfVocabulary.load(tmp_path / "vocab.json", tmp_path / "idf.npy")
    # counts (2, 1, 0) * idf = (2, 2, 0); (1, 0, 1) * idf = (1, 0, 3); "is", "in", "a" are not in it
    a, b = "Paris is in France. PARIS!", "London and Paris, a city"
    assert space.cosine(a, b) == pytest.approx(2 / (math.sqrt(8) * math.sqrt(10)))
    assert space.cosine("nothing known", b) == 0.0
    metric = TfidfSimilarity(space)
    metric.update([a, a], [b, a])
    assert float(metric.compute()) == pytest.approx(100 * (2 / math.sqrt(80) + 1) / 2)


def test_consistency_through_the_evaluation(tiny, tmp_path):
    model, tokenizer, targets = tiny
    requests = read_requests(TINY_EDITS)[:2]
    words = sorted({w.lower() for r in requests for w in (r.target_new, r.subject)})
    (tmp_path / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (tmp_path / "idf.json").write_text(json.dumps([1.0] * len(words)))
    (tmp_path / "refs.json").write_text(json.dumps({requests[0].case_id: [f"{requests[0].target_new} is a city"]}))
    config = EvaluationConfig(consistency=ConsistencyConfig(str(tmp_path / "vocab.json"), str(tmp_path / "idf.json"),
                                                            str(tmp_path / "refs.json")))
    got = evaluate(model, tokenizer, targets, requests, config, generation=True, seed=3)
    # the same texts, generated again with the same seed, scored by hand
    prompts = list(requests[0].generation_prompts or (requests[0].text,))
    texts = generate(model, tokenizer, [p for r in requests for p in (r.generation_prompts or (r.text,))],
                     max_length=100, top_k=5, seed=3, include_prompt=True)[: len(prompts)]
    space = TfidfVocabulary.load(tmp_path / "vocab.json", tmp_path / "idf.json")
    assert got["consistency"] == pytest.approx(100 * space.cosine(" ".join(texts), f"{requests[0].target_new} is a city"))


def test_generation_is_seeded_and_greedy_matches_a_manual_argmax_loop(tiny):
    model, tokenizer, _ = tiny
    prompts = ["The capital of Norway is", "Wimbledon is a tournament of"]
    a = generate(model, tokenizer, prompts, max_length=20, top_k=5, seed=1)
    assert a == generate(model, tokenizer, prompts, max_length=20, top_k=5, seed=1)
    assert a != generate(model, tokenizer, prompts, max_length=20, top_k=5, seed=2)
    greedy = generate(model, tokenizer, prompts, max_new_tokens=3)
    for prompt, text in zip(prompts, greedy):
        ids = tokenizer(prompt)["input_ids"]
        for _ in range(3):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert text == tokenizer.decode(ids[len(tokenizer(prompt)["input_ids"]):], skip_special_tokens=True)


def test_generation_success_is_a_whole_word_prefix():
    assert starts_with_answer(" Paris is lovely", "Paris")
    assert starts_with_answer("Paris", " Paris ")
    assert starts_with_answer(" Addis Ababa, the capital", "Addis Ababa")
    assert not starts_with_answer(" Parisian food", "Paris")
    assert not starts_with_answer(" the city of Paris", "Paris")


def test_relative_change_by_hand():
    metric = RelativeChange()
    metric.update(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert float(metric.compute()) == pytest.approx(1 / math.sqrt(2))  # ‖(0,1),(0,0)‖ / ‖(1,0),(0,1)‖


def test_the_evaluation_module_accumulates_over_batches(tiny):
    model, tokenizer, targets = tiny
    requests = read_requests(TINY_EDITS)[:6]
    whole = evaluate(model, tokenizer, targets, requests)
    evaluation = EditEvaluation()
    for chunk in (requests[:2], requests[2:5], requests[5:]):
        evaluation.update(model, tokenizer, targets, chunk)
    assert evaluation.compute() == pytest.approx(whole)
    evaluation.reset()
    assert evaluation.compute() == {}


def test_references_from_rome_attribute_snippets(tmp_path):
    from lightning_alphaedit.evaluation import read_references

    fixture = Path(__file__).parent / "fixtures" / "multi_counterfact_sample.json"
    snippets = [
        {"relation_id": "P103", "target_id": "Q1860", "samples": [{"name": "a", "text": "English is spoken."},
                                                                  {"name": "b", "text": "English again."}]},
        {"relation_id": "P999", "target_id": "Q1", "samples": [{"name": "c", "text": "unrelated"}]},
    ]
    (tmp_path / "snips.json").write_text(json.dumps(snippets))
    references = read_references(tmp_path / "snips.json", str(fixture))
    assert references["0"] == "English is spoken. English again."  # case 0: P103 -> English (Q1860)
    assert "unrelated" not in " ".join(references.values())
    with pytest.raises(ValueError, match="set consistency.counterfact"):
        read_references(tmp_path / "snips.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"relation_id": "P103", "samples": []}]))
    with pytest.raises(ValueError, match=r"bad.json: record 0: field 'target_id' missing"):
        read_references(tmp_path / "bad.json", str(fixture))
