"""Where the time goes: wall-clock seconds per phase, added into a dict.

A phase that can take long is announced: a line when it starts and one when it ends, with
its time, so a log (a SLURM file, a notebook) never sits silent while something runs.

On an accelerator the work is asynchronous, so each phase synchronizes the device before
reading the clock; otherwise a phase would be charged for the kernels of the one before it.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

import torch
from pytorch_lightning.utilities import rank_zero_info

# The phases that edit (value optimization, keys, solves, cache update, or fine-tuning): their sum
# per request is the edit time benchmarks compare; statistics, evaluation and export are apart.
EDIT_PHASES = ("values", "keys", "solve", "cache", "finetune")


def _synchronize(device: torch.device | None) -> None:
    if device is None or device.type == "cpu":
        return
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: one API for every backend
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize(device)
    else:
        getattr(torch, device.type).synchronize()


@contextmanager
def timed(
    totals: MutableMapping[str, float], phase: str, device: torch.device | None = None, announce: str | None = None
) -> Iterator[None]:
    """Add the seconds spent inside the block to ``totals[phase]``.

    With ``announce`` (what the phase does, in words), rank zero logs a line as it starts and
    one with its time as it ends (or fails).
    """
    if announce:
        rank_zero_info(f"{announce} ...")
    _synchronize(device)
    started = time.perf_counter()
    finished = False
    try:
        yield
        finished = True
    finally:
        _synchronize(device)
        seconds = time.perf_counter() - started
        totals[phase] = totals.get(phase, 0.0) + seconds
        if announce:
            rank_zero_info(f"{announce}: {'done' if finished else 'FAILED'} in {format_seconds(seconds)}")


def format_seconds(seconds: float) -> str:
    """``4.2 s``, ``3 min 12 s``, ``1 h 05 min``: a phase's time as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory so far: the process's peak RSS, and the accelerator allocator's peak."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"process_peak_rss_bytes": kilobytes * (1 if sys.platform == "darwin" else 1024)}
    if device.type != "cpu":
        backend = getattr(torch, "accelerator", None)
        if not hasattr(backend, "max_memory_allocated"):
            backend = getattr(torch, device.type, None)
        if hasattr(backend, "max_memory_allocated"):
            peak["device_peak_allocated_bytes"] = int(backend.max_memory_allocated(device))
    return peak
