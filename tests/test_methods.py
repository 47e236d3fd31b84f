"""The paper's comparison methods (FT, PRUNE, RECT) and the null-space projection plugged into
MEMIT, PRUNE and RECT: each formula against an independent float64 / brute-force version on
small tensors, each method's batch on a tiny model against the explicit solve, and every
method end to end through the Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning_alphaedit.callbacks import ExportEditedModel, NullSpaceUpdate
from test_pipeline import build, trainer

from lightning_alphaedit import algebra
from lightning_alphaedit.algebra import NullSpace
from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.finetune import FineTuneConfig, finetune, target_nll
from lightning_alphaedit.keys import block_outputs, request_keys
from lightning_alphaedit.requests import read_requests
from lightning_alphaedit.statistics import collect_key_moments
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
from lightning_alphaedit.update import SequentialEditor, check_method

TINY_EDITS = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (rows, cols)


# --- the formulas on small tensors -------------------------------------------------------------


def test_project_update_is_delta_times_the_explicit_projector():
    full = orthonormal(12, 12, 0)
    basis, preserved = full[:, :5], full[:, 5:]  # (d_in, r) and its complement
    space = NullSpace(basis=basis, eigenvalues=torch.arange(12.0, dtype=torch.float64), threshold=5.0)
    delta = torch.randn(7, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    projected = algebra.project_update(delta, space)
    P = basis @ basis.T  # (d_in, d_in), built explicitly
    assert torch.allclose(projected, delta @ P, atol=1e-12)
    assert float((projected @ preserved).abs().max()) < 1e-12  # preserved keys' outputs unchanged
    with pytest.raises(ValueError, match="d_in = 12"):
        algebra.project_update(delta[:, :11], space)


def test_restrain_singular_values_against_the_formula():
    U, full = orthonormal(8, 4, 2), orthonormal(10, 10, 3)
    V, complement = full[:, :4], full[:, 4:]
    s = torch.tensor([9.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    sigma = 2.0
    accumulated = U @ torch.diag(s) @ V.T  # (8, 10), known singular values
    expected_s = [math.log(x) + sigma - math.log(sigma) if x >= sigma else x for x in s.tolist()]
    expected = U @ torch.diag(torch.tensor(expected_s, dtype=torch.float64)) @ V.T
    restrained = algebra.restrain_singular_values(accumulated, sigma)
    assert torch.allclose(restrained, expected, atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(restrained)[:4], torch.tensor(sorted(expected_s, reverse=True), dtype=torch.float64))
    # below sigma nothing changes; the row space (a null-space confinement) is kept
    small = U @ torch.diag(torch.tensor([1.5, 1.0, 0.5, 0.1], dtype=torch.float64)) @ V.T
    assert torch.equal(algebra.restrain_singular_values(small, sigma), small)
    assert float((restrained @ complement).abs().max()) < 1e-10
    with pytest.raises(ValueError, match="sigma"):
        algebra.restrain_singular_values(accumulated, 0.0)


def test_keep_largest_relative_change_against_brute_force():
    generator = torch.Generator().manual_seed(4)
    delta = torch.randn(6, 9, generator=generator)
    weight = torch.randn(6, 9, generator=generator)
    weight[0, 0] = 0.0  # infinite relative change: kept first
    for fraction in (0.1, 0.2, 0.5, 1.0):
        kept = algebra.keep_largest_relative_change(delta, weight, fraction)
        entries = sorted(
            ((abs(float(delta[i, j])) / abs(float(weight[i, j])) if float(weight[i, j]) else math.inf, i, j)
             for i in range(6) for j in range(9)),
            key=lambda e: -e[0],
        )
        count = max(1, round(fraction * 54))
        expected = torch.zeros_like(delta)
        for _, i, j in entries[:count]:
            expected[i, j] = delta[i, j]
        assert torch.equal(kept, expected), fraction
        assert int((kept != 0).sum()) == count
    with pytest.raises(ValueError, match="fraction"):
        algebra.keep_largest_relative_change(delta, weight, 0.0)


def test_clamp_to_ball():
    change = torch.tensor([[-3.0, -0.5, 0.0, 0.2, 4.0]])
    assert torch.equal(algebra.clamp_to_ball(change, 1.0), torch.tensor([[-1.0, -0.5, 0.0, 0.2, 1.0]]))
    with pytest.raises(ValueError, match="radius"):
        algebra.clamp_to_ball(change, -1.0)


@pytest.mark.parametrize(("method", "projection", "message"), [
    ("ft", "null_space", "no closed-form update"),
    ("alphaedit", "null_space", "already confined"),
    ("rome", None, "method must be one of"),
    ("memit", "column_space", "projection must be one of"),
])
def test_bad_method_combinations_fail_before_loading(method, projection, message):
    with pytest.raises(ValueError, match=message):
        check_method(method, projection)
    with pytest.raises(ValueError, match=message):
        NullSpaceUpdate(layers=[1, 2], method=method, projection=projection)
    with pytest.raises(ValueError, match="rect_fraction"):
        NullSpaceUpdate(layers=[1, 2], method="rect", rect_fraction=1.5)


# --- one batch on a tiny model, against the explicit solve --------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words", initializer_range=0.1))
    model.requires_grad_(False)
    targets = ModelTargets(model)
    moments = collect_key_moments(model, tok, targets, [1, 2], load_corpus("tiny-corpus").texts, 128)
    return model, tok, targets, moments, read_requests(TINY_EDITS)[:4]


def one_batch(tiny, layers, **editor_args):
    """Apply one batch with random target values; returns the editor, the keys and residuals the
    update saw (before it), and each layer's weight before."""
    model, tok, targets, moments, requests = tiny
    before = {l: targets.linear_weight(l).detach().clone() for l in layers}
    current = block_outputs(model, tok, targets, requests, layers[-1])  # (u, d)
    goal = current + 0.5 * torch.randn(current.shape, generator=torch.Generator().manual_seed(5))
    keys = request_keys(model, tok, targets, requests, layers[0], ["{}"])  # (u, d_in)
    editor = SequentialEditor(targets, layers, moments, l2=1.0, mom2_weight=100.0, **editor_args)
    outcome = editor.apply_batch(
        goal,
        keys_at=lambda layer: request_keys(model, tok, targets, requests, layer, ["{}"]),
        current_values=lambda: block_outputs(model, tok, targets, requests, layers[-1]),
    )
    assert outcome.applied, outcome.reason
    return editor, keys, goal - current, before


