"""Every config loads; `lightning-alphaedit fit` runs the tiny config end to end with W&B offline."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning_alphaedit.callbacks import EditHistory, ExportEditedModel, NullSpaceUpdate, find_callback

from lightning_alphaedit import __version__
from lightning_alphaedit.cli import COMMANDS, AlphaEditCLI, run
from lightning_alphaedit.datamodule import EditStreamDataModule
from lightning_alphaedit.module import AlphaEditModule

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("capability", "capability-demo")
"""Overlays for a model config, loaded on one by tests/test_capability.py."""
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in OVERLAYS)
BENCH_CONFIGS = sorted((ROOT / "bench").glob("*.yaml"))


def test_there_are_configs_for_the_released_models():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "gpt2-xl", "gpt-j-6b", "llama3-8b", "qwen2.5-7b"} <= names


@pytest.mark.parametrize("config", CONFIGS + BENCH_CONFIGS, ids=[p.stem for p in CONFIGS + BENCH_CONFIGS])
def test_config_loads(config):
    cli = AlphaEditCLI(
        AlphaEditModule, EditStreamDataModule, run=False, args=["--config", str(config)],
        parser_kwargs={"parser_mode": "omegaconf"},
    )
    update = [cb for cb in cli.trainer.callbacks if isinstance(cb, NullSpaceUpdate)]
    assert len(update) == 1
    raw = yaml.safe_load(config.read_text())
    assert update[0].layers == raw["edit"]["layers"]
    assert update[0].method == raw["edit"]["method"]
    assert cli.model.values.lr == raw["model"]["values"]["lr"]
    assert cli.datamodule.batch_size == raw["data"]["batch_size"]
    assert "${" not in cli.trainer.default_root_dir  # interpolation resolved
    assert cli.trainer.reload_dataloaders_every_n_epochs == 1


def test_fit_on_the_tiny_config(tmp_path, capsys):
    config = next(p for p in CONFIGS if p.stem == "tiny")
    started = time.perf_counter()
    cli = run(["fit", "--config", str(config), "--data.limit", "8", "--trainer.enable_progress_bar", "false"])
    elapsed = time.perf_counter() - started
    update = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NullSpaceUpdate))
    assert update.edits_applied == 8
    root = Path(cli.trainer.default_root_dir)
    assert str(root).startswith(str(tmp_path / "runs"))  # LIGHTNING_ALPHAEDIT_RUNS from conftest
    saved = list(root.rglob("config.yaml"))
    assert len(saved) == 1 and yaml.safe_load(saved[0].read_text())["data"]["limit"] == 8
    assert (Path(find_callback(cli.trainer, ExportEditedModel).exported_to) / "config.json").exists()
    assert list(root.rglob("offline-run-*")), "no W&B offline run was written"
    out = capsys.readouterr().out
    assert "edits applied: 8" in out and "edited model:" in out
    # the test stage ran after fit: both columns hold a number, and the files hold the same
    match = re.search(r"\n  efficacy\s+([\d.]+)\s+([\d.]+)\n", out)
    assert match, out
    results = json.loads(Path(find_callback(cli.trainer, EditHistory).results_path).read_text())
    assert results["edits_applied"] == 8 and results["requests_evaluated"] == 8
    assert float(match[1]) == round(100 * results["unedited"]["efficacy"], 1)
    assert float(match[2]) == round(100 * results["edited"]["efficacy"], 1)
    assert {"fluency", "drift/kl", "drift/hidden_shift", "drift/output_change_layer2"} <= set(results["edited"])
    phases = {"statistics", "projector", "drift_reference", "baseline", "values", "keys", "solve", "cache",
              "validation", "test"}
    timing = results["timing_seconds"]
    assert phases <= set(timing) and all(timing[p] > 0 for p in phases)  # every phase ran and was timed
    assert sum(timing.values()) <= elapsed  # disjoint phases of this run, within its wall time
    assert results["memory"]["process_peak_rss_bytes"] > 100 * 2**20
    history = [json.loads(line) for line in (Path(find_callback(cli.trainer, EditHistory).results_path).parent / "metrics.jsonl").read_text().splitlines()]
    assert [h["edits"] for h in history] == [0, 8] and "drift/kl" in history[1]
    assert history[0]["val/efficacy"] == results["unedited"]["efficacy"]  # the curves start at the baseline


def test_trace_on_the_tiny_config(tmp_path, capsys):
    config = next(p for p in CONFIGS if p.stem == "tiny")
    out_dir = tmp_path / "trace"
    run(["trace", "--config", str(config), "--trace.limit", "2", "--trace.samples", "2",
         "--trace.progress", "false", "--trace.output", str(out_dir)])
    data = yaml.safe_load((out_dir / "trace.json").read_text())  # JSON is YAML
    assert len(data["case_ids"]) == 2 and len(data["p_restored"][0][0]) == 4  # 4 layers in tiny.yaml
    assert (out_dir / "trace.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "recommended layers" in out and str(out_dir / "trace.png") in out


def test_report_draws_two_runs_on_shared_figures(tmp_path, capsys):
    config = next(p for p in CONFIGS if p.stem == "tiny")
    folders = []
    for method in ("alphaedit", "memit"):
        cli = run(["fit", "--config", str(config), "--data.limit", "8", "--data.edits_per_epoch", "4",
                   "--edit.method", method, "--trainer.enable_progress_bar", "false"])
        folders.append(str(Path(find_callback(cli.trainer, EditHistory).results_path).parent))
    out = tmp_path / "report"
    assert run(["report", *folders, "--output", str(out)]) == out
    table = (out / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| alphaedit") or line.startswith("| memit")]
    assert len(rows) == 4, table  # unedited and edited row per run
    assert "| alphaedit | 8 |" in table and "| memit | 8 |" in table
    for name in ("val_efficacy", "val_specificity", "drift_kl", "drift_output_change_layer2"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"({name}.png)" in table
    assert list((out / "wandb").glob("offline-run-*/*.wandb")), "no W&B offline run with the charts"
    # the history each figure is drawn from: the baseline at 0 edits, then one point per edit epoch
    history = [json.loads(line) for line in (Path(folders[0]) / "metrics.jsonl").read_text().splitlines()]
    assert [h["edits"] for h in history] == [0, 4, 8]


def test_report_names_a_folder_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl or results.json"):
        run(["report", str(tmp_path), "--no-wandb"])


def test_cluster_overlay_loads_on_a_model_config():
    from lightning_alphaedit.strategy import EditingDDPStrategy

    cli = AlphaEditCLI(
        AlphaEditModule, EditStreamDataModule, run=False, parser_kwargs={"parser_mode": "omegaconf"},
        args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(ROOT / "configs" / "cluster" / "ddp.yaml"),
              "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.strategy.init_args.process_group_backend", "gloo"],
    )
    assert isinstance(cli.trainer.strategy, EditingDDPStrategy)
    assert cli.trainer.num_devices == 2 and cli.trainer.strategy.process_group_backend == "gloo"
    assert not cli.trainer._accelerator_connector.use_distributed_sampler
    assert (ROOT / "configs" / "cluster" / "slurm.sbatch").read_text().count("configs/cluster/ddp.yaml") == 1


def test_plain_ddp_is_refused_with_the_fix_named(tmp_path):
    import pytorch_lightning as pl

    from lightning_alphaedit.callbacks import NullSpaceUpdate as Update

    update = Update(layers=[1, 2])
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="EditingDDPStrategy"):
        update.setup(trainer, None, "fit")


def test_resume_keeps_the_options_given_and_refuses_those_that_change_the_edit(tmp_path, caplog):
    config = next(p for p in CONFIGS if p.stem == "tiny")
    common = ["--config", str(config), "--data.limit", "16", "--trainer.enable_progress_bar", "false"]
    first = run(["fit", *common, "--trainer.max_epochs", "1"])  # stops after the first 8 edits
    (ckpt,) = Path(first.trainer.default_root_dir).rglob("last.ckpt")
    # an option that changes the edits: refused at fit start, named with both values (LightningCLI
    # would silently take the checkpoint's)
    with pytest.raises(ValueError, match=r"model\.values\.lr: 1\.0 in the checkpoint, 0\.5 in this run"):
        run(["fit", *common, "--ckpt_path", str(ckpt), "--model.values.lr", "0.5"])
    # one that only changes what is measured: this run's value is used, and the log says so
    with caplog.at_level(logging.WARNING, logger="lightning_alphaedit.resume"):
        resumed = run(["fit", *common, "--ckpt_path", str(ckpt), "--model.evaluation.batch_size", "16"])
    assert resumed.model.evaluation.batch_size == 16
    assert "model.evaluation.batch_size is 32 in the checkpoint, 16 in this run: this run's value is used" in caplog.text
    update = next(cb for cb in resumed.trainer.callbacks if isinstance(cb, NullSpaceUpdate))
    assert update.edits_applied == 16


@pytest.mark.parametrize("content", ["random bytes", "another torch file"])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, content):
    config = next(p for p in CONFIGS if p.stem == "tiny")
    bad = tmp_path / "last.ckpt"
    if content == "random bytes":
        bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError) as error:
        run(["fit", "--config", str(config), "--data.limit", "8", "--ckpt_path", str(bad)])
    message = str(error.value)
    assert f"{bad} is" in message and "not a lightning-alphaedit checkpoint" in message, message
    assert "weights_only" not in message


def _command(*args: str, cwd: Path = ROOT, **environment: str) -> subprocess.CompletedProcess:
    """``lightning-alphaedit ARGS`` as a user runs it: a process of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **environment}
    return subprocess.run([sys.executable, "-m", "lightning_alphaedit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_top_level_help_lists_every_command_and_nothing_else():
    for flags, status in ((["--help"], 0), (["-h"], 0), ([], 2)):
        done = _command(*flags)
        assert done.returncode == status, done.stderr[-2000:]
        assert "Knowledge editing" in done.stdout
        listed = re.findall(r"^  (\w+)  ", done.stdout, flags=re.MULTILINE)
        assert listed == list(COMMANDS), listed
        assert "Lightning Trainer command line tool" not in done.stdout
    version = _command("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"lightning-alphaedit {__version__}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_its_own_help(command):
    done = _command(command, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    usage = done.stdout.split("\n\n")[0]
    assert re.match(rf"usage: lightning-alphaedit (\[options\] )?{command}\b", usage), usage  # it names the command


@pytest.mark.parametrize("command", ["validate", "test", "predict", "edit"])
def test_a_command_that_is_not_offered_is_refused_with_the_list(command):
    done = _command(command, "--config", str(ROOT / "configs" / "tiny.yaml"))
    assert done.returncode != 0
    assert f"unknown command {command!r}" in done.stderr and ", ".join(COMMANDS) in done.stderr


def test_a_run_shows_edit_epochs_and_no_unactionable_warnings(tmp_path):
    """The progress bar counts edit epochs of the stream; the W&B warnings nobody can act on are gone."""
    done = _command(
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.limit", "8", "--data.edits_per_epoch", "4",
        "--model.evaluation.generation", "false", "--model.evaluation.wild.enabled", "false",
        "--export.enabled", "false", "--trainer.enable_progress_bar", "true",
        LIGHTNING_ALPHAEDIT_RUNS=str(tmp_path / "runs"), LIGHTNING_ALPHAEDIT_CACHE=str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "edit epoch 1 of 2" in output and "edit epoch 2 of 2" in output
    assert "Epoch 1/-2" not in output and "/-2" not in output
    assert "anonymous setting" not in output and "git root" not in output


def test_statistics_as_a_job_of_their_own_then_a_fit_on_another_machine(tmp_path, monkeypatch, capsys):
    """``statistics`` fills the cache a fit with the same config reads (that fit collects nothing)
    and exports the files; a fit elsewhere (an empty cache) uses the export with
    ``edit.statistics.file`` and collects nothing either."""
    tiny = str(ROOT / "configs" / "tiny.yaml")
    quick = ["--data.limit", "4", "--model.evaluation.generation", "false", "--model.evaluation.wild.enabled", "false",
             "--export.enabled", "false", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_CACHE", str(tmp_path / "here"))
    run(["statistics", "--config", tiny, "--statistics.output", str(tmp_path / "shared")])
    printed = capsys.readouterr().out
    assert "layer 1:" in printed and "layer 2:" in printed and "manifest.json" in printed
    entries = sorted((tmp_path / "here" / "statistics").glob("layer*.safetensors"))
    assert len(entries) == 2
    stamps = [p.stat().st_mtime_ns for p in entries]
    cli = run(["fit", "--config", tiny, *quick])
    assert find_callback(cli.trainer, NullSpaceUpdate).edits_applied == 4
    assert sorted((tmp_path / "here" / "statistics").glob("layer*.safetensors")) == entries  # the same entries,
    assert [p.stat().st_mtime_ns for p in entries] == stamps  # read, not rewritten
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_RUNS", str(tmp_path / "runs-elsewhere"))
    cli = run(["fit", "--config", tiny, *quick, "--edit.statistics.file", str(tmp_path / "shared")])
    assert find_callback(cli.trainer, NullSpaceUpdate).edits_applied == 4
    assert not list((tmp_path / "elsewhere").rglob("layer*.safetensors"))  # nothing collected there


def test_a_refusal_is_one_message_and_status_1_and_debug_shows_the_traceback(tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text(json.dumps({"case_id": "x", "subject": "Germany", "prompt": "The capital of {} is"}) + "\n")
    arguments = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.path", str(data),
                 "--data.format", "jsonl", "--trainer.logger", "false"]
    environment = dict(LIGHTNING_ALPHAEDIT_RUNS=str(tmp_path / "runs"), LIGHTNING_ALPHAEDIT_CACHE=str(tmp_path / "cache"))
    done = _command(*arguments, **environment)
    assert done.returncode == 1
    assert "broken.jsonl" in done.stderr and "missing" in done.stderr and "Traceback" not in done.stderr
    debug = _command(*arguments, "--debug", **environment)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
