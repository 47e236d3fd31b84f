"""CapabilityMonitor: lm-evaluation-harness on the live model, checked against lm-eval itself.

The task is built here in lm-eval's own format (a JSON-lines file and a task YAML with
``dataset_path: json``): 20 multiple-choice questions from the neighbourhood facts of the
packaged tiny edit set, whose words the tiny word-level tokenizer knows. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_distributed import TWO_PROCESSES

from lightning_alphaedit.callbacks import CapabilityConfig, CapabilityMonitor, EditHistory, ExportEditedModel, NullSpaceUpdate, find_callback
from lightning_alphaedit.cli import AlphaEditCLI, run
from lightning_alphaedit.datamodule import EditStreamDataModule
from lightning_alphaedit.module import AlphaEditModule
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TASK = "tiny_facts"
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]["lm"]["tiny"]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture
def task_folder(tmp_path) -> Path:
    """A 20-question lm-eval task on the facts of the packaged tiny edit set, in its order: the
    rewrite prompt with its true answer, its new answer and a neighbour's answer as choices.
    An edit moves its question's answer, so the scores after edits tell the live model apart."""
    rows = []
    data = resources.files("lightning_alphaedit") / "data" / "tiny_edits.jsonl"
    for line in data.read_text(encoding="utf-8").splitlines():
        request = json.loads(line)
        wrong = [request["target_new"], request["neighborhood_prompts"][0]["target"]]
        gold = len(rows) % 3
        rows.append({"question": request["prompt"].replace("{}", request["subject"]),
                     "choices": wrong[:gold] + [request["target_true"]] + wrong[gold:], "answer": gold})
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / f"{TASK}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / f"{TASK}.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{question}}", "doc_to_target": "answer", "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "brier_score", "aggregation": "brier_score", "higher_is_better": False}],
    }))
    return folder


