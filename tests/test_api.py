"""`edit()` from Python: the docstring's example, the CLI's own objects, a loaded model edited in place or as a copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_alphaedit.api import EditResult, edit
from lightning_alphaedit.callbacks import ExportEditedModel, find_callback
from lightning_alphaedit.cli import run
from lightning_alphaedit.export import DELTAS_FILE
from lightning_alphaedit.requests import EditDataError, EditRequest
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = {"evaluation.generation": False, "drift.texts": 0, "trainer.logger": False}
"""Settings that make a tiny run quicker without changing what is edited."""


def tiny_config_model():
    """The tiny model configs/tiny.yaml describes, built here: an already loaded model."""
    raw = yaml.safe_load(TINY.read_text())["model"]["lm"]["tiny"]
    return tiny_model_and_tokenizer(TinyModelConfig(**raw))


def test_the_docstring_example_runs_on_the_tiny_model():
    example = "\n".join(line[8:] for line in edit.__doc__.split("\n\n")[1].splitlines())
    assert 'edit("smollm2-135m"' in example and "layers=[4, 5, 6, 7, 8]" in example  # the README's example
    code = example.replace('"smollm2-135m"', '"tiny"').replace("layers=[4, 5, 6, 7, 8]", "layers=[1, 2]")
    scope: dict = {}
    exec(compile(code, "edit.__doc__", "exec"), scope)
    result = scope["result"]
    assert isinstance(result, EditResult) and isinstance(result.model, torch.nn.Module)
    assert [r.subject for r in result.requests] == ["Germany"]
    assert set(result.scores) == {"unedited", "edited"} and "efficacy_argmax" in result.scores["edited"]
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["edit"]["layers"] == [1, 2] and saved["model"]["lm"]["tiny"]["architecture"] == "gpt2"
    # the requests went through a file the saved config names, so the run can be repeated from it
    assert Path(saved["data"]["path"]).is_file() and "Vienna" in Path(saved["data"]["path"]).read_text()
    assert (result.edited_model_dir / DELTAS_FILE).is_file()
    answers = result.ask()
    assert [a.target for a in answers] == ["Vienna"] and answers[0].prompt == "The capital of Germany is"


def test_edit_builds_what_the_cli_builds(tmp_path):
    """Same config, same seed: the API's run and the CLI's run change the weights identically."""
    cli = run(["fit", "--config", str(TINY), "--data.limit", "8", "--trainer.enable_progress_bar", "false"])
    cli_deltas = load_file(str(Path(find_callback(cli.trainer, ExportEditedModel).exported_to) / DELTAS_FILE))
    result = edit("tiny", limit=8, enable_progress_bar=False)
    assert result.run_dir != Path(cli.trainer.default_root_dir)
    assert result.scores["edited"] == pytest.approx(cli.model.test_results, rel=1e-6)
    assert sorted(result.deltas) == sorted(cli_deltas)
    for name, delta in cli_deltas.items():
        torch.testing.assert_close(result.deltas[name], delta, rtol=0, atol=1e-6, msg=name)
        assert delta.abs().max() > 0, name


def test_a_loaded_model_is_edited_in_place_or_as_a_copy():
    requests = [EditRequest("a", "Norway", "The capital of {} is", "Paris", "Oslo"),
                {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Madrid"}]
    model, tokenizer = tiny_config_model()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    copied = edit(model, requests, tokenizer=tokenizer, config="tiny", copy=True, **FAST)
    assert copied.model is not model
    for name, param in model.named_parameters():  # the model passed in is untouched
        assert torch.equal(param, original[name]), name
    changed = [n for n, p in copied.model.named_parameters() if not torch.equal(p, original[n])]
    assert sorted(changed) == sorted(copied.deltas) and len(changed) == 2  # layers 1 and 2, nothing else

    in_place = edit(model, requests, tokenizer=tokenizer, config="tiny", **FAST)
    assert in_place.model is model
    edited = dict(copied.model.named_parameters())
    for name, param in model.named_parameters():  # the same edit, now in the caller's model
        torch.testing.assert_close(param, edited[name], rtol=0, atol=1e-6, msg=name)
    for name, delta in in_place.deltas.items():  # and its deltas are measured from the caller's weights
        torch.testing.assert_close(original[name] + delta, param_of(model, name), rtol=0, atol=1e-6)


def param_of(model, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name].detach()


def test_settings_by_short_name_dotted_name_or_double_underscore():
    from lightning_alphaedit.api import _resolve

    fields = ["edit.layers", "data.limit", "trace.limit", "data.batch_size", "model.evaluation.batch_size",
              "model.values.lr"]
    assert _resolve("layers", fields) == "edit.layers"
    assert _resolve("limit", fields) == "data.limit" and _resolve("trace.limit", fields) == "trace.limit"
    assert _resolve("data__batch_size", fields) == "data.batch_size"
    assert _resolve("model.values.lr", fields) == "model.values.lr"
    with pytest.raises(TypeError, match=re.escape("data.batch_size, model.evaluation.batch_size")):
        _resolve("batch_size", fields)
    with pytest.raises(TypeError, match="unknown setting 'layer'"):
        _resolve("layer", fields)


def test_bad_requests_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(EditDataError, match=r"record 1.*target_new.*missing"):
        edit("tiny", [{"prompt": "The capital of {} is", "subject": "Norway", "target_new": "Paris"},
                      {"prompt": "The capital of {} is", "subject": "Japan"}])
    with pytest.raises(EditDataError, match=r"record 0.*prompt"):
        edit("tiny", [{"prompt": "The capital of Norway is", "subject": "Norway", "target_new": "Paris"}])
    with pytest.raises(TypeError, match="unknown setting"):
        edit("tiny", limit=2, no_such_field=1)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        edit(tiny_config_model()[0], [])
    assert not list((tmp_path / "runs").rglob("config.yaml"))  # no run was started
