"""Norm-anchored target values: every edit's value vector gets the norm a typical edit has.

Over a long stream the edited layers grow edit after edit, and the norm of the target values
and of the weights feed each other. The anchor breaks that loop: calibrated once on the
unedited model, a = the mean of ||v0 + δ|| over calibration requests after dropping the
largest 5 %, where v0 is the edited MLP's output (the output of the last edited layer's
projection) at the subject's last token and δ the optimised value change. Each edit's value
v* = v0 + δ is then rescaled to norm a, and an edit whose ||v*|| exceeds twice the anchor
is skipped (its target left at the current value) and reported. The block target follows:
z* = (z0 - v0) + v*.

The anchor is cached beside the statistics, keyed by the model, the edited layers, the
value settings, the context prefixes and the calibration requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_alphaedit.hooks import capture_output, stop_after
from lightning_alphaedit.paths import atomic_file, cache_root
from lightning_alphaedit.prompts import encode_prompts
from lightning_alphaedit.requests import EditRequest, read_requests, validate_requests
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.values import ValueOptimizationConfig, optimize_values

log = logging.getLogger(__name__)


@dataclass
class NormAnchorConfig:
    """Norm-anchored target values (off by default)."""

    enabled: bool = False
    """Rescale every target value to the calibrated anchor norm; skip those above
    ``skip_factor`` times it."""
    requests: str | None = None
    """Calibration requests (any format the edit stream reads). null: the first ``count``
    requests of the edit stream's own file, in file order (then the first edits of an
    unshuffled stream are also calibration requests)."""
    count: int = 100
    """Calibration requests used (the first ``count`` of the file)."""
    drop_fraction: float = 0.05
    """The largest norms dropped before the mean (floor of this fraction of the requests)."""
    skip_factor: float = 2.0
    """An edit whose ||v*|| is above this times the anchor is skipped and reported."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"norm_anchor.count must be >= 1, got {self.count}")
        if not 0 <= self.drop_fraction < 1:
            raise ValueError(f"norm_anchor.drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if not self.skip_factor > 0:
            raise ValueError(f"norm_anchor.skip_factor must be > 0, got {self.skip_factor}")


@torch.no_grad()
def projection_outputs(
    model: torch.nn.Module, tokenizer, targets: ModelTargets, requests: Sequence[EditRequest], layer: int
) -> torch.Tensor:
    """v0: the output of ``layer``'s edited projection (the MLP's output) at the subject's last
    token of each bare prompt: (u, d_out), float32."""
    device = next(model.parameters()).device
    batch = encode_prompts(tokenizer, [r.prompt for r in requests], [r.subject for r in requests]).to(device)
    with capture_output(targets.projection(layer), batch.subject_last) as out, stop_after(targets.block(layer)):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.value.float()


def trimmed_mean(norms: torch.Tensor, drop_fraction: float) -> float:
    """The mean of ``norms`` (n,) without its floor(drop_fraction * n) largest values."""
    keep = len(norms) - math.floor(drop_fraction * len(norms))
    return float(norms.double().sort().values[:keep].mean())


def anchor_targets(
    targets: torch.Tensor, initial: torch.Tensor, mlp_values: torch.Tensor, anchor: float, skip_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block targets with their value vectors rescaled to ``anchor``: (z*, skipped).

    targets (u, d) z = z0 + δ; initial (u, d) z0; mlp_values (u, d) v0. v* = v0 + δ becomes
    a v*/||v*||, z* = (z0 - v0) + v*; where ||v*|| > skip_factor * a the target stays z0
    (skipped (u,) True)."""
    values = mlp_values + (targets - initial)  # (u, d) v* = v0 + δ
    norms = values.norm(dim=1, keepdim=True)  # (u, 1)
    skipped = norms.squeeze(1) > skip_factor * anchor  # (u,)
    anchored = initial - mlp_values + anchor * values / norms.clamp(min=1e-12)  # (u, d)
    return torch.where(skipped.unsqueeze(1), initial, anchored), skipped


def calibration_key(
    model_id: str, fingerprint: str, layers: Sequence[int], values: ValueOptimizationConfig,
    context_templates: Sequence[str], requests: Sequence[EditRequest], config: NormAnchorConfig,
) -> dict:
    """What the anchor depends on (the cache key)."""
    digest = hashlib.sha256(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()).hexdigest()
    return {
        "model": model_id, "fingerprint": fingerprint, "layers": list(layers), "values": asdict(values),
        "contexts": list(context_templates), "requests": digest, "count": len(requests),
        "drop_fraction": config.drop_fraction,
    }


def calibrate_anchor(
    model: torch.nn.Module, tokenizer, targets: ModelTargets, requests: Sequence[EditRequest], layer: int,
    context_templates: Sequence[str], values: ValueOptimizationConfig, drop_fraction: float,
    chat: bool | Sequence[bool] = False,
) -> tuple[float, torch.Tensor]:
    """Run the value optimization on ``requests`` (the model must be unedited) and return the
    anchor and every ||v0 + δ|| (n,)."""
    with torch.enable_grad():
        result = optimize_values(model, tokenizer, targets, requests, layer, context_templates, values, chat)
    v0 = projection_outputs(model, tokenizer, targets, requests, layer)  # (n, d)
    norms = (v0 + result.targets - result.initial).norm(dim=1)  # (n,)
    return trimmed_mean(norms, drop_fraction), norms


def cached_anchor(key: dict, cache_dir: str | None, compute) -> float:
    """The anchor stored under ``key`` in ``<cache>/norm-anchor/``, or ``compute()`` written there
    atomically. A file that is unreadable or made for another key is recomputed."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_root(cache_dir)) / "norm-anchor" / f"{digest}.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored["key"] == key and math.isfinite(stored["anchor"]) and stored["anchor"] > 0:
                return float(stored["anchor"])
            log.warning("norm anchor cache %s was made for another key; recalibrating", path)
        except Exception as error:  # corrupted: recompute
            log.warning("norm anchor cache %s is unreadable (%s); recalibrating", path, error)
    anchor = float(compute())
    if not (math.isfinite(anchor) and anchor > 0):
        raise ValueError(f"norm anchor calibration gave {anchor}: the calibration requests' values are not usable")
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "anchor": anchor}, indent=2), encoding="utf-8")
    return anchor


def calibration_requests(config: NormAnchorConfig, stream_source: str | Path, stream_format: str, tokenizer) -> list[EditRequest]:
    """The first ``config.count`` requests of ``config.requests`` (or of the stream's file),
    validated like the stream."""
    source = Path(config.requests).expanduser() if config.requests is not None else Path(stream_source)
    requests = read_requests(source, format="auto" if config.requests is not None else stream_format)[: config.count]
    if not requests:
        raise ValueError(f"norm_anchor: {source} holds no calibration requests")
    validate_requests(requests, tokenizer, source=str(source))
    return requests
