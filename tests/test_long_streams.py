"""The long-stream options of AlphaEdit's update on a tiny model: the leakage penalty against the
explicit d_in x d_in formula, the projector refresh against the blended moment and the
re-projected cache, and a resume across a refresh against the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_alphaedit import algebra
from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.keys import block_outputs, request_keys
from lightning_alphaedit.requests import read_requests
from lightning_alphaedit.statistics import collect_key_moments
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
from lightning_alphaedit.update import SequentialEditor, check_long_stream_options

TINY_EDITS = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"
LAYERS = [1, 2]
BATCH = 4


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words", initializer_range=0.1))
    model.requires_grad_(False)
    targets = ModelTargets(model)
    moments = collect_key_moments(model, tok, targets, LAYERS, load_corpus("tiny-corpus").texts, 128)
    return model, tok, targets, moments, read_requests(TINY_EDITS)[:16]


def weights(targets) -> dict[int, torch.Tensor]:
    return {layer: targets.weight(layer).detach().clone() for layer in LAYERS}


def set_weights(targets, saved) -> None:
    with torch.no_grad():
        for layer, weight in saved.items():
            targets.weight(layer).copy_(weight)


def goal_of(tiny, batch: int) -> torch.Tensor:
    """Seeded target values for batch ``batch`` of the unedited model."""
    model, tok, targets, _, requests = tiny
    chunk = requests[batch * BATCH : (batch + 1) * BATCH]
    current = block_outputs(model, tok, targets, chunk, LAYERS[-1])  # (u, d)
    return current + 0.5 * torch.randn(current.shape, generator=torch.Generator().manual_seed(batch))


def apply(tiny, editor: SequentialEditor, batch: int, goal: torch.Tensor):
    model, tok, targets, _, requests = tiny
    chunk = requests[batch * BATCH : (batch + 1) * BATCH]
    outcome = editor.apply_batch(
        goal,
        keys_at=lambda layer: request_keys(model, tok, targets, chunk, layer, ["{}"]),
        current_values=lambda: block_outputs(model, tok, targets, chunk, LAYERS[-1]),
    )
    assert outcome.applied, outcome.reason
    return outcome


def run(tiny, batches: range, goals, **options) -> tuple[SequentialEditor, dict[int, torch.Tensor]]:
    editor = SequentialEditor(tiny[2], LAYERS, tiny[3], l2=1.0, **options)
    for batch in batches:
        apply(tiny, editor, batch, goals[batch])
    return editor, weights(tiny[2])


@pytest.fixture(scope="module")
def goals(tiny):
    return [goal_of(tiny, b) for b in range(4)]


@pytest.fixture
def unedited(tiny):
    saved = weights(tiny[2])
    yield saved
    set_weights(tiny[2], saved)


def test_options_off_reproduce_the_update_exactly(tiny, goals, unedited):
    _, plain = run(tiny, range(2), goals)
    set_weights(tiny[2], unedited)
    _, zero = run(tiny, range(2), goals, leakage_weight=0.0)
    set_weights(tiny[2], unedited)
    # a refresh that never comes keeps the full cache but changes nothing
    editor, never = run(tiny, range(2), goals, refresh_every=10_000)
    for layer in LAYERS:
        assert torch.equal(zero[layer], plain[layer]) and torch.equal(never[layer], plain[layer])
        assert not torch.equal(plain[layer], unedited[layer])
    assert editor.edits == 2 * BATCH


def test_leakage_penalty_matches_the_full_formula_on_a_model(tiny, goals, unedited):
    model, tok, targets, moments, requests = tiny
    leakage_weight = 50.0
    chunk = requests[:BATCH]
    keys = request_keys(model, tok, targets, chunk, 2, ["{}"]).double()  # (u, d_in)
    residuals = (goals[0] - block_outputs(model, tok, targets, chunk, 2)).double()  # (u, d_out)
    before = targets.linear_weight(2).detach().clone()  # (d_out, d_in)
    editor = SequentialEditor(targets, [2], moments, l2=1.0, leakage_weight=leakage_weight)
    apply(tiny, editor, 0, goals[0])
    change = (targets.linear_weight(2).detach() - before).double()
    # the explicit d_in x d_in solve: delta^T = (P (K^T K + λ1 C0) + λ I)^-1 P K^T R
    c0 = moments[2].mean().double()
    space = algebra.null_space(c0)
    P = space.basis @ space.basis.T
    d_in = c0.shape[0]
    A = P @ (keys.T @ keys + leakage_weight * c0) + 1.0 * torch.eye(d_in, dtype=torch.float64)
    expected = torch.linalg.solve(A, P @ keys.T @ residuals).T  # (d_out, d_in)
    assert ((change - expected).norm() / expected.norm()) < 1e-4
    without = torch.linalg.solve(P @ (keys.T @ keys) + torch.eye(d_in, dtype=torch.float64), P @ keys.T @ residuals).T
    assert ((change - without).norm() / without.norm()) > 1e-3  # the penalty did something


def test_refresh_rebuilds_the_null_space_and_reprojects_the_cache(tiny, goals, unedited):
    model, tok, targets, moments, requests = tiny
    leakage_weight = 10.0
    editor = SequentialEditor(targets, LAYERS, moments, l2=1.0, leakage_weight=leakage_weight, refresh_every=2 * BATCH)
    original = {layer: editor.null_spaces[layer].basis.clone() for layer in LAYERS}
    full = {layer: torch.zeros_like(moments[layer].mean(), dtype=torch.float64) for layer in LAYERS}
    for batch in range(3):
        apply(tiny, editor, batch, goals[batch])
        chunk = requests[batch * BATCH : (batch + 1) * BATCH]
        for layer in LAYERS:  # the keys of the edited model, as the cache takes them
            k = request_keys(model, tok, targets, chunk, layer, ["{}"]).double()
            full[layer] += k.T @ k
        for layer in LAYERS:
            torch.testing.assert_close(editor.full_caches[layer].double(), full[layer], rtol=1e-5, atol=1e-4)
        if batch == 0:  # before the refresh: C0's null space
            assert all(torch.equal(editor.null_spaces[layer].basis, original[layer]) for layer in LAYERS)
        if batch == 1:  # the refresh after 8 edits: the null space of the blend, written here
            for layer in LAYERS:
                c0 = moments[layer].mean().double()
                blend = (full[layer] / (2 * BATCH) + leakage_weight * c0) / (leakage_weight + 1)
                values, vectors = torch.linalg.eigh(blend)
                kept = vectors[:, values < 2e-2]  # (d_in, r')
                basis = editor.null_spaces[layer].basis.double()
                assert basis.shape == kept.shape
                torch.testing.assert_close(basis @ basis.T, kept @ kept.T, rtol=0, atol=1e-4)
                torch.testing.assert_close(
                    editor.leakages[layer].double(), leakage_weight * basis.T @ c0 @ basis, rtol=1e-4, atol=1e-5
                )
                assert basis.shape != original[layer].shape or not torch.allclose(basis.float(), original[layer])
        if batch >= 1:  # the subspace cache is the full cache in the current basis
            for layer in LAYERS:
                basis = editor.null_spaces[layer].basis.double()
                torch.testing.assert_close(
                    editor.caches[layer].double(), basis.T @ full[layer] @ basis, rtol=1e-4, atol=1e-3
                )


def test_resume_across_a_refresh_equals_the_uninterrupted_run(tiny, goals, unedited, tmp_path):
    options = dict(leakage_weight=10.0, refresh_every=BATCH + 2)  # refreshes after batches 2 and 3
    _, uninterrupted = run(tiny, range(4), goals, **options)
    set_weights(tiny[2], unedited)
    first, _ = run(tiny, range(2), goals, **options)
    torch.save({"editor": first.state_dict(), "weights": weights(tiny[2])}, tmp_path / "state.pt")
    set_weights(tiny[2], unedited)  # a fresh process: the unedited model, a new editor
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = SequentialEditor(tiny[2], LAYERS, tiny[3], l2=1.0, **options)
    resumed.load_state_dict(state["editor"])
    set_weights(tiny[2], state["weights"])
    assert resumed.edits == 2 * BATCH
    for batch in range(2, 4):
        apply(tiny, resumed, batch, goals[batch])
    for layer in LAYERS:
        assert torch.equal(weights(tiny[2])[layer], uninterrupted[layer])
    # a checkpoint made with other options is refused, not silently used
    plain, _ = run(tiny, range(0), goals)
    with pytest.raises(ValueError, match="leakage_weight=0.0 refresh_every=None"):
        SequentialEditor(tiny[2], LAYERS, tiny[3], l2=1.0, **options).load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="leakage_weight=10.0"):
        SequentialEditor(tiny[2], LAYERS, tiny[3], l2=1.0, leakage_weight=20.0, refresh_every=BATCH + 2).load_state_dict(
            first.state_dict()
        )


@pytest.mark.parametrize("method, leakage, every, message", [
    ("alphaedit", -1.0, None, "leakage_weight must be"),
    ("alphaedit", 0.0, 0, "refresh_every must be"),
    ("memit", 10.0, None, "apply to the alphaedit method"),
    ("memit", 0.0, 100, "apply to the alphaedit method"),
])
def test_bad_options_are_refused(method, leakage, every, message):
    with pytest.raises(ValueError, match=message):
        check_long_stream_options(method, leakage, every)


def test_options_through_the_trainer(tmp_path):
    """Leakage penalty, refresh, norm anchor and health figures in one run of the real Trainer:
    the anchor is the cached calibration, skipped edits are reported, health is logged and in
    the history."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger
    from test_pipeline import build

    from lightning_alphaedit.callbacks import DriftMonitor, EditHistory
    from lightning_alphaedit.run_folder import run_directory
    from lightning_alphaedit.norm_anchor import NormAnchorConfig

    module, data, update = build(
        tmp_path, limit=8, baseline=False, leakage_weight=50.0, refresh_every=4,
        norm_anchor=NormAnchorConfig(enabled=True, count=8, skip_factor=1.05),
    )
    logger = WandbLogger(project="tests", save_dir=str(tmp_path), offline=True)
    pl_trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
        logger=logger, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(tmp_path), callbacks=[update, DriftMonitor(health=True), EditHistory()],  # no export
    )
    try:
        pl_trainer.fit(module, datamodule=data)
        pl_trainer.test(module, datamodule=data, verbose=False)
        skipped_in_wandb = list(logger.experiment.summary["norm_anchor/skipped"])
    finally:  # as the CLI does: an unfinished W&B run would take in the next run of this process
        logger.experiment.finish()
    assert update.edits_applied == 8 and not update.rejected
    assert update.editor.edits == 8 and update.editor.full_caches  # refreshed twice, after 4 and 8 edits
    run = run_directory(pl_trainer)
    results = json.loads((run / "results.json").read_text())
    assert skipped_in_wandb == update.anchor_skipped
    assert 0 < len(update.anchor_skipped) < 8  # 1.05 x the anchor: some values are above it, not all
    cached = [json.loads(p.read_text()) for p in (tmp_path / "stats" / "norm-anchor").iterdir()]
    assert len(cached) == 1 and results["norm_anchor"]["anchor"] == cached[0]["anchor"] > 0
    assert set(results["norm_anchor"]["skipped"]) <= {r.case_id for r in data.requests}
    assert results["norm_anchor"]["skipped"] == update.anchor_skipped
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    for layer in LAYERS:
        assert record[f"health/weight_ratio_layer{layer}"] != 1.0
        assert record[f"health/delta_norm_layer{layer}"] > 0
        assert record[f"health/leakage_layer{layer}"] > 0
    assert record["health/target_norm"] > 0