def explicit_memit(keys, residuals, c0, mom2_weight=100.0):
    K, R = keys.double(), residuals.double()  # (u, d_in), (u, d_out)
    return torch.linalg.solve(mom2_weight * c0.double() + K.T @ K, K.T @ R).T  # (d_out, d_in)


def restore(tiny, before):
    for layer, weight in before.items():
        tiny[2].set_linear_weight(layer, weight)


def test_rect_batch_keeps_a_fifth_of_the_explicit_memit_update(tiny):
    _, keys, residuals, before = one_batch(tiny, [2], method="rect")
    try:
        change = (tiny[2].linear_weight(2).detach() - before[2]).double()
        expected = algebra.keep_largest_relative_change(
            explicit_memit(keys, residuals, tiny[3][2].mean()), before[2].double(), 0.2
        )
        assert int((change != 0).sum()) == round(0.2 * change.numel())
        assert torch.allclose(change, expected, atol=1e-5 * float(expected.abs().max()))
    finally:
        restore(tiny, before)


def test_prune_batch_restrains_the_explicit_memit_update(tiny):
    model, tok, targets, moments, requests = tiny
    sigma = float(torch.linalg.matrix_norm(targets.linear_weight(2).detach().double(), ord=2))
    editor, keys, residuals, before = one_batch(tiny, [2], method="prune")
    try:
        assert editor.sigma[2] == pytest.approx(sigma)
        delta = explicit_memit(keys, residuals, moments[2].mean())
        change = (targets.linear_weight(2).detach() - before[2]).double()
        assert torch.allclose(change, algebra.restrain_singular_values(delta, sigma), atol=1e-5 * float(delta.abs().max()))
        # with a tiny sigma the restraint is active: the same batch again lands on the formula
        restore(tiny, before)
        editor.sigma[2] = 1e-3
        editor.caches[2].zero_()
        goal = block_outputs(model, tok, targets, requests, 2) + residuals  # (u, d): the same targets
        editor.apply_batch(
            goal,
            keys_at=lambda layer: request_keys(model, tok, targets, requests, layer, ["{}"]),
            current_values=lambda: block_outputs(model, tok, targets, requests, 2),
        )
        change = (targets.linear_weight(2).detach() - before[2]).double()
        s_in, s_out = torch.linalg.svdvals(delta), torch.linalg.svdvals(change)
        rank = int((s_in > 1e-6 * s_in[0]).sum())  # the update's rank: at most the batch size
        expected = torch.log(s_in[:rank]) + 1e-3 - math.log(1e-3)  # every one of them is >= sigma
        assert torch.allclose(s_out[:rank], expected, rtol=1e-4)
    finally:
        restore(tiny, before)


