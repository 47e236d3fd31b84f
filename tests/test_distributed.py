"""Two processes (gloo, CPU) through the CLI against one process on the same stream: the same
edited weights, statistics, sequential caches and metrics; and a DDP run resumed from its
epoch checkpoint ends where the uninterrupted one does. Each run is a `lightning-alphaedit fit`
subprocess (Lightning starts the second rank itself), never an in-process DDP launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_alphaedit.algebra import null_space
from lightning_alphaedit.collective import Collective

ROOT = Path(__file__).resolve().parents[1]
STREAM = [  # 20 edits in batches of 5 (shares of 3 and 2), validated every 10 in batches of 16: the
    # first validation has one batch, so the second rank has none; the test stage has two
    "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.limit", "20", "--data.batch_size", "5",
    "--data.edits_per_epoch", "10", "--data.eval_batch_size", "16", "--model.values.lr", "0.1",
    "--model.evaluation.generation", "false", "--trainer.enable_progress_bar", "false",
]
TWO_PROCESSES = [
    "--config", str(ROOT / "configs" / "cluster" / "ddp.yaml"), "--trainer.accelerator", "cpu",
    "--trainer.devices", "2", "--trainer.strategy.init_args.process_group_backend", "gloo",
]


def fit(folder: Path, *args: str, cache: Path) -> Path:
    """One CLI run in its own runs folder; returns the run directory (the one with results.json)."""
    environment = {
        **os.environ, "LIGHTNING_ALPHAEDIT_RUNS": str(folder), "LIGHTNING_ALPHAEDIT_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "lightning_alphaedit", "fit", *STREAM, *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = list(folder.rglob("results.json"))
    assert len(results) == 1, f"expected one results.json (rank 0 writes it), got {results}"
    return results[0].parent


def assert_close_relative(a: torch.Tensor, b: torch.Tensor, what: str, tolerance: float = 1e-4) -> None:
    error = float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
    assert error < tolerance, f"{what}: relative difference {error:.2e}"


def caches(run: Path, statistics: Path) -> dict[int, torch.Tensor]:
    """The sequential caches of the last checkpoint, as Û (Ûᵀ C_p Û) Ûᵀ (d_in, d_in): the r x r
    cache's coordinates depend on the eigenvectors eigh picks inside near-equal eigenvalues,
    this does not."""
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    update = next(v for k, v in state["callbacks"].items() if k.startswith("NullSpaceUpdate"))
    result = {}
    for layer, cache in update["editor"]["caches"].items():
        [file] = statistics.glob(f"layer{layer}-*.safetensors")
        moments = load_file(file)
        basis = null_space(moments["sum"].double() / float(moments["count"]), 2e-2).basis  # (d_in, r)
        assert basis.shape[1] == cache.shape[0]
        result[int(layer)] = basis @ cache.double() @ basis.T
    return result


def test_share_splits_any_batch_in_order():
    class Rank(Collective):  # the arithmetic of share() for a given rank, without a process group
        def __init__(self, rank: int, world: int) -> None:
            self.active, self.rank, self.world_size = False, rank, world

    for count in range(0, 12):
        for world in (1, 2, 3, 4):
            shares = [Rank(r, world).share(count) for r in range(world)]
            covered = [i for s in shares for i in range(count)[s]]
            assert covered == list(range(count)), (count, world)
            sizes = [len(range(count)[s]) for s in shares]
            assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    one = fit(tmp / "one", cache=tmp / "cache-one")
    two = fit(tmp / "two", *TWO_PROCESSES, cache=tmp / "cache-two")
    return tmp, one, two


def test_two_processes_edit_like_one(runs):
    tmp, one, two = runs
    # statistics: collected on two shards of the corpus and all-reduced, written once
    for layer in (1, 2):
        [a] = (tmp / "cache-one" / "statistics").glob(f"layer{layer}-*.safetensors")
        [b] = (tmp / "cache-two" / "statistics").glob(f"layer{layer}-*.safetensors")
        assert a.name == b.name  # the same cache key
        single, sharded = load_file(a), load_file(b)
        assert int(single["count"]) == int(sharded["count"])
        assert_close_relative(sharded["sum"], single["sum"], f"statistics layer {layer}")
    # the edited weights (the exported deltas) and the sequential caches
    deltas_one = load_file(one / "edited_model" / "alphaedit_deltas.safetensors")
    deltas_two = load_file(two / "edited_model" / "alphaedit_deltas.safetensors")
    assert deltas_one.keys() == deltas_two.keys()
    for name in deltas_one:
        assert float(deltas_one[name].norm()) > 0
        # each rank's value step runs its share padded to the share's own widths: z* agree to
        # ~1e-5, and the solve (l2 = 10 on a tiny random model) carries that to ~2e-4 here
        assert_close_relative(deltas_two[name], deltas_one[name], name, tolerance=1e-3)
    caches_two = caches(two, tmp / "cache-two" / "statistics")
    for layer, cache in caches(one, tmp / "cache-one" / "statistics").items():
        assert_close_relative(caches_two[layer], cache, f"cache layer {layer}")
    # the metrics: baseline, every validation, the test stage
    results_one = json.loads((one / "results.json").read_text())
    results_two = json.loads((two / "results.json").read_text())
    assert results_two["edits_applied"] == 20 and results_two["batches_rejected"] == 0
    for part in ("unedited", "edited"):
        assert results_two[part].keys() == results_one[part].keys()
        for name, value in results_one[part].items():
            assert results_two[part][name] == pytest.approx(value, rel=1e-4, abs=1e-4), f"{part} {name}"
    assert [h["edits"] for h in results_two["history"]] == [0, 10, 20]
    for record_one, record_two in zip(results_one["history"], results_two["history"]):
        for name, value in record_one.items():
            if not name.startswith("time/"):  # wall-clock seconds: never equal
                assert record_two[name] == pytest.approx(value, rel=1e-4, abs=1e-4), f"history {name}"


def test_a_two_process_run_resumes_from_its_checkpoint(runs):
    tmp, _, two = runs
    first = fit(tmp / "first-epoch", *TWO_PROCESSES, "--trainer.max_epochs", "1", cache=tmp / "cache-two")
    assert json.loads((first / "results.json").read_text())["edits_applied"] == 10
    resumed = fit(tmp / "resumed", *TWO_PROCESSES, "--ckpt_path", str(first / "checkpoints" / "last.ckpt"),
                  cache=tmp / "cache-two")
    results = json.loads((resumed / "results.json").read_text())
    assert results["edits_applied"] == 20 and [h["edits"] for h in results["history"]] == [0, 10, 20]
    final = load_file(two / "edited_model" / "alphaedit_deltas.safetensors")
    for name, delta in load_file(resumed / "edited_model" / "alphaedit_deltas.safetensors").items():
        assert_close_relative(delta, final[name], f"resumed {name}")
