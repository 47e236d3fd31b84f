"""``EditHistory``: the run's record of every validation (``metrics.jsonl``) and its results (``results.json``).

After every edit epoch's validation it appends one line per edit count to ``metrics.jsonl``
(the validation, drift and health figures, and the edit time so far), which
``lightning-alphaedit report`` draws; after the test stage it writes ``results.json``: the
unedited and edited scores, the history, the time of every phase and the peak memory. Both
files are replaced atomically. Other monitors add figures to a line with ``merge``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from lightning_alphaedit.callbacks.drift_monitor import DriftMonitor
from lightning_alphaedit.callbacks.find import find_callback, require_callback
from lightning_alphaedit.callbacks.null_space_update import NullSpaceUpdate
from lightning_alphaedit.evaluation import TEACHER_FORCED
from lightning_alphaedit.wild import WILD_PREFIX
from lightning_alphaedit.run_folder import HISTORY_FILE, RESULTS_FILE, run_directory
from lightning_alphaedit.paths import write_text_atomic
from lightning_alphaedit.timing import EDIT_PHASES, format_seconds, peak_memory

log = logging.getLogger(__name__)

RECORDED_PREFIXES = ("val/", "drift/", "health/")
"""The logged figures a validation's line holds."""


class EditHistory(pl.Callback):
    """Writes ``metrics.jsonl`` after every validation and ``results.json`` after the test stage.

    Needs `NullSpaceUpdate`, listed before it in the callbacks (the edit counts, the timing and
    the baseline measured before the first edit come from there); adds the test-stage drift
    of a `DriftMonitor` when there is one.

    Args:
        enabled: False: records and writes nothing, no ``metrics.jsonl``, no ``results.json`` (the
            CLI and ``edit()`` leave it out).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.history: list[dict] = []  # one line per edit count: read it, add to it with ``merge``
        self.results_path = None
        self._stage_started = 0.0

    def _update(self, trainer: pl.Trainer) -> NullSpaceUpdate:
        return require_callback(trainer, NullSpaceUpdate, "EditHistory")

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.enabled:
            return
        if not self.history:  # a checkpoint written before this callback held the history
            self.history = [dict(r) for r in self._update(trainer).history_in_checkpoint]
        if self.history and trainer.is_global_zero:  # a resumed run's folder carries the curves so far
            self._write(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        baseline = pl_module.baseline
        if baseline and not self.history and trainer.is_global_zero and self.enabled:  # the curves start at 0 edits
            self.history.append({"edits": 0, "epoch": -1} | {
                f"val/{k}": v for k, v in baseline.items() if k in TEACHER_FORCED or k.startswith(WILD_PREFIX)
            })
            self._write(trainer)

    def merge(self, trainer: pl.Trainer, records: Iterable[Mapping], epoch: int | None = None) -> None:
        """Put figures into the line of their edit count (each record holds ``edits``; a line
        missing is made, with ``epoch``) and rewrite ``metrics.jsonl`` if anything changed."""
        if not self.enabled:
            return
        changed = False
        for record in records:
            line = next((h for h in self.history if h["edits"] == record["edits"]), None)
            if line is None:  # e.g. before the first edit with edit.baseline false
                line = {"edits": record["edits"], "epoch": -1 if record["edits"] == 0 else epoch}
                self.history.append(line)
                changed = True
            if any(line.get(k) != v for k, v in record.items()):
                line.update(record)
                changed = True
        if changed:
            self.history.sort(key=lambda h: h["edits"])
            self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        write_text_atomic(run_directory(trainer) / HISTORY_FILE, lines)

    # --- after every validation: one line ---------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._stage_started = time.perf_counter()
        if not trainer.sanity_checking and self.enabled:
            rank_zero_info(f"validation after {self._update(trainer).edits_applied} edits ...")

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.enabled:
            return
        update = self._update(trainer)
        seconds = time.perf_counter() - self._stage_started
        update.timing["validation"] = update.timing.get("validation", 0.0) + seconds
        rank_zero_info(f"validation after {update.edits_applied} edits: done in {format_seconds(seconds)}")
        record = {"edits": update.edits_applied, "epoch": trainer.current_epoch}
        record.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(RECORDED_PREFIXES)})
        record.pop("val/edits", None)
        record["time/edit_seconds"] = sum(update.timing.get(phase, 0.0) for phase in EDIT_PHASES)  # so far, the run's whole
        self.history = [r for r in self.history if r["edits"] != record["edits"]] + [record]
        self._write(trainer)

    # --- after the test stage: the results --------------------------------------------------------

    def on_test_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._stage_started = time.perf_counter()
        generation = " with generation" if pl_module.evaluation.generation else ""
        if self.enabled:
            rank_zero_info(f"test on {trainer.datamodule.position} edited requests{generation} ...")

    def on_test_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.enabled:
            return
        update = self._update(trainer)
        seconds = time.perf_counter() - self._stage_started
        update.timing["test"] = update.timing.get("test", 0.0) + seconds
        rank_zero_info(f"test on {trainer.datamodule.position} edited requests: done in {format_seconds(seconds)}")
        edited = dict(pl_module.test_results or {})
        drift = find_callback(trainer, DriftMonitor)
        if drift is not None:
            edited.update({f"drift/{k}": v for k, v in drift.test_figures.items()})
        results = {
            "method": update.method, "projection": update.projection, "label": update.label,
            "layers": update.layers, "model": pl_module.lm_config.identity,
            "edits_applied": update.edits_applied, "batches_rejected": len(update.rejected),
            "requests_evaluated": trainer.datamodule.position,
            "unedited": pl_module.baseline, "edited": edited, "history": self.history,
            "timing_seconds": dict(update.timing), "memory": peak_memory(pl_module.device),
        }
        if update.anchor is not None:
            results["norm_anchor"] = {"anchor": update.anchor, "skipped": list(update.anchor_skipped)}
        self.results_path = write_text_atomic(run_directory(trainer) / RESULTS_FILE, json.dumps(results, indent=2))
        log.info("results written to %s", self.results_path)

    # --- checkpoint state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
