"""Null-space selection rules on spectra with known answers, and the `spectrum` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_alphaedit.algebra import KeyMoments, default_threshold, kept_dimension, null_space
from lightning_alphaedit.callbacks import NullSpaceUpdate
from lightning_alphaedit.cli import run
from lightning_alphaedit.spectrum import parse_rule
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
from lightning_alphaedit.update import SequentialEditor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPECTRUM = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64)  # total 1.1111


@pytest.mark.parametrize("rule, threshold, expected", [
    ("absolute", 2e-2, 3),      # 1e-4, 1e-3, 1e-2 < 0.02
    ("absolute", 1e-2, 2),      # strictly below
    ("relative", 1e-2, 2),      # below 0.01 x 1.0
    ("relative", 0.5, 4),
    ("energy", 0.01, 3),        # 0.0111 <= 0.01 x 1.1111
    ("energy", 0.001, 2),       # 0.0011 <= 0.0011111
    ("energy", 1.0, 5),
    ("fraction", 0.4, 2),
    ("fraction", 1.0, 5),
])
def test_kept_dimension_on_a_known_spectrum(rule, threshold, expected):
    assert kept_dimension(SPECTRUM, rule, threshold) == expected


@pytest.mark.parametrize("rule, default, expected", [
    ("absolute", 2e-2, 3), ("relative", 1e-2, 2), ("energy", 0.3, 4), ("fraction", 0.7, 3),  # 0.3 x 1.1111 >= 0.1111
])
def test_a_rule_without_threshold_takes_its_default(rule, default, expected):
    assert default_threshold(rule) == default
    assert kept_dimension(SPECTRUM, rule) == expected == kept_dimension(SPECTRUM, rule, default)
    assert NullSpaceUpdate(layers=[1], nullspace_rule=rule).nullspace_threshold == default
    assert NullSpaceUpdate(layers=[1]).nullspace_threshold == 2e-2  # the reference by default


@pytest.mark.parametrize("rule, threshold, message", [
    ("bogus", 0.1, "must be one of"), ("energy", 1.5, r"fraction in \(0, 1\]"), ("absolute", 0.0, "> 0"),
    ("relative", float("nan"), "> 0"),
])
def test_bad_rules_are_refused(rule, threshold, message):
    with pytest.raises(ValueError, match=message):
        kept_dimension(SPECTRUM, rule, threshold)
    with pytest.raises(ValueError, match=message):
        NullSpaceUpdate(layers=[1], nullspace_rule=rule, nullspace_threshold=threshold)


@pytest.mark.parametrize("rule, threshold, rank", [("absolute", 2e-2, 3), ("relative", 0.5, 4), ("energy", 0.001, 2),
                                                  ("fraction", 0.2, 1)])
def test_every_rule_keeps_the_smallest_eigen_directions(rule, threshold, rank):
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    c0 = q @ torch.diag(SPECTRUM) @ q.T
    space = null_space(c0, threshold, rule)
    assert space.rank == rank and space.rule == rule
    expected = q[:, :rank] @ q[:, :rank].T  # the projector on the eigenvectors of the smallest eigenvalues
    torch.testing.assert_close(space.projector(), expected, rtol=0, atol=1e-10)


def test_the_editor_uses_the_configured_rule():
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words"))
    targets = ModelTargets(model)
    moments = {}
    for layer in (1, 2):
        moments[layer] = KeyMoments(targets.key_size(layer))
        moments[layer].add(torch.randn(1000, targets.key_size(layer), generator=torch.Generator().manual_seed(layer)))
    editor = SequentialEditor(targets, [1, 2], moments, nullspace_rule="fraction", nullspace_threshold=0.5)
    assert [editor.null_spaces[l].rank for l in (1, 2)] == [128, 128]


def test_parse_rule():
    assert parse_rule("energy:0.05") == ("energy", 0.05)
    with pytest.raises(ValueError, match="RULE:THRESHOLD"):
        parse_rule("energy")


def test_spectrum_command_on_the_tiny_config(tmp_path, capsys):
    out = tmp_path / "spectrum"
    run(["spectrum", "--config", str(CONFIGS / "tiny.yaml"), "--spectrum.output", str(out),
         "--edit.nullspace_rule", "energy", "--edit.nullspace_threshold", "0.05"])
    data = json.loads((out / "spectrum.json").read_text())
    assert [row["layer"] for row in data["layers"]] == [1, 2]  # tiny.yaml edits layers 1 and 2
    for row in data["layers"]:
        assert list(row["kept"])[0] == "energy:0.05"  # the configured rule comes first
        values = torch.tensor(data["eigenvalues"][str(row["layer"])], dtype=torch.float64)
        assert row["kept"]["energy:0.05"] == kept_dimension(values, "energy", 0.05)
        assert row["kept"]["fraction:0.5"] == 128 and row["d_in"] == 256
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert "kept energy:0.05" in (out / "spectrum.md").read_text()
    assert "kept absolute:0.02" in capsys.readouterr().out
