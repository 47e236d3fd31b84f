"""Norm-anchored target values: the rescaling and the calibration against the formula, written
here with plain hooks and explicit arithmetic, and the cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_alphaedit.norm_anchor import (
    NormAnchorConfig,
    anchor_targets,
    cached_anchor,
    calibrate_anchor,
    calibration_requests,
    trimmed_mean,
)
from lightning_alphaedit.prompts import encode_prompts
from lightning_alphaedit.requests import read_requests
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
from lightning_alphaedit.values import ValueOptimizationConfig, optimize_values

TINY_EDITS = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"
CONTEXTS = ["{}", "Yes. {}"]


def test_anchor_targets_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    initial = torch.randn(6, 5, generator=g, dtype=torch.float64)  # z0
    mlp = torch.randn(6, 5, generator=g, dtype=torch.float64)  # v0
    delta = torch.randn(6, 5, generator=g, dtype=torch.float64) * torch.tensor([0.1, 0.5, 1, 2, 4, 8.0]).double()[:, None]
    anchor = 2.0
    z, skipped = anchor_targets(initial + delta, initial, mlp, anchor, 2.0)
    for i in range(6):
        v = mlp[i] + delta[i]
        if float(v.norm()) > 2 * anchor:
            assert skipped[i] and torch.equal(z[i], initial[i])
        else:
            assert not skipped[i]
            torch.testing.assert_close(z[i], initial[i] - mlp[i] + anchor * v / v.norm())
            assert math.isclose(float((z[i] - initial[i] + mlp[i]).norm()), anchor, rel_tol=1e-12)
    assert 0 < int(skipped.sum()) < 6


def test_trimmed_mean_drops_the_largest_five_percent():
    norms = torch.arange(1, 41, dtype=torch.float32)  # 40 values: the 2 largest go
    assert trimmed_mean(norms[torch.randperm(40)], 0.05) == pytest.approx(sum(range(1, 39)) / 38)
    assert trimmed_mean(norms[:10], 0.05) == pytest.approx(5.5)  # floor(0.5) = 0 dropped


def test_calibration_on_a_tiny_model_matches_the_formula():
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words", initializer_range=0.1))
    model.requires_grad_(False)
    targets = ModelTargets(model)
    requests = read_requests(TINY_EDITS)[:20]
    values = ValueOptimizationConfig(num_grad_steps=4, lr=0.5)
    layer = 2
    anchor, norms = calibrate_anchor(model, tokenizer, targets, requests, layer, CONTEXTS, values, 0.05)

    # independently: δ from the optimization, v0 from a plain hook on the projection, one prompt at a time
    result = optimize_values(model, tokenizer, targets, requests, layer, CONTEXTS, values)
    expected = []
    for request, z, z0 in zip(requests, result.targets, result.initial):
        batch = encode_prompts(tokenizer, [request.prompt], [request.subject])
        seen = {}
        handle = targets.projection(layer).register_forward_hook(lambda m, a, o: seen.__setitem__("v", o[0]))
        with torch.no_grad():
            model(input_ids=batch.input_ids)
        handle.remove()
        v0 = seen["v"][int(batch.subject_last[0])].double()
        expected.append(float((v0 + (z - z0).double()).norm()))
    torch.testing.assert_close(norms.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    kept = sorted(expected)[:19]  # 20 requests: the largest one dropped
    assert anchor == pytest.approx(sum(kept) / 19, rel=1e-5)


def test_anchor_cache_is_keyed_and_written_atomically(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return 3.5

    key = {"model": "m", "layers": [1, 2], "values": {"lr": 0.5}, "requests": "abc"}
    assert cached_anchor(key, str(tmp_path), compute) == 3.5
    assert cached_anchor(key, str(tmp_path), lambda: pytest.fail("recomputed a cached anchor")) == 3.5
    assert cached_anchor({**key, "values": {"lr": 1.0}}, str(tmp_path), compute) == 3.5 and len(calls) == 2
    files = list((tmp_path / "norm-anchor").iterdir())
    assert len(files) == 2 and all(f.suffix == ".json" and not f.name.startswith(".") for f in files)
    for f in files:  # a corrupted file is recomputed, never trusted
        f.write_text("{not json")
    assert cached_anchor(key, str(tmp_path), compute) == 3.5 and len(calls) == 3
    assert json.loads(next(f for f in files if "not" not in f.read_text()).read_text())["anchor"] == 3.5
    with pytest.raises(ValueError, match="not usable"):
        cached_anchor({**key, "model": "n"}, str(tmp_path), lambda: float("nan"))


def test_calibration_requests_from_a_file_or_the_stream(tmp_path):
    _, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words"))
    first = calibration_requests(NormAnchorConfig(enabled=True, count=5), TINY_EDITS, "auto", tokenizer)
    assert [r.case_id for r in first] == [r.case_id for r in read_requests(TINY_EDITS)[:5]]
    other = tmp_path / "calibration.jsonl"
    other.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in read_requests(TINY_EDITS)[10:13]))
    chosen = calibration_requests(NormAnchorConfig(enabled=True, requests=str(other), count=100), TINY_EDITS, "auto", tokenizer)
    assert [r.case_id for r in chosen] == ["tiny-10", "tiny-11", "tiny-12"]
    with pytest.raises(ValueError, match="count"):
        NormAnchorConfig(count=0)
