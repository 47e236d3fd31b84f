"""Vocabulary logits only where they are read.

The LM head (hidden -> vocabulary, 49k-256k wide) at every position of every row costs more
than the rest of a small model's forward pass, yet the value loss, the KL term and causal
tracing each read a handful of positions. The forward pass stops at the final norm; the head
runs on the positions asked for.
"""

from __future__ import annotations

import torch

from lightning_alphaedit.hooks import capture_output, stop_after
from lightning_alphaedit.targets import ModelTargets


def logits_at(
    model: torch.nn.Module, targets: ModelTargets, input_ids, attention_mask, read: torch.Tensor, **model_inputs
) -> torch.Tensor:
    """Logits (n, V) at the n positions where ``read`` (b, t) is true, in row-major order.

    ``model_inputs`` go to the forward as well (a key/value cache, position ids); without them
    the pass uses no cache.

    Models that transform the logits after the head (soft-capping, a logit scale) take the
    full path, so the result is always what ``model(...).logits[read]`` would give.
    """
    inputs = model_inputs or {"use_cache": False}
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return model(input_ids=input_ids, attention_mask=attention_mask, **inputs).logits[read]
    norm = targets.final_norm
    with capture_output(norm, detach=False) as hidden, stop_after(norm):
        model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
    return targets.lm_head(hidden.value[read])  # (n, V)
