"""Keys and current values of edit requests at a layer (the inputs of the closed-form update).

K1 at layer l is the input of the MLP output projection at the subject's last token,
averaged over the context-prefixed prompts with half the weight on the bare prompt, as
in the reference. The current value is the output of the last edited block at the
subject's last token of the bare prompt.

The update reads them once per edited layer, each time on the model as updated so far. What
each read costs is kept to what the update can change: a pass stops at the block it needs,
runs the rows only up to the subject (attention is causal: later tokens cannot change them),
and, in `KeyReader`, replays the output of the blocks below the lowest edited layer, which the
update never changes, instead of recomputing it for every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from lightning_alphaedit.hooks import capture_input, capture_output, replay_blocks, stop_after
from lightning_alphaedit.prompts import encode_prompts
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets


class KeyReader:
    """Keys and current values of one batch of requests, read as often as an update needs them.

    ``context_templates[0]`` is the prompt without a context prefix (``"{}"``, or the prompt's
    chat rendering); a key is the mean of its key and the mean key over the other templates, the
    current value is read on it. With ``frozen_below`` = l, the blocks below l are taken to stay
    as they are while the reader is used (the update edits layers >= l): their output is
    computed at the first read and replayed afterwards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        targets: ModelTargets,
        requests: Sequence[EditRequest],
        context_templates: Sequence[str],
        frozen_below: int = 0,
    ) -> None:
        if not context_templates or any(t.count("{}") != 1 for t in context_templates):
            raise ValueError("context_templates must be templates with one '{}' each, the first without a context prefix")
        self.model, self.targets, self.frozen_below = model, targets, frozen_below
        self.u, self.c = len(requests), len(context_templates)
        self.device = next(model.parameters()).device
        if not requests:
            return
        templates = [ctx.replace("{}", r.prompt) for r in requests for ctx in context_templates]
        subjects = [r.subject for r in requests for _ in context_templates]
        batch = encode_prompts(tokenizer, templates, subjects).to(self.device)
        width = int(batch.subject_last.max()) + 1  # attention is causal: nothing after the subject matters
        self.input_ids = batch.input_ids[:, :width]  # (u*c, w)
        self.attention_mask = batch.attention_mask[:, :width]  # (u*c, w)
        self.subject_last = batch.subject_last  # (u*c,)
        self.bare = torch.arange(0, self.u * self.c, self.c, device=self.device)  # (u,) rows without a prefix
        self._below: torch.Tensor | None = None  # (u*c, w, d) output of block frozen_below - 1
        self._like = None  # an output of that block as it returned it (tensor or tuple), for the replay

    @torch.no_grad()
    def keys(self, layer: int | Sequence[int]) -> torch.Tensor | dict[int, torch.Tensor]:
        """K1 at ``layer``: (u, d_in), float32; for a sequence of layers {layer: (u, d_in)}, read
        in one forward pass stopped after the highest."""
        layers = [layer] if isinstance(layer, int) else list(layer)
        if not self.u:
            empty = {at: torch.zeros(0, self.targets.key_size(at), device=self.device) for at in layers}
            return empty[layer] if isinstance(layer, int) else empty
        rows = torch.arange(self.u * self.c, device=self.device)
        with ExitStack() as stack:
            captured = {
                at: stack.enter_context(capture_input(self.targets.projection(at), self.subject_last)) for at in layers
            }
            self._forward(stack, rows, min(layers), max(layers))
        keys = {}
        for at, capture in captured.items():
            k = capture.value.float().view(self.u, self.c, -1)  # (u, c, d_in)
            keys[at] = k[:, 0] if self.c == 1 else 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(dim=1)  # (u, d_in)
        return keys[layer] if isinstance(layer, int) else keys

    @torch.no_grad()
    def values(self, layer: int) -> torch.Tensor:
        """Output of block ``layer`` at the subject's last token of the bare prompts: (u, d_out), float32."""
        if not self.u:
            return torch.zeros(0, self.targets.value_size(layer), device=self.device)
        with ExitStack() as stack:
            out = stack.enter_context(capture_output(self.targets.block(layer), self.subject_last[self.bare]))
            self._forward(stack, self.bare, layer, layer)
        return out.value.float()

    def _forward(self, stack: ExitStack, rows: torch.Tensor, first: int, last: int) -> None:
        """Runs ``rows`` through block ``last`` (inside ``stack``'s captures); when every block read
        (``first`` .. ``last``) is at or above ``frozen_below``, the blocks below are replayed."""
        below = [self.targets.block(i) for i in range(self.frozen_below)] if first >= self.frozen_below else []
        if below and self._below is None:
            self._record(below[-1])
        if below:
            stack.enter_context(replay_blocks(below, self._below[rows], self._like))
        stack.enter_context(stop_after(self.targets.block(last)))
        self.model(input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows])

    def _record(self, block: torch.nn.Module) -> None:
        raw = {}
        handle = block.register_forward_hook(lambda module, args, output: raw.__setitem__("output", output))
        try:
            with capture_output(block) as out, stop_after(block):
                self.model(input_ids=self.input_ids, attention_mask=self.attention_mask)
        finally:
            handle.remove()
        self._below, self._like = out.value, raw["output"]


def request_keys(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    requests: Sequence[EditRequest],
    layer: int | Sequence[int],
    context_templates: Sequence[str],
) -> torch.Tensor | dict[int, torch.Tensor]:
    """K1 of ``requests`` at ``layer``: (u, d_in), float32; for a sequence of layers {layer: (u, d_in)}
    (see `KeyReader`, which reads them repeatedly during an update)."""
    return KeyReader(model, tokenizer, targets, requests, context_templates).keys(layer)


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
    return KeyReader(model, tokenizer, targets, requests, [template]).values(layer)