def test_health_figures_against_the_formula(tiny, goals, unedited):
    from lightning_alphaedit.drift import DriftConfig, DriftReference
    from lightning_alphaedit.health import BatchHealth

    model, tok, targets, moments, requests = tiny
    texts = load_corpus("tiny-corpus").texts[-6:]
    reference = DriftReference(targets, tok, LAYERS, texts, DriftConfig(texts=6, max_length=32))
    editor = SequentialEditor(targets, LAYERS, moments, l2=1.0)
    apply(tiny, editor, 0, goals[0])  # an earlier batch: W_t is not W_0
    original = {layer: float(unedited[layer].float().norm()) for layer in LAYERS}
    health = BatchHealth(targets, LAYERS, original, reference)
    before = {layer: targets.linear_weight(layer).detach().double().clone() for layer in LAYERS}
    chunk = requests[BATCH : 2 * BATCH]
    outcome = editor.apply_batch(
        goals[1],
        keys_at=lambda layer: request_keys(model, tok, targets, chunk, layer, ["{}"]),
        current_values=lambda: block_outputs(model, tok, targets, chunk, LAYERS[-1]),
        watch=health.watch,
    )
    figures = health.figures(outcome.delta_norms, goals[1])
    for layer in LAYERS:
        after = targets.linear_weight(layer).detach().double()
        change = after - before[layer]  # (d_out, d_in)
        keys = torch.cat(reference.keys[layer]).double()  # (n, d_in) held-out keys of the unedited model
        w0 = unedited[layer].double()
        w0 = w0 if w0.shape == after.shape else w0.T  # GPT-2's Conv1D stores the transpose
        assert figures[f"health/weight_ratio_layer{layer}"] == pytest.approx(float(after.norm() / w0.norm()), rel=1e-5)
        assert figures[f"health/delta_norm_layer{layer}"] == pytest.approx(float(change.norm()), rel=1e-4)
        leakage = float((keys @ change.T).norm() / (keys @ w0.T).norm())
        assert figures[f"health/leakage_layer{layer}"] == pytest.approx(leakage, rel=1e-4) and leakage > 0
    assert figures["health/target_norm"] == pytest.approx(float(goals[1].double().norm(dim=1).mean()), rel=1e-6)
