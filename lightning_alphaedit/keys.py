"""Keys and current values of edit requests at a layer (the inputs of the closed-form update).

K1 at layer l is the input of the MLP output projection at the subject's last token,
averaged over the context-prefixed prompts with half the weight on the bare prompt, as
in the reference. The current value is the output of the last edited block at the
subject's last token of the bare prompt. Both stop the forward pass at the block needed, and
run the rows only up to the subject (causal attention: later tokens cannot change them).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

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
    layer: int | Sequence[int],
    context_templates: Sequence[str],
) -> torch.Tensor | dict[int, torch.Tensor]:
    """K1 of ``requests`` at ``layer``: (u, d_in), float32. With a sequence of layers, one forward
    pass (stopped after the highest) reads them all: {layer: (u, d_in)}.

    ``context_templates[0]`` is the prompt without a context prefix (``"{}"``, or the prompt's
    chat rendering); the key is the mean of its key and the mean key over the other templates.
    """
    if not context_templates or any(t.count("{}") != 1 for t in context_templates):
        raise ValueError("context_templates must be templates with one '{}' each, the first without a context prefix")
    layers = [layer] if isinstance(layer, int) else list(layer)
    device = next(model.parameters()).device
    templates = [ctx.replace("{}", r.prompt) for r in requests for ctx in context_templates]
    subjects = [r.subject for r in requests for _ in context_templates]
    batch = encode_prompts(tokenizer, templates, subjects).to(device)
    width = int(batch.subject_last.max()) + 1  # attention is causal: nothing after the subject matters
    with ExitStack() as stack:
        captured = {at: stack.enter_context(capture_input(targets.projection(at), batch.subject_last)) for at in layers}
        stack.enter_context(stop_after(targets.block(max(layers))))
        model(input_ids=batch.input_ids[:, :width], attention_mask=batch.attention_mask[:, :width])
    keys = {}
    for at, capture in captured.items():
        k = capture.value.float().view(len(requests), len(context_templates), -1)  # (u, c, d_in)
        keys[at] = k[:, 0] if len(context_templates) == 1 else 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(dim=1)  # (u, d_in)
    return keys[layer] if isinstance(layer, int) else keys


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
    width = int(batch.subject_last.max()) + 1  # attention is causal: nothing after the subject matters
    with capture_output(targets.block(layer), batch.subject_last) as out, stop_after(targets.block(layer)):
        model(input_ids=batch.input_ids[:, :width], attention_mask=batch.attention_mask[:, :width])
    return out.value.float()
