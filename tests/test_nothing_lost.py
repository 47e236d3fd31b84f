"""What a user's files and runs can count on, tried through the command line as a user would:
a finished run resumed from its checkpoint keeps its edits, an export never deletes a file it
did not write (nor the run folder), outputs follow the umask, and a run that edited nothing
exits non-zero."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_alphaedit.cli import main
from lightning_alphaedit.export import DELTAS_FILE, SUMMARY_FILE, check_export_target
from lightning_alphaedit.paths import fresh_directory, write_text_atomic

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
QUICK = ["--data.limit", "8", "--data.edits_per_epoch", "4", "--model.evaluation.generation", "false",
         "--trainer.enable_progress_bar", "false"]


def fit(*args: str) -> None:
    main(["fit", "--config", str(TINY), *QUICK, *args])


def run_folder(tmp_path: Path, name: str) -> Path:
    return tmp_path / "runs" / "tiny" / "lightning-alphaedit" / name


@pytest.fixture(autouse=True)
def no_run_left_open():
    """A fit refused in this process leaves its W&B run open; the next fit would log into it."""
    yield
    import wandb

    wandb.finish()


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_resuming_a_finished_run_keeps_its_edits(tmp_path, umask_022, capsys):
    export = tmp_path / "edited"
    fit("--trainer.logger.init_args.id", "done", "--export.dir", str(export))
    first = run_folder(tmp_path, "done")
    deltas = load_file(export / DELTAS_FILE)
    assert all(d.abs().max() > 0 for d in deltas.values())
    edited = json.loads((first / "results.json").read_text())["edited"]
    # as after a kill during the last validation, the export or the test: the checkpoint has the whole stream
    fit("--trainer.logger.init_args.id", "again", "--export.dir", str(export),
        "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    out = capsys.readouterr().out
    assert "edits applied: 8" in out.split("run folder:")[-2], out
    resumed = json.loads((run_folder(tmp_path, "again") / "results.json").read_text())
    assert resumed["edits_applied"] == 8 and resumed["requests_evaluated"] == 8
    assert resumed["edited"]["efficacy"] == edited["efficacy"]  # tested on the edited weights
    for name, delta in load_file(export / DELTAS_FILE).items():
        assert torch.equal(delta, deltas[name]), name
    summary = json.loads((export / SUMMARY_FILE).read_text())
    assert summary["edits_applied"] == 8
    # what the run leaves follows the umask (022), as any tool's output does
    assert mode(export) == 0o755 and mode(export / DELTAS_FILE) == 0o644 and mode(export / SUMMARY_FILE) == 0o644
    assert mode(first / "results.json") == 0o644 and mode(first / "metrics.jsonl") == 0o644
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".edited")]  # no staging left behind


def test_export_refuses_a_folder_with_a_users_files_before_editing(tmp_path):
    export = tmp_path / "mine"
    (export / "sub").mkdir(parents=True)
    (export / "notes.txt").write_text("my notes")
    (export / "sub" / "important.csv").write_text("a,b\n1,2\n")
    export.chmod(0o755)
    with pytest.raises(SystemExit, match="notes.txt") as error:  # the console script's message, status 1
        fit("--trainer.logger.init_args.id", "r", "--export.dir", str(export))
    assert str(export) in str(error.value)
    assert (export / "notes.txt").read_text() == "my notes"
    assert (export / "sub" / "important.csv").read_text() == "a,b\n1,2\n"
    assert mode(export) == 0o755
    assert not (run_folder(tmp_path, "r") / "checkpoints").exists()  # refused at fit start: nothing edited


def test_export_into_the_run_folder_is_refused_and_the_run_kept(tmp_path):
    fit("--trainer.logger.init_args.id", "first")
    first = run_folder(tmp_path, "first")
    kept = {p: p.read_bytes() for p in (first / "checkpoints" / "last.ckpt", first / "config.yaml", first / "metrics.jsonl")}
    with pytest.raises(SystemExit, match="export folder"):
        fit("--trainer.logger.init_args.id", "second", "--export.dir", str(first),
            "--ckpt_path", str(first / "checkpoints" / "last.ckpt"))
    for path, content in kept.items():
        assert path.read_bytes() == content, path
    assert (first / "edited_model" / DELTAS_FILE).exists()


def test_an_earlier_export_is_replaced_only_when_it_holds_nothing_else(tmp_path):
    earlier = tmp_path / "export"
    earlier.mkdir()
    written = ["config.json", "model.safetensors", SUMMARY_FILE]
    for name in written[:-1]:
        (earlier / name).write_text("x")
    (earlier / SUMMARY_FILE).write_text(json.dumps({"files": written}))
    assert check_export_target(earlier) == earlier.absolute()
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        check_export_target(earlier)
    with pytest.raises(ValueError, match="run folder"):
        check_export_target(tmp_path, run_dir=tmp_path / "runs" / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        check_export_target(tmp_path / "file")


def test_a_summary_without_a_file_list_does_not_make_a_folder_replaceable(tmp_path):
    """A folder with a summary that lists no files may hold anything of anyone's: it is refused,
    every file named, never replaced."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_text("x")
    (folder / "thesis.tex").write_text("mine")
    (folder / SUMMARY_FILE).write_text(json.dumps({"method": "alphaedit"}))
    with pytest.raises(ValueError, match="thesis.tex"):
        check_export_target(folder)


def test_written_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        assert mode(write_text_atomic(tmp_path / "a.json", "{}")) == 0o640
        assert mode(fresh_directory(tmp_path, ".x.")) == 0o750
    finally:
        os.umask(previous)


def test_a_run_whose_batches_were_all_rejected_exits_non_zero(tmp_path, capsys):
    # a vanishing λ makes every update absurdly large (beyond max_update_ratio): each batch is rolled back
    for policy in ("continue", "stop"):
        with pytest.raises(SystemExit) as exit:
            fit("--edit.l2", "1e-30", "--model.values.num_grad_steps", "3", "--edit.on_rejected", policy,
                "--drift.texts", "0")
        assert exit.value.code not in (0, None) and "nothing was edited" in str(exit.value.code)
        assert "edits applied: 0, batches rejected:" in capsys.readouterr().out  # the summary is printed


def test_an_empty_stream_is_an_error_before_any_edit(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty.jsonl: no edit requests"):
        fit("--data.path", str(empty), "--data.format", "jsonl")
    assert not list((tmp_path / "runs").rglob("edited_model"))
