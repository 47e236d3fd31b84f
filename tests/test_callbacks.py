"""Each standard callback on its own beside NullSpaceUpdate, and the standard set as the CLI adds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import LAYERS, build, trainer

from lightning_alphaedit.callbacks import (
    STANDARD_MONITORS,
    DriftMonitor,
    EditCheckpoint,
    EditHistory,
    ExportEditedModel,
    NullSpaceUpdate,
    find_callback,
)
from lightning_alphaedit.cli import run
from lightning_alphaedit.drift import DriftConfig, DriftReference
from lightning_alphaedit.export import DELTAS_FILE, EDITS_FILE
from lightning_alphaedit.run_folder import HISTORY_FILE, RESULTS_FILE
from lightning_alphaedit.requests import read_requests
from lightning_alphaedit.resume import read_checkpoint
from lightning_alphaedit.wild import FIGURES

ROOT = Path(__file__).resolve().parents[1]

RESULTS_KEYS = ["method", "projection", "label", "layers", "model", "edits_applied", "batches_rejected",
                "requests_evaluated", "unedited", "edited", "history", "timing_seconds", "memory"]
"""``results.json`` of a tiny run, in order, as the single edit callback wrote it."""
SCORES = ["efficacy", "efficacy_magnitude", "efficacy_argmax", "efficacy_token_acc", "generalization",
          "generalization_magnitude", "generalization_argmax", "generalization_token_acc", "specificity",
          "specificity_magnitude", "specificity_argmax", "specificity_token_acc", "generation_efficacy",
          "generation_generalization", "fluency"]
DRIFT = ["drift/output_change_layer1", "drift/output_change_layer2", "drift/hidden_shift", "drift/kl",
         "drift/perplexity", "drift/perplexity_unedited"]
WILD = [f"wild/question/{f}" for f in FIGURES]
TEACHER_FORCED = [f"val/{s}" for s in SCORES[:12]]
VALIDATED = TEACHER_FORCED + [f"val/{s}" for s in WILD]
PHASES = ["statistics", "projector", "drift_reference", "baseline", "values", "keys", "solve", "cache", "validation", "test"]
EXPORTED = ["alphaedit_deltas.safetensors", "alphaedit_edits.jsonl", "alphaedit_summary.json", "config.json",
            "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_the_default_set_writes_what_the_single_callback_wrote(tmp_path):
    """The CLI's standard set on the tiny config: the same files, keys and figures, in the same order."""
    cli = run(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.limit", "8",
               "--trainer.enable_progress_bar", "false"])
    kinds = [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, (NullSpaceUpdate, *STANDARD_MONITORS.values()))]
    assert kinds == [NullSpaceUpdate, DriftMonitor, EditHistory, EditCheckpoint, ExportEditedModel]
    history_callback = find_callback(cli.trainer, EditHistory)
    folder = Path(history_callback.results_path).parent
    results = json.loads((folder / RESULTS_FILE).read_text())
    assert list(results) == RESULTS_KEYS
    assert list(results["unedited"]) == SCORES + WILD and list(results["edited"]) == SCORES + WILD + DRIFT
    assert list(results["timing_seconds"]) == PHASES
    lines = [json.loads(line) for line in (folder / HISTORY_FILE).read_text().splitlines()]
    assert [list(line) for line in lines] == [
        ["edits", "epoch", *VALIDATED], ["edits", "epoch", *DRIFT, *VALIDATED, "time/edit_seconds"],
    ]
    assert lines == results["history"] == history_callback.history
    assert results["edited"]["drift/kl"] > 0 and results["edits_applied"] == 8
    assert sorted(p.name for p in (folder / "edited_model").iterdir()) == EXPORTED
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["config.yaml", HISTORY_FILE, RESULTS_FILE]


