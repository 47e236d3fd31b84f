"""Drift from the unedited model: zero when nothing changed, the right numbers when something did."""

from __future__ import annotations

import pytest
import torch

from lightning_alphaedit.algebra import null_space_projector
from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.drift import DriftConfig, DriftReference
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

LAYERS = [1, 2]


@pytest.fixture(params=["gpt2", "qwen2"])
def setup(request):
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(architecture=request.param, tokenizer="words"))
    model.requires_grad_(False)
    targets = ModelTargets(model)
    texts = list(load_corpus("tiny-corpus").texts[-12:])
    return model, tokenizer, targets, texts


def held_out_keys(reference: DriftReference, layer: int) -> torch.Tensor:
    return torch.cat(reference.keys[layer])  # (n, d_in)


def test_an_untouched_model_has_no_drift(setup):
    model, tokenizer, targets, texts = setup
    reference = DriftReference(targets, tokenizer, LAYERS, texts, DriftConfig(batch_size=5))
    drift = reference.measure()
    assert drift["output_change_layer1"] == 0.0 and drift["output_change_layer2"] == 0.0
    assert drift["hidden_shift"] == 0.0
    assert abs(drift["kl"]) < 1e-7
    assert drift["perplexity"] == pytest.approx(drift["perplexity_unedited"], rel=1e-6)


def test_output_change_is_the_explicit_ratio_and_zero_for_a_null_space_update(setup):
    model, tokenizer, targets, texts = setup
    # few enough tokens that their keys leave a null space in d_in = 256
    reference = DriftReference(targets, tokenizer, LAYERS, texts[:4], DriftConfig(batch_size=3))
    keys = held_out_keys(reference, 1).double()  # (n, d_in)
    weight = targets.linear_weight(1).detach().double().clone()  # (d_out, d_in)
    generator = torch.Generator().manual_seed(0)
    # a MEMIT-like rank-one update that moves the output of a preserved (held-out) key
    k0 = keys[3]
    delta = torch.randn(weight.shape[0], 1, generator=generator, dtype=torch.float64) @ k0[None] / k0.norm() ** 2
    targets.add_delta(1, delta)
    expected = (keys @ delta.T).norm() / (keys @ weight.T).norm()
    drift = reference.measure()
    assert drift["output_change_layer1"] == pytest.approx(float(expected), rel=1e-4)
    assert drift["output_change_layer1"] > 1e-3 and drift["output_change_layer2"] == 0.0
    assert drift["hidden_shift"] > 0 and drift["kl"] > 0
    # undone, then a random update confined to the null space of these keys (AlphaEdit's
    # projection): it is large, yet their outputs do not move
    targets.set_linear_weight(1, weight)
    second_moment = keys.T @ keys / len(keys)
    projector = null_space_projector(second_moment, threshold=1e-10 * float(second_moment.diagonal().max()))
    projected = torch.randn(weight.shape, generator=generator, dtype=torch.float64) @ projector
    assert projected.norm() > 0.1 * weight.norm(), "the null space should not be empty here"
    targets.add_delta(1, projected)
    assert reference.measure()["output_change_layer1"] < 1e-4  # float32 round-off of a large update


def test_top_k_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_below_it(setup):
    model, tokenizer, targets, texts = setup
    vocab = model.config.vocab_size
    exact = DriftReference(targets, tokenizer, LAYERS, texts, DriftConfig(top_k=vocab))
    coarse = DriftReference(targets, tokenizer, LAYERS, texts, DriftConfig(top_k=8))
    batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    before = torch.log_softmax(model(**batch).logits.double()[real], dim=-1)  # (n, V)
    targets.add_delta(2, 0.5 * torch.randn(targets.value_size(2), targets.key_size(2), generator=torch.Generator().manual_seed(1)))
    after = torch.log_softmax(model(**batch).logits.double()[real], dim=-1)
    full_kl = float((before.exp() * (before - after)).sum(dim=-1).mean())  # KL(unedited ‖ edited)
    assert full_kl > 1e-4
    assert exact.measure()["kl"] == pytest.approx(full_kl, rel=1e-3)
    assert 0 < coarse.measure()["kl"] <= full_kl * (1 + 1e-4)


@pytest.mark.parametrize("max_length", [8, 64])  # 64: texts of different lengths, so padding
def test_perplexity_is_exp_of_the_mean_token_nll(setup, max_length):
    model, tokenizer, targets, texts = setup
    reference = DriftReference(targets, tokenizer, LAYERS, texts, DriftConfig(batch_size=4, max_length=max_length))
    nll, count = 0.0, 0
    for text in reference.texts:  # one text at a time, no padding: an independent path
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        nll -= float(logp[:-1].gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert reference.perplexity == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
