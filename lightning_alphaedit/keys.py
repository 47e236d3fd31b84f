"""Keys and current values of edit requests at a layer (the inputs of the closed-form update).

K1 at layer l is the input of the MLP output projection at the subject's last token,
averaged over the context-prefixed prompts with half the weight on the bare prompt, as
in the reference. The current value is the output of the last edited block at the
subject's last token of the bare prompt. Both stop the forward pass at the block needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_alphaedit.hooks import capture_input, capture_output, stop_after
from lightning_alphaedit.prompts import encode_prompts
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets


@torch.no_grad()
def request_keys(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layer: int,
    context_templates: Sequence[str],
) -> torch.Tensor:
    """K1 of ``requests`` at ``layer``: (u, d_in), float32.

    ``context_templates[0]`` is the prompt without a context prefix (``"{}"``, or the prompt's
    chat rendering); the key is the mean of its key and the mean key over the other templates.
    """
    if not context_templates or any(t.count("{}") != 1 for t in context_templates):
        raise ValueError("context_templates must be templates with one '{}' each, the first without a context prefix")
    device = next(model.parameters()).device
    templates = [ctx.replace("{}", r.prompt) for r in requests for ctx in context_templates]
    subjects = [r.subject for r in requests for _ in context_templates]
    batch = encode_prompts(tokenizer, templates, subjects).to(device)
    with capture_input(targets.projection(layer), batch.subject_last) as keys, stop_after(targets.block(layer)):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    k = keys.value.float().view(len(requests), len(context_templates), -1)  # (u, c, d_in)
    if len(context_templates) == 1:
        return k[:, 0]
    return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(dim=1)  # (u, d_in)


@torch.no_grad()
def block_outputs(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layer: int,
    template: str = "{}",
) -> torch.Tensor:
    """Output of block ``layer`` at the subject's last token of each prompt put in ``template`` (the
    value optimization's context without a prefix; the bare prompt by default): (u, d_out), float32."""
    device = next(model.parameters()).device
    prompts = [template.replace("{}", r.prompt) for r in requests]
    batch = encode_prompts(tokenizer, prompts, [r.subject for r in requests]).to(device)
    with capture_output(targets.block(layer), batch.subject_last) as out, stop_after(targets.block(layer)):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.value.float()
