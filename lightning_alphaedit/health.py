"""Health figures of a long edit stream, per edited layer after every batch.

Wear shows in the weights before it shows in the scores: the edited layers grow edit after
edit (‖W_t‖ / ‖W_0‖), single updates get larger (‖Δ‖), target values grow (mean ‖z*‖), and
each update moves the outputs on preserved text a little (the leakage on held-out keys,
‖Δ k0‖ / ‖W_0 k0‖). Plain torch; the callback logs what ``BatchHealth`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_alphaedit.drift import DriftReference
from lightning_alphaedit.targets import ModelTargets


class BatchHealth:
    """Collects one batch's figures: ``watch`` sees each layer's change as the editor applies it
    (`SequentialEditor.apply_batch`), ``figures`` reads the rest afterwards."""

    def __init__(
        self, targets: ModelTargets, layers: Sequence[int], original_norms: Mapping[int, float],
        drift_reference: DriftReference | None,
    ) -> None:
        self.targets, self.layers, self.original_norms = targets, list(layers), original_norms
        self.drift_reference = drift_reference
        self.leakage: dict[int, float] = {}

    def watch(self, layer: int, change: torch.Tensor) -> None:
        if self.drift_reference is not None:
            self.leakage[layer] = self.drift_reference.update_leakage(layer, change)

    @torch.no_grad()
    def figures(self, delta_norms: Mapping[int, float], target_values: torch.Tensor | None) -> dict[str, float]:
        """``health/...`` figures of the batch just applied (target_values (u, d) or None)."""
        result = {}
        for layer in self.layers:
            norm = float(self.targets.linear_weight(layer).float().norm())
            result[f"health/weight_ratio_layer{layer}"] = norm / self.original_norms[layer]
            if layer in delta_norms:
                result[f"health/delta_norm_layer{layer}"] = float(delta_norms[layer])
            if layer in self.leakage:
                result[f"health/leakage_layer{layer}"] = self.leakage[layer]
        if target_values is not None and len(target_values):
            result["health/target_norm"] = float(target_values.float().norm(dim=1).mean())
        return result
