"""Reading and steering a model's forward pass with torch hooks.

Editing needs three things from a forward pass: the keys (the input of an MLP projection
at chosen token positions), the block outputs (the residual stream) and a way to add a
trainable vector to a block's output. Doing this with forward hooks means no model-
specific forward code: the same few functions work on every transformers architecture
(or any nn.Module), whatever its block returns (transformers 5 decoder layers return a
plain tensor, older ones and other models a tuple whose first element is the hidden
states; both are handled).

Every hook lives exactly as long as its `with` block: it is removed on exit, also when
the body raises, so a model is never left with a stray hook that silently changes later
results. Hooks that transformers itself keeps on a module (e.g. its output-recording
hooks) are left alone.

Ordering, when several contexts hook the same module: `add_to_output` runs before every
other forward hook (so every observer, captures and transformers' own
`output_hidden_states` recorder included, sees the edited output), captures run in the
order they were entered, and `stop_after` always runs last (so a capture on the very
module where the forward stops still gets its value).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Capture:
    """What a capture context recorded: None until the hooked module has run."""

    value: Tensor | None = None


class StopForward(Exception):
    """Raised by `stop_after`'s hook to abandon the rest of a forward pass."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(f"forward stopped after {type(module).__name__}")
        self.module = module


# -----------------------------------------------------------------------------
# helpers


def _hidden(output: Any) -> Tensor:
    """The hidden states in a module output: the tensor itself or its first element."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, Mapping):  # transformers ModelOutput: first non-None field
        return next(iter(output.values()))
    raise TypeError(f"cannot find hidden states in a module output of type {type(output)}")


def _replace_hidden(output: Any, hidden: Tensor) -> Any:
    """`output` with its hidden states replaced by `hidden`, keeping its structure."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    if isinstance(output, Mapping):
        output[next(iter(output.keys()))] = hidden
        return output
    raise TypeError(f"cannot replace hidden states in a module output of type {type(output)}")


def _check_positions(positions: Tensor, allow_negative: bool) -> int:
    """Validates a (b,) integer position tensor once, at context entry; returns its max."""
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be a 1-D integer tensor (b,), got {positions.dtype} "
            f"of shape {tuple(positions.shape)}"
        )
    if positions.numel() == 0:
        return -1
    if not allow_negative and int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got {positions.tolist()}")
    return int(positions.max())


def _at_positions(hidden: Tensor, positions: Tensor, max_position: int) -> Tensor:
    """hidden (b, t, d) -> (b, d), row i read at token positions[i]."""
    b, t = hidden.shape[0], hidden.shape[1]
    if positions.shape[0] != b:
        raise ValueError(f"{positions.shape[0]} positions for a batch of {b}")
    if max_position >= t:
        raise IndexError(f"position {max_position} out of range for sequence length {t}")
    rows = torch.arange(b, device=hidden.device)
    return hidden[rows, positions.to(hidden.device)]  # (b, d)