def test_each_monitor_can_be_left_out_by_its_key(tmp_path):
    cli = run(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.limit", "4", "--data.edits_per_epoch", "4",
               "--model.evaluation.generation", "false", "--drift.texts", "0", "--export.enabled", "false",
               "--checkpoint.enabled", "false", "--history.enabled", "false", "--trainer.enable_progress_bar", "false"])
    kinds = [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, (NullSpaceUpdate, *STANDARD_MONITORS.values()))]
    assert kinds == [NullSpaceUpdate, DriftMonitor]  # drift stays, measuring nothing
    assert find_callback(cli.trainer, DriftMonitor).reference is None
    assert find_callback(cli.trainer, NullSpaceUpdate).edits_applied == 4
    runs = Path(cli.trainer.default_root_dir)
    for name in (RESULTS_FILE, HISTORY_FILE, "last.ckpt", DELTAS_FILE):
        assert not list(runs.rglob(name)), name


def test_drift_alone_measures_against_the_unedited_model(tmp_path):
    """DriftMonitor without history, checkpoint or export: its reference is the unedited model's
    (a second, independent reference built on the restored original weights measures the same)."""
    module, data, update = build(tmp_path, limit=8, baseline=False)
    drift = DriftMonitor(texts=4, health=True)
    pl_trainer = trainer(tmp_path, [update, drift], standard=False)
    pl_trainer.fit(module, datamodule=data)
    assert pl_trainer.callback_metrics["health/leakage_layer1"] > 0  # health from the same held-out keys
    pl_trainer.test(module, datamodule=data, verbose=False)
    assert update.edits_applied == 8
    assert set(drift.test_figures) == {d.removeprefix("drift/") for d in DRIFT} and drift.test_figures["kl"] > 0
    assert update.statistics.sample_count >= len(update.corpus.texts)  # build's sample: the whole corpus
    held_out = list(update.corpus.texts[-4:])  # so drift falls back to its last documents
    with update.unedited(module):
        independent = DriftReference(module.targets, module.tokenizer, LAYERS, held_out, DriftConfig(texts=4))
        assert drift.reference.measure()["kl"] == pytest.approx(0.0, abs=1e-9)  # unedited against itself
    assert independent.measure() == pytest.approx(drift.reference.measure(), rel=1e-6)
    assert not list(tmp_path.rglob(HISTORY_FILE)) and not list(tmp_path.rglob("last.ckpt"))


def test_drift_before_the_update_is_refused(tmp_path):
    module, data, update = build(tmp_path, limit=4, baseline=False)
    with pytest.raises(RuntimeError, match="DriftMonitor must come after NullSpaceUpdate"):
        trainer(tmp_path, [DriftMonitor(texts=2), update], standard=False).fit(module, datamodule=data)


def test_export_alone_writes_the_edited_model(tmp_path):
    module, data, update = build(tmp_path, limit=8, baseline=False)
    export = ExportEditedModel(dir=str(tmp_path / "exported"))
    trainer(tmp_path, [update, export], standard=False).fit(module, datamodule=data)
    assert export.exported_to == tmp_path / "exported"
    deltas = load_file(str(export.exported_to / DELTAS_FILE))
    for layer in LAYERS:  # edited minus original, from the live weights and the update's originals
        name = module.targets.weight_name(layer)
        expected = module.targets.weight(layer).detach().float() - update.original_weights[layer].float()
        torch.testing.assert_close(deltas[name], expected, rtol=0, atol=0)
    assert [r.case_id for r in read_requests(export.exported_to / EDITS_FILE)] == [f"tiny-{i}" for i in range(8)]
    assert not list(tmp_path.rglob(HISTORY_FILE)) and not list(tmp_path.rglob("last.ckpt"))


