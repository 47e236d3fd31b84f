"""``CapabilityMonitor``: general capability of the model being edited, through lm-evaluation-harness.

Edit success says nothing about what the rest of the model still knows. The field measures
"how good is this model on tasks" with EleutherAI's lm-evaluation-harness (``lm-eval``), so
this callback calls it rather than reimplementing tasks: lm-eval's ``HFLM`` wraps the live
transformers model and tokenizer (no copy, no reload) and ``simple_evaluate`` runs the
configured tasks before the first edit, after every k edit epochs and at test. The numbers
go to the loggers as ``capability/<task>/<metric>`` against ``val/edits``, into the run's
history (``metrics.jsonl``, which ``lightning-alphaedit report`` draws) and into the
checkpoint.

lm-eval is an optional dependency: ``pip install -e '.[capability]'``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from lightning_alphaedit.callbacks.edit_history import EditHistory
from lightning_alphaedit.callbacks.find import find_callback
from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.collective import Collective

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[capability]'  (or: pip install 'lm-eval>=0.4.9')"

PACKAGED_TASKS = "capability"
"""The folder of ``lightning_alphaedit/data`` holding the task definitions the project ships."""


@dataclass
class CapabilityConfig:
    """Which lm-evaluation-harness tasks measure general capability, and how often."""

    tasks: list[str] = field(default_factory=lambda: ["general_facts"])
    """lm-eval task (or group) names, e.g. ``[sst2, mrpc, cola, rte, mmlu, mnli]``. The default is
    the 99 general-knowledge questions shipped in ``lightning_alphaedit/data/capability``."""
    limit: int | None = 200
    """Documents per task (lm-eval's ``limit``: the first ones of the task's split; for a group
    such as ``mmlu``, per subtask). None = all."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None keeps each task's own default (0 for most)."""
    batch_size: int = 8
    """Sequences per forward pass of lm-eval's HFLM."""
    every_n_epochs: int = 1
    """Evaluate after every k-th edit epoch (and always after the last, and before the first edit).
    Edits between evaluations = k x ``data.edits_per_epoch``."""
    include_path: str | None = PACKAGED_TASKS
    """A folder of extra lm-eval task YAMLs. A relative name not found from the working directory
    is looked up in ``lightning_alphaedit/data`` (the default names the project's own tasks)."""
    include_defaults: bool = True
    """Index lm-eval's built-in tasks as well (about 12 s); False when every task is in ``include_path``."""
    bootstrap_iters: int = 0
    """Bootstrap resamples for the standard errors of metrics such as F1 and MCC (lm-eval's default
    is 100000, minutes on a CPU); 0 skips every standard error, the metrics are the same."""
    log_subtasks: bool = False
    """Also log every subtask of a group (the 57 subjects of ``mmlu``); False logs the group only."""
    seed: int = 0
    """Seeds lm-eval's sampling of few-shot examples (and its python, numpy and torch seeds, whose
    global states are restored afterwards, so the edit run's random stream is left untouched)."""


def _lm_eval():
    """The lm_eval module, or an ImportError that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the wrapper the monitor uses)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"CapabilityMonitor runs EleutherAI's lm-evaluation-harness, which is not installed ({error}). "
            f"Install the optional extra: {INSTALL_HINT}"
        ) from error
    return lm_eval


def packaged_dataset(data_files: dict[str, str] | str, **_ignored):
    """lm-eval's ``custom_dataset`` hook for the tasks shipped in ``lightning_alphaedit/data/capability``.

    A task YAML names its ``data_files`` relative to that folder, which lm-eval (and the
    ``datasets`` json loader, relative to the working directory) cannot know: this resolves them.
    """
    import datasets

    folder = Path(str(resources.files("lightning_alphaedit") / "data" / PACKAGED_TASKS))
    files = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
    resolved = {split: str(folder / name) for split, name in files.items()}
    for split, path in resolved.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"capability task data file {path} (split {split!r}) does not exist")
    return datasets.load_dataset("json", data_files=resolved)


def resolve_include_path(include_path: str | None) -> str | None:
    """``include_path`` as given when it exists, else the folder of that name in the package's data."""
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.exists() and not path.is_absolute():
        packaged = Path(str(resources.files("lightning_alphaedit") / "data" / include_path))
        if packaged.exists():
            return str(packaged)
    if not path.exists():
        raise FileNotFoundError(f"capability include_path {include_path!r}: no such folder (nor in lightning_alphaedit/data)")
    return str(path)


