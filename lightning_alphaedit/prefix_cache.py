"""Run only what δ changes: the value step's rows from the subject's last token on.

The value optimisation adds δ at the subject's last token ``s`` of every row. Attention is
causal, so at every position before ``s`` every block's hidden states, keys and values are the
same at every step, whatever δ is. They are computed once per batch, by the forward pass that
records the unedited values anyway, and kept as a key/value cache; each step then runs only
the positions ``s .. end`` (the rest of the prompt and the target tokens the loss reads),
attending to the cached prefix. The result is the full pass's, up to float round-off.

The cache is the model's own (`transformers.DynamicCache`); the per-row prefix lengths are
expressed with an explicit 4-D attention mask and explicit position ids, so rows whose subject
ends at different positions share one padded pass. Where a model cannot take that (an
attention kernel without 4-D masks, a sliding window shorter than the rows, a forward without
a cache argument), `unsupported` says why and the value step runs the full rows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

MASKABLE_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take an additive 4-D mask as given."""


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache (transformers 5 renamed
    ``past_key_values`` to ``cache``), or None."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def unsupported(model: torch.nn.Module, longest: int) -> str | None:
    """Why ``model`` cannot run rows of up to ``longest`` tokens from a prefix cache, or None."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no transformers config"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in MASKABLE_ATTENTION:
        return f"its attention implementation {attention!r} does not take a 4-D mask"
    if cache_argument(model) is None or "position_ids" not in inspect.signature(model.forward).parameters:
        return "its forward takes no key/value cache or no position ids"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True) and window <= longest:
        return f"its sliding window ({window} tokens) is shorter than the rows ({longest} tokens)"
    return None


@dataclass
class PrefixCache:
    """Keys and values of every block over a batch of right-padded rows, and where each row's
    δ-dependent part begins and ends."""

    keys: list[Tensor]  # per block (rows, heads, t, head_dim)
    values: list[Tensor]  # per block (rows, heads, t, head_dim)
    start: Tensor  # (rows,) first position that depends on δ (the subject's last token)
    end: Tensor  # (rows,) one past the last position the loss reads
    input_ids: Tensor  # (rows, t)
    argument: str  # the forward's name for the cache

    @classmethod
    def from_cache(
        cls, cache, width: int, start: Tensor, end: Tensor, input_ids: Tensor, argument: str
    ) -> PrefixCache | None:
        """The prefix cache held by a `DynamicCache` filled by a pass over the first ``width``
        positions of ``input_ids``' rows (at least up to each row's ``start``); None when its
        layout is not the plain per-block keys and values (no ``layers``, a layer left empty, a
        sliding layer that dropped positions)."""
        layers = getattr(cache, "layers", None)
        if not layers:
            return None
        keys, values = [], []
        if int(start.max()) > width:
            raise ValueError(f"a row starts at {int(start.max())}, after the {width} cached positions")
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if k is None or v is None or k.dim() != 4 or k.shape[0] != input_ids.shape[0] or k.shape[-2] != width:
                return None
            keys.append(k)
            values.append(v)
        return cls(keys, values, start, end, input_ids, argument)

    def width(self, members: Tensor) -> int:
        """Suffix positions of the widest row among ``members``."""
        return int((self.end[members] - self.start[members]).max())

    def positions(self, members: Tensor) -> Tensor:
        """(m, w) the full-row position of every suffix position (clamped inside the row)."""
        w = self.width(members)
        positions = self.start[members, None] + torch.arange(w, device=self.start.device)  # (m, w)
        return positions.clamp(max=self.input_ids.shape[1] - 1)

    def valid(self, members: Tensor) -> Tensor:
        """(m, w) which suffix positions are real tokens of their row (the rest is padding)."""
        w = self.width(members)
        positions = self.start[members, None] + torch.arange(w, device=self.start.device)  # (m, w)
        return positions < self.end[members, None]

    def suffix(self, members: Tensor, full: Tensor) -> Tensor:
        """``full`` (rows, t, ...) read at the suffix positions of ``members``: (m, w, ...)."""
        positions = self.positions(members).to(full.device)
        index = positions.view(*positions.shape, *([1] * (full.dim() - 2))).expand(-1, -1, *full.shape[2:])
        return torch.gather(full[members.to(full.device)], 1, index)

    def inputs(self, members: Tensor, dtype: torch.dtype) -> dict:
        """The forward arguments that run the suffixes of ``members`` on their cached prefixes."""
        from transformers import DynamicCache

        device = self.start.device
        start, end = self.start[members], self.end[members]  # (m,)
        w = self.width(members)
        p = int(start.max())  # cached positions any of these rows attends to
        steps = torch.arange(w, device=device)
        position_ids = start[:, None] + steps  # (m, w) true positions (rotary and learned embeddings)
        valid = position_ids < end[:, None]  # (m, w) real suffix tokens
        # Query j of a row sees the row's prefix (cached positions < start) and its own suffix up
        # to j. Cached positions from start on hold the unedited pass's values: masked out.
        sees_prefix = (torch.arange(p, device=device) < start[:, None])[:, None, :].expand(-1, w, -1)  # (m, w, p)
        sees_suffix = (steps[None, :, None] >= steps[None, None, :]) & valid[:, None, :]  # (m, w, w)
        allowed = torch.cat([sees_prefix, sees_suffix], dim=2)[:, None]  # (m, 1, w, p + w)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if p == 0:  # every subject starts its row: nothing to attend to before it
                break
            rows = members.to(k.device)
            cache.update(k[rows, :, :p], v[rows, :, :p], layer)
        ids = torch.gather(self.input_ids[members], 1, self.positions(members))
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": position_ids,
            self.argument: cache,
            "use_cache": True,
        }