def test_export_folder_is_checked_before_the_statistics(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    module, data, update = build(tmp_path, limit=4)
    with pytest.raises(ValueError, match="notes.txt"):
        trainer(tmp_path, [update, ExportEditedModel(dir=str(taken))], standard=False).fit(module, datamodule=data)
    assert not (tmp_path / "stats").exists() and (taken / "notes.txt").read_text() == "mine"


def test_checkpoint_alone_is_a_resumable_checkpoint(tmp_path):
    module, data, update = build(tmp_path, limit=16, baseline=False)
    checkpoint = EditCheckpoint()
    trainer(tmp_path, [update, checkpoint], max_epochs=1, standard=False).fit(module, datamodule=data)
    assert checkpoint.checkpoint_path == tmp_path / "checkpoints" / "last.ckpt"
    state = read_checkpoint(checkpoint.checkpoint_path)  # recognised as ours
    assert state["callbacks"]["NullSpaceUpdate"]["edits_applied"] == 8 and "EditHistory" not in state["callbacks"]
    assert not list(tmp_path.rglob(HISTORY_FILE))
    resumed, data2, update2 = build(tmp_path, limit=16, baseline=False)
    trainer(tmp_path / "b", [update2, EditCheckpoint()], standard=False).fit(
        resumed, datamodule=data2, ckpt_path=str(checkpoint.checkpoint_path))
    assert update2.edits_applied == 16 and data2.position == 16


def test_monitors_built_disabled_write_nothing(tmp_path):
    """``enabled=False`` on a callback built by hand and given to a Trainer: it does nothing."""
    module, data, update = build(tmp_path, limit=8)
    history, checkpoint = EditHistory(enabled=False), EditCheckpoint(enabled=False)
    export = ExportEditedModel(enabled=False, dir=str(tmp_path / "exported"))
    pl_trainer = trainer(tmp_path, [update, history, checkpoint, export], standard=False)
    pl_trainer.fit(module, datamodule=data)
    pl_trainer.test(module, datamodule=data, verbose=False)
    history.merge(pl_trainer, [{"edits": 8, "other/score": 0.5}])
    assert update.edits_applied == 8
    assert history.history == [] and history.results_path is None
    assert checkpoint.checkpoint_path is None and export.exported_to is None
    for name in (HISTORY_FILE, RESULTS_FILE, "last.ckpt", DELTAS_FILE):
        assert not list(tmp_path.rglob(name)), name


def test_history_alone_and_its_merge(tmp_path):
    module, data, update = build(tmp_path, limit=8)
    history = EditHistory()
    pl_trainer = trainer(tmp_path, [update, history], standard=False)
    pl_trainer.fit(module, datamodule=data)
    pl_trainer.test(module, datamodule=data, verbose=False)
    assert [h["edits"] for h in history.history] == [0, 8]
    assert not any(k.startswith("drift/") for h in history.history for k in h)
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert results["history"] == history.history and list(results["edited"]) == SCORES + WILD
    # another monitor's figures go into the line of their edit count; a new count gets a line
    history.merge(pl_trainer, [{"edits": 8, "other/score": 0.5}, {"edits": 4, "other/score": 0.25}], epoch=0)
    lines = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert [h["edits"] for h in lines] == [0, 4, 8] and lines == history.history
    assert lines[1] == {"edits": 4, "epoch": 0, "other/score": 0.25}
    assert lines[2]["other/score"] == 0.5 and "val/efficacy" in lines[2]


def test_a_checkpoint_with_the_history_in_the_edit_state_resumes_its_history(tmp_path):
    """Checkpoints written when the edit callback kept the history (one ``NullSpaceUpdate`` entry)."""
    module, data, update = build(tmp_path, limit=16)
    trainer(tmp_path, [update, EditHistory(), EditCheckpoint()], max_epochs=1, standard=False).fit(module, datamodule=data)
    path = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    state["callbacks"]["NullSpaceUpdate"]["history"] = state["callbacks"].pop("EditHistory")["history"]
    torch.save(state, path)
    resumed, data2, update2 = build(tmp_path, limit=16)
    history = EditHistory()
    trainer(tmp_path / "b", [update2, history], standard=False).fit(resumed, datamodule=data2, ckpt_path=str(path))
    assert [h["edits"] for h in history.history] == [0, 8, 16]
    assert [json.loads(line)["edits"] for line in (tmp_path / "b" / HISTORY_FILE).read_text().splitlines()] == [0, 8, 16]