@pytest.mark.parametrize("method", ["memit", "prune", "rect"])
def test_projected_methods_leave_preserved_keys_alone(tiny, method):
    targets, moments = tiny[2], tiny[3]
    editor, _, _, before = one_batch(
        tiny, [1, 2], method=method, projection="null_space", nullspace_rule="fraction", nullspace_threshold=0.5
    )
    try:
        for layer in (1, 2):
            _, vectors = torch.linalg.eigh(moments[layer].mean().double())  # ascending eigenvalues
            preserved = vectors[:, editor.null_spaces[layer].rank :]  # (d_in, d_in - r): C0's large directions
            change = (targets.linear_weight(layer).detach() - before[layer]).double()  # (d_out, d_in)
            assert float(change.norm()) > 0, f"{method}: layer {layer} was not edited"
            leak = float((change @ preserved).norm() / change.norm())
            assert leak < 1e-5, f"{method}+null_space: layer {layer} moves preserved keys ({leak:.1e})"
    finally:
        restore(tiny, before)


def test_finetune_stays_in_the_ball_and_lowers_the_target_nll(tiny):
    model, tok, targets, _, requests = tiny
    before = {l: targets.linear_weight(l).detach().clone() for l in range(targets.num_layers)}
    try:
        # the batched NLL against an unbatched float64 full-logit path
        nll = target_nll(model, tok, targets, requests)
        for request, value in zip(requests, nll.tolist()):
            prompt = tok(request.text)["input_ids"]
            answer = tok(" " + request.target_new, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].double(), -1)
            reference = -sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(answer)) / len(answer)
            assert value == pytest.approx(reference, abs=1e-4)
        config = FineTuneConfig(steps=10, lr=1e-2, norm_constraint=2e-3)
        result = finetune(model, tok, targets, requests, [1, 2], config)
        assert result.steps == 10 and result.loss < result.initial_loss
        assert float(target_nll(model, tok, targets, requests).mean()) == pytest.approx(result.loss, abs=1e-5)
        for layer, weight in before.items():
            change = targets.linear_weight(layer).detach() - weight
            if layer in (1, 2):
                assert float(change.abs().max()) <= 2e-3 + 1e-7 and float(change.abs().max()) > 1e-3
            else:
                assert torch.equal(change, torch.zeros_like(change)), f"layer {layer} is not edited"
        assert not any(p.requires_grad for p in model.parameters()), "the model stays frozen"
    finally:
        restore(tiny, before)


# --- every method end to end through the Trainer ------------------------------------------------


@pytest.mark.parametrize(("method", "projection"), [
    ("ft", None), ("prune", None), ("rect", None),
    ("memit", "null_space"), ("prune", "null_space"), ("rect", "null_space"),
])
def test_method_end_to_end(tmp_path, method, projection):
    module, data, update = build(
        tmp_path, method=method, limit=8, projection=projection, baseline=False,
    )
    export = ExportEditedModel(dir=str(tmp_path / "export"))  # alone beside the update: no drift, no history
    trainer(tmp_path, [update, export], standard=False).fit(module, datamodule=data)
    assert update.edits_applied == 8 and not update.rejected
    unedited = build(tmp_path / "fresh")[0]
    unedited.configure_model()
    for layer in range(module.targets.num_layers):
        changed = not torch.equal(module.targets.weight(layer), unedited.targets.weight(layer))
        assert changed == (layer in update.layers), f"layer {layer}"
    summary = json.loads((Path(export.exported_to) / "alphaedit_summary.json").read_text())
    assert (summary["method"], summary["projection"]) == (method, projection)