def flatten_results(results: dict, tasks: list[str], log_subtasks: bool) -> dict[str, float]:
    """lm-eval's ``results`` as ``capability/<task>/<metric>`` floats.

    lm-eval names a metric ``<metric>,<filter>``; the filter is dropped when it is ``none``.
    Standard errors lm-eval could not compute ("N/A") and the subtasks of a requested group
    (unless ``log_subtasks``) are left out.
    """
    subtasks = {
        name for group, members in (results.get("group_subtasks") or {}).items()
        if group in tasks and not log_subtasks for name in members
    }
    flat = {}
    for task, metrics in results["results"].items():
        if task in subtasks:
            continue
        for key, value in metrics.items():
            if "," not in key or isinstance(value, str) or value is None:
                continue  # alias, name, sample_len; "N/A" standard errors
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            flat[f"capability/{task}/{name}"] = float(value)
    return flat


class CapabilityMonitor(pl.Callback):
    """Runs lm-evaluation-harness tasks on the live model: before the first edit, after every
    ``every_n_epochs`` edit epochs, and at test.

    Add it to a config under ``trainer.callbacks`` (see ``configs/capability.yaml``)::

        trainer:
          callbacks:
            - class_path: lightning_alphaedit.callbacks.CapabilityMonitor
              init_args:
                config: {tasks: [sst2, rte], limit: 200}

    The LightningModule must hold the transformers model as ``lm`` and its tokenizer as
    ``tokenizer`` (``AlphaEditModule`` does). Under DDP rank 0 evaluates while the other ranks
    wait, and every rank receives the numbers.

    Args:
        config: The tasks, how many documents, how often.
    """

    def __init__(self, config: CapabilityConfig = CapabilityConfig()) -> None:
        _lm_eval()  # missing lm-eval fails here, when the config is read, with the install command
        if config.every_n_epochs < 1:
            raise ValueError(f"capability every_n_epochs must be >= 1, got {config.every_n_epochs}")
        if not config.tasks:
            raise ValueError("capability tasks: name at least one lm-eval task")
        self.config = config
        self.include_path = resolve_include_path(config.include_path)
        self.records: list[dict] = []  # one per evaluation: {"edits": n, "capability/<task>/<metric>": value}
        self._task_manager = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=tuple(self.config.tasks))

    # --- lm-eval -------------------------------------------------------------------------------

    @property
    def task_manager(self):
        """lm-eval's task index (built once: indexing the built-in tasks takes seconds)."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            self._task_manager = TaskManager(include_path=self.include_path, include_defaults=self.config.include_defaults)
        return self._task_manager

    def check_tasks(self) -> None:
        """Every configured task exists: a wrong name fails before the statistics and the first edit."""
        known = set(self.task_manager.all_tasks)
        missing = [t for t in self.config.tasks if t not in known]
        if missing:
            where = f"include_path {self.include_path}" if self.include_path else "no include_path"
            builtin = "lm-eval's built-in tasks" if self.config.include_defaults else "not lm-eval's built-in tasks (include_defaults: false)"
            raise ValueError(
                f"capability tasks {missing} are unknown to lm-eval (searched {where} and {builtin}); "
                "`lm_eval ls tasks` lists the built-in names"
            )

    def evaluate(self, model: torch.nn.Module, tokenizer) -> dict:
        """lm-eval's ``simple_evaluate`` on ``model`` as it is now: its full results dictionary.

        The global python, numpy and torch random states are restored afterwards: lm-eval seeds
        them, and an evaluation must not change what the edit run draws next.
        """
        lm_eval = _lm_eval()
        from lm_eval.models.huggingface import HFLM

        config = self.config
        python_state, numpy_state = random.getstate(), np.random.get_state()
        was_training, device = model.training, model.device
        try:  # the accelerator's generator is forked too, whichever kind it is
            accelerators = [] if device.type == "cpu" else [device]
            with torch.random.fork_rng(devices=accelerators, device_type=device.type):
                wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
                results = lm_eval.simple_evaluate(
                    model=wrapped, tasks=list(config.tasks), num_fewshot=config.num_fewshot, limit=config.limit,
                    task_manager=self.task_manager, bootstrap_iters=config.bootstrap_iters, log_samples=False,
                    random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
                    fewshot_random_seed=config.seed,
                )
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            model.train(was_training)
        return results

    def measure(self, trainer: pl.Trainer, pl_module, edits: int, prefix: str = "") -> dict[str, float]:
        """Evaluate on rank 0 (the others wait), log the numbers, keep them as the record at ``edits``."""
        collective = Collective()

        def work() -> dict[str, float]:
            results = self.evaluate(pl_module.lm, pl_module.tokenizer)
            return flatten_results(results, list(self.config.tasks), self.config.log_subtasks)

        metrics = collective.run_on_zero(work)
        self.records = [r for r in self.records if r["edits"] != edits] + [{"edits": edits, **metrics}]
        self.records.sort(key=lambda r: r["edits"])
        self._log(trainer, metrics, edits, prefix)
        log.info("capability after %d edits: %s", edits, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], edits: int, prefix: str) -> None:
        if not trainer.is_global_zero:
            return
        logged = {f"{prefix}{k}": v for k, v in metrics.items()} | {"val/edits": float(edits)}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)

    # --- when -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self.check_tasks()

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.define_metric("val/edits")
                logger.experiment.define_metric("capability/*", step_metric="val/edits")

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # Before the first edit. A resumed run already has its records from the checkpoint.
        # The count is read at the moment of measuring, so the record matches the weights
        # whether or not the edit callback has restored a checkpoint's edits yet.
        edits = _edits_applied(trainer)
        if not any(r["edits"] == edits for r in self.records):
            self.measure(trainer, pl_module, edits)

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        last = bool(getattr(trainer.datamodule, "exhausted", False))
        if epoch % self.config.every_n_epochs == 0 or last:
            self.measure(trainer, pl_module, _edits_applied(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        # after this epoch's validation wrote its record into the history
        self._merge_into_history(trainer)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        edits = _edits_applied(trainer)
        known = next((r for r in self.records if r["edits"] == edits), None)
        if known is not None:  # the same edits, so the same weights: measured at the last validation
            self._log(trainer, {k: v for k, v in known.items() if k != "edits"}, edits, "test/")
        else:
            self.measure(trainer, pl_module, edits, prefix="test/")
            self._merge_into_history(trainer)

    def _merge_into_history(self, trainer: pl.Trainer) -> None:
        """Put every record into the run's history (`EditHistory.merge`: one line per edit count,
        ``metrics.jsonl`` rewritten), which ``lightning-alphaedit report`` draws."""
        history = find_callback(trainer, EditHistory)
        if history is None or not trainer.is_global_zero or not self.records:
            return
        history.merge(trainer, self.records, epoch=trainer.current_epoch)

    # --- checkpoint state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = [dict(r) for r in state_dict.get("records", [])]


def _edits_applied(trainer: pl.Trainer) -> int:
    """Edits applied so far, as the edit callback counts them (the history is keyed by it)."""
    update = find_callback(trainer, NullSpaceUpdate)
    return update.edits_applied if update is not None else trainer.global_step