class _StopHook:
    """The forward hook of `stop_after`; a class so other hooks can keep it last."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        raise StopForward(module)


def _keep_stop_hooks_last(module: nn.Module) -> None:
    """Moves any `stop_after` hook of `module` behind the hooks registered after it.

    Forward hooks run in registration order, and the stop hook raises: anything after it
    would never run. Touches torch's private hook dict, the only way to reorder hooks.
    """
    hooks = module._forward_hooks
    for key in [k for k, hook in hooks.items() if isinstance(hook, _StopHook)]:
        hooks.move_to_end(key)


# -----------------------------------------------------------------------------
# captures


@contextmanager
def capture_input(
    module: nn.Module, positions: Tensor | None = None, detach: bool = True
) -> Iterator[Capture]:
    """Records the first positional input of `module` (for an MLP projection: the keys).

    positions None: value is the whole input (b, t, d). positions (b,) LongTensor: value
    is (b, d), row i taken at token positions[i]. Detached by default (statistics and keys
    need no graph); detach=False keeps it differentiable. If the module runs several times
    inside the context, the last call wins. Implemented as a forward *pre*-hook, so the
    input is recorded even if the forward is stopped inside the module.
    """
    max_position = _check_positions(positions, False) if positions is not None else -1
    capture = Capture()

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            x = args[0]
        elif "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
        else:
            raise ValueError(f"{type(mod).__name__} was called without a positional input")
        if positions is not None:
            x = _at_positions(x, positions, max_position)  # (b, d)
        capture.value = x.detach() if detach else x

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def capture_output(
    module: nn.Module, positions: Tensor | None = None, detach: bool = True
) -> Iterator[Capture]:
    """Records the output (hidden states) of `module`: a tensor, or a tuple/ModelOutput's
    first element (blocks of older transformers return tuples, transformers 5 tensors).

    positions None: value (b, t, d); positions (b,): value (b, d) at positions[i] per row.
    Detached unless detach=False; the last call inside the context wins. Sees the output
    as modified by any `add_to_output` on the same module.
    """
    max_position = _check_positions(positions, False) if positions is not None else -1
    capture = Capture()

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        h = _hidden(output)  # (b, t, d)
        if positions is not None:
            h = _at_positions(h, positions, max_position)  # (b, d)
        capture.value = h.detach() if detach else h

    handle = module.register_forward_hook(hook)
    _keep_stop_hooks_last(module)
    try:
        yield capture
    finally:
        handle.remove()


# -----------------------------------------------------------------------------
# steering


@contextmanager
def add_to_output(module: nn.Module, vectors: Tensor, positions: Tensor) -> Iterator[None]:
    """Adds vectors[i] (b, d) to output[i, positions[i]] of every forward of `module`.

    This is how the value optimisation injects its trainable δ into the residual stream.
    The new hidden state is built out of place (`index_put` with accumulate on the
    module's output, never an in-place write into a tensor autograd saved), so gradients
    flow into `vectors`. Rows whose position is < 0 get nothing added (padding rows).
    The output keeps its structure (tensor stays tensor, tuple stays tuple).
    """
    with _patch_output(module, vectors, positions, accumulate=True):
        yield


@contextmanager
def replace_output(module: nn.Module, vectors: Tensor, positions: Tensor) -> Iterator[None]:
    """Sets output[i, positions[i]] to vectors[i] (b, d) in every forward of `module`.

    Causal tracing restores a clean run's state this way. Rows whose position is < 0 are
    left alone; like `add_to_output` it runs before other hooks and builds out of place.
    """
    with _patch_output(module, vectors, positions, accumulate=False):
        yield


@contextmanager
def add_to_all(module: nn.Module, offsets: Tensor) -> Iterator[None]:
    """Adds offsets (b, t, d) to the whole output of every forward of `module` (e.g. noise
    on the subject's token embeddings, zero elsewhere)."""

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden(output)  # (b, t, d)
        if hidden.shape != offsets.shape:
            raise ValueError(f"offsets {tuple(offsets.shape)} do not match the output {tuple(hidden.shape)}")
        return _replace_hidden(output, hidden + offsets.to(dtype=hidden.dtype, device=hidden.device))

    with _first_output_hook(module, hook):
        yield


@contextmanager
def _first_output_hook(module: nn.Module, hook) -> Iterator[None]:
    """``hook`` as the module's first forward hook, removed on exit: every other observer sees
    the output it returns."""
    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _patch_output(module: nn.Module, vectors: Tensor, positions: Tensor, accumulate: bool) -> Iterator[None]:
    if vectors.dim() != 2 or vectors.shape[0] != positions.shape[0]:
        raise ValueError(
            f"vectors must be (b, d) with b = len(positions) = {positions.shape[0]}, "
            f"got {tuple(vectors.shape)}"
        )
    max_position = _check_positions(positions, True)
    rows = torch.nonzero(positions >= 0).squeeze(1)  # (r,) rows that get a vector
    cols = positions[rows]  # (r,)

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden(output)  # (b, t, d)
        b, t = hidden.shape[0], hidden.shape[1]
        if b != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} vectors for a batch of {b}")
        if max_position >= t:
            raise IndexError(f"position {max_position} out of range for sequence length {t}")
        r, c = rows.to(hidden.device), cols.to(hidden.device)
        patch = vectors[r].to(dtype=hidden.dtype, device=hidden.device)  # (r, d)
        hidden = hidden.index_put((r, c), patch, accumulate=accumulate)  # out of place
        return _replace_hidden(output, hidden)

    with _first_output_hook(module, hook):
        yield


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abandons the forward pass right after `module` ran (and after its other hooks).

    Statistics and keys of layer l need only blocks 0..l: `with stop_after(block_l):
    model(ids)` skips the rest, the LM head included. The StopForward raised by this
    context's hook is suppressed on exit; anything else propagates. Captures on `module`
    or on modules that ran before it keep their values; later ones stay None.
    """
    handle = module.register_forward_hook(_StopHook())
    try:
        yield
    except StopForward as stop:
        if stop.module is not module:  # another (outer) stop_after's exception
            raise
    finally:
        handle.remove()


# -----------------------------------------------------------------------------
# replay


@contextmanager
def replay_blocks(blocks: list[nn.Module], output: Tensor, like: Any) -> Iterator[None]:
    """Skips the computation of ``blocks`` (consecutive, bottom up): the last one returns the
    recorded ``output`` (b, t, d), the others pass their input through untouched.

    The value optimisation changes nothing below the edited block, so recomputing those blocks
    at every step is waste. Only each block's ``forward`` is replaced (an instance attribute,
    removed on exit): its hooks still run, so `add_to_output` and captures on the last block
    see the replayed output. ``like`` is an output the real block returned, whose structure
    (tensor or tuple) the replay copies.
    """

    def shaped(hidden: Tensor) -> Any:
        if isinstance(like, Tensor):
            return hidden
        if isinstance(like, (tuple, list)):
            return (hidden, *([None] * (len(like) - 1)))
        raise TypeError(f"cannot replay a block that returns {type(like).__name__}")

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return shaped(hidden)

    def replayed(*args: Any, **kwargs: Any) -> Any:
        return shaped(output)

    # A forward already set on the instance (accelerate's device hooks do this) comes back on exit.
    previous = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks[:-1]:
            block.forward = passthrough
        blocks[-1].forward = replayed
        yield
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