def lm_eval_reference(model_folder: Path, task_folder: Path, limit: int | None = None) -> dict[str, float]:
    """lm-eval on its own: it loads the saved model from its folder and evaluates the task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_folder), "device": "cpu", "dtype": "float32",
                                "attn_implementation": "eager"},
        tasks=[TASK], limit=limit, batch_size=4, bootstrap_iters=0, log_samples=False,
        task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
    )["results"][TASK]
    return {f"capability/{TASK}/{metric}": results[f"{metric},none"] for metric in ("acc", "acc_norm", "brier_score")}


def test_numbers_equal_lm_eval_on_the_saved_model_and_leave_the_random_state(task_folder, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(**TINY))
    monitor = CapabilityMonitor(CapabilityConfig(
        tasks=[TASK], limit=None, include_path=str(task_folder), include_defaults=False, batch_size=3,
    ))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    from lightning_alphaedit.callbacks.capability import flatten_results

    ours = flatten_results(monitor.evaluate(model, tokenizer), [TASK], False)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])  # lm-eval's seeding undone

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reference = lm_eval_reference(folder, task_folder)
    assert set(ours) == set(reference)
    assert ours == pytest.approx(reference, rel=1e-6)
    assert 0.0 < ours[f"capability/{TASK}/acc"] < 1.0  # a real score, not a degenerate one


def test_fit_logs_and_checkpoints_capability(task_folder, tmp_path):
    overlay = tmp_path / "capability.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {
        "logger": [
            {"class_path": "pytorch_lightning.loggers.WandbLogger",
             "init_args": {"project": "lightning-alphaedit", "save_dir": str(tmp_path / "runs" / "tiny")}},
            {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}},
        ],
        "callbacks": [{"class_path": "lightning_alphaedit.callbacks.CapabilityMonitor", "init_args": {"config": {
            "tasks": [TASK], "limit": 12, "include_path": str(task_folder), "include_defaults": False,
            "every_n_epochs": 2, "batch_size": 4,
        }}}],
    }}))
    cli = run(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(overlay),
               "--data.limit", "12", "--data.edits_per_epoch", "4", "--trainer.enable_progress_bar", "false"])
    update = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NullSpaceUpdate))
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CapabilityMonitor))
    assert update.edits_applied == 12
    # before the first edit, after epoch 2 (every 2nd), after the last (epoch 3, the stream's end)
    assert [r["edits"] for r in monitor.records] == [0, 8, 12]
    name = f"capability/{TASK}/acc"
    # the first 12 questions are the 12 edited facts: measured on the live model, the scores move
    brier = f"capability/{TASK}/brier_score"
    assert monitor.records[0][brier] != monitor.records[1][brier] != monitor.records[2][brier]

    # the history the report draws: every validation line, capability where it was measured
    run_folder = Path(find_callback(cli.trainer, EditHistory).results_path).parent
    history = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert [h["edits"] for h in history] == [0, 4, 8, 12]
    assert [name in h for h in history] == [True, False, True, True]
    for record in monitor.records:
        line = next(h for h in history if h["edits"] == record["edits"])
        assert line[name] == record[name] and "val/efficacy" in line
    assert json.loads((run_folder / "results.json").read_text())["history"] == history

    # the trainer's loggers received them against val/edits (the CSV logger shows what W&B got)
    csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()
    columns = csv[0].split(",")
    logged = [dict(zip(columns, row.split(","))) for row in csv[1:]]
    points = [(float(r["val/edits"]), float(r[name])) for r in logged if r.get(name)]
    assert points == [(r["edits"], pytest.approx(r[name])) for r in monitor.records]
    assert [float(r[f"test/{name}"]) for r in logged if r.get(f"test/{name}")] == [pytest.approx(monitor.records[-1][name])]

    # the report draws them against edits and tables the first and the last
    out = tmp_path / "report"
    run(["report", str(run_folder), "--output", str(out), "--no-wandb"])
    assert (out / f"capability_{TASK}_acc.png").read_bytes()[:4] == b"\x89PNG"
    header, _, unedited_row, edited_row = [[c.strip() for c in line.strip("| ").split("|")]
                                           for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]
    column = header.index(name)
    assert unedited_row[column] == f"{100 * monitor.records[0][name]:.1f}"
    assert edited_row[:2] == [update.label, "12"] and edited_row[column] == f"{100 * monitor.records[-1][name]:.1f}"

    # kept in the checkpoint, and restored from it
    state = torch.load(run_folder / "checkpoints" / "last.ckpt", weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("CapabilityMonitor"))
    assert saved["records"] == monitor.records
    restored = CapabilityMonitor(monitor.config)
    restored.load_state_dict(saved)
    assert restored.records == monitor.records

    # lm-eval on its own agrees: the unedited model, and the edited model the run exported
    unedited, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(**TINY))
    unedited.save_pretrained(tmp_path / "unedited")
    tokenizer.save_pretrained(tmp_path / "unedited")
    unedited_scores = lm_eval_reference(tmp_path / "unedited", task_folder, limit=12)
    assert unedited_scores == pytest.approx({k: v for k, v in monitor.records[0].items() if k != "edits"}, rel=1e-6)
    edited = lm_eval_reference(Path(find_callback(cli.trainer, ExportEditedModel).exported_to), task_folder, limit=12)
    assert edited == pytest.approx({k: v for k, v in monitor.records[-1].items() if k != "edits"}, rel=1e-6)


def test_missing_lm_eval_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[capability\]'"):
        CapabilityMonitor(CapabilityConfig())


def test_unknown_task_is_named_before_anything_runs(task_folder):
    monitor = CapabilityMonitor(CapabilityConfig(tasks=[TASK, "no_such_task"], include_path=str(task_folder),
                                                 include_defaults=False))
    with pytest.raises(ValueError, match=r"\['no_such_task'\].*" + str(task_folder)):
        monitor.check_tasks()
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        CapabilityMonitor(CapabilityConfig(include_path="no_such_folder"))


def test_flatten_results_names_metrics_and_skips_subtasks():
    from lightning_alphaedit.callbacks.capability import flatten_results

    results = {
        "results": {
            "mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": "mmlu"},
            "mmlu_anatomy": {"acc,none": 0.4, "alias": " - anatomy"},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A", "sample_len": 8},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy"], "gsm8k": []},
    }
    assert flatten_results(results, ["mmlu", "gsm8k"], log_subtasks=False) == {
        "capability/mmlu/acc": 0.5, "capability/mmlu/acc_stderr": 0.01,
        "capability/gsm8k/exact_match_strict-match": 0.25,
    }
    assert "capability/mmlu_anatomy/acc" in flatten_results(results, ["mmlu", "gsm8k"], log_subtasks=True)


@pytest.mark.parametrize("model_config, overlay", [("llama3-8b", "capability"), ("demo", "capability-demo")])
def test_capability_overlays_load_on_a_model_config(model_config, overlay):
    cli = AlphaEditCLI(
        AlphaEditModule, EditStreamDataModule, run=False, parser_kwargs={"parser_mode": "omegaconf"},
        args=["--config", str(ROOT / "configs" / f"{model_config}.yaml"), "--config", str(ROOT / "configs" / f"{overlay}.yaml")],
    )
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, CapabilityMonitor)]
    assert len(monitors) == 1
    raw = yaml.safe_load((ROOT / "configs" / f"{overlay}.yaml").read_text())
    config = raw["trainer"]["callbacks"][0]["init_args"]["config"]
    assert monitors[0].config.tasks == config["tasks"] and monitors[0].config.limit == config["limit"]
    monitors[0].check_tasks()  # every task name is one lm-eval knows
    assert any(isinstance(cb, NullSpaceUpdate) for cb in cli.trainer.callbacks)


def test_two_processes_measure_like_one(task_folder, tmp_path):
    """Under DDP (two CPU processes, gloo, through the CLI) rank 0 evaluates and the history
    holds the same numbers as a one-process run of the same stream."""
    import os
    import subprocess

    overlay = tmp_path / "capability.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"logger": False, "callbacks": [
        {"class_path": "lightning_alphaedit.callbacks.CapabilityMonitor", "init_args": {"config": {
            "tasks": [TASK], "limit": 10, "include_path": str(task_folder), "include_defaults": False,
            "batch_size": 4}}}]}}))
    stream = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(overlay), "--data.limit", "10",
              "--data.batch_size", "5", "--data.edits_per_epoch", "10", "--model.evaluation.generation", "false",
              "--export.enabled", "false", "--trainer.enable_progress_bar", "false"]
    histories = []
    for name, extra in (("one", []), ("two", TWO_PROCESSES)):
        environment = {**os.environ, "LIGHTNING_ALPHAEDIT_RUNS": str(tmp_path / name),
                       "LIGHTNING_ALPHAEDIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                       "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "lightning_alphaedit", "fit", *stream, *extra], cwd=ROOT,
                              env=environment, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        [history] = (tmp_path / name).rglob("metrics.jsonl")  # rank 0 alone writes it
        histories.append([json.loads(line) for line in history.read_text().splitlines()])
    one, two_processes = histories
    metrics = [k for k in one[0] if k.startswith("capability/")]
    assert metrics and [h["edits"] for h in two_processes] == [h["edits"] for h in one] == [0, 10]
    for record_one, record_two in zip(one, two_processes):
        for name in metrics:
            assert record_two[name] == pytest.approx(record_one[name], rel=1e-4, abs=1e-6), (record_one["edits"], name)
    brier = f"capability/{TASK}/brier_score"
    assert one[0][brier] != one[1][brier]  # measured on the live model: the edits moved the answers
