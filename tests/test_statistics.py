"""Key statistics: one pass equals per-layer passes and an explicit recomputation; the cache is
hit without running the model and never trusted when corrupted."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.statistics import (
    CollectionStopped,
    StatisticsCache,
    StatisticsConfig,
    collect_key_moments,
    export_statistics,
    layer_statistics,
    model_fingerprint,
    statistics_keys,
)
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

TEXTS = [
    "The river runs north through the valley.",
    "Violins have four strings.",
    "A short one.",
    "Mount Kilimanjaro is the highest mountain in Africa, rising above the plains of Tanzania.",
    "Chess is played on a board of sixty-four squares.",
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(architecture=request.param, num_layers=3, seed=1))
    return model, tokenizer, ModelTargets(model)


def explicit_second_moment(model, tokenizer, projection, texts, max_length):
    """E[k kᵀ] in float64 from unpadded single-text forwards, keys read by a plain hook."""
    keys = []
    handle = projection.register_forward_hook(lambda m, args, out: keys.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
    finally:
        handle.remove()
    k = torch.cat(keys).double()  # (n_tokens, d_in)
    return k.T @ k / k.shape[0]


def test_one_pass_equals_per_layer_passes_and_explicit_formula(tiny):
    model, tokenizer, targets = tiny
    both = collect_key_moments(model, tokenizer, targets, [0, 2], TEXTS, max_length=24, batch_size=2)
    for layer in (0, 2):
        alone = collect_key_moments(model, tokenizer, targets, [layer], TEXTS, max_length=24, batch_size=5)
        assert both[layer].count == alone[layer].count
        torch.testing.assert_close(both[layer].mean(), alone[layer].mean(), rtol=1e-5, atol=1e-7)
        reference = explicit_second_moment(model, tokenizer, targets.projection(layer), TEXTS, 24)
        torch.testing.assert_close(both[layer].mean().double(), reference, rtol=1e-4, atol=1e-6)


def test_padding_is_excluded(tiny):
    model, tokenizer, targets = tiny
    padded = collect_key_moments(model, tokenizer, targets, [1], TEXTS, max_length=64, batch_size=5)
    single = collect_key_moments(model, tokenizer, targets, [1], TEXTS, max_length=64, batch_size=1)
    expected_tokens = sum(len(tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in TEXTS)
    assert padded[1].count == single[1].count == expected_tokens
    torch.testing.assert_close(padded[1].mean(), single[1].mean(), rtol=1e-5, atol=1e-7)


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_second_call_hits_cache_without_running_the_model(tiny, tmp_path):
    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=12, max_length=32, cache_dir=str(tmp_path), progress=False)
    corpus = load_corpus(config.corpus)
    first = layer_statistics(model, tokenizer, targets, [0, 1], config, "tiny-test", corpus)
    assert len(list((tmp_path / "statistics").glob("*.safetensors"))) == 2
    calls, handle = count_forwards(model)
    try:
        second = layer_statistics(model, tokenizer, targets, [0, 1], config, "tiny-test", corpus)
    finally:
        handle.remove()
    assert calls == []
    for layer in (0, 1):
        assert torch.equal(first[layer].sum, second[layer].sum) and first[layer].count == second[layer].count
    # another sample count is another key: recomputed
    calls, handle = count_forwards(model)
    try:
        layer_statistics(model, tokenizer, targets, [0], StatisticsConfig(**{**config.__dict__, "sample_count": 5}), "tiny-test", corpus)
    finally:
        handle.remove()
    assert calls


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key"])
def test_corrupted_cache_is_detected_and_recomputed(tiny, tmp_path, damage):
    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=8, max_length=32, cache_dir=str(tmp_path), progress=False)
    corpus = load_corpus(config.corpus)
    good = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)[1]
    (path,) = (tmp_path / "statistics").glob("*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # a valid file written for another key under this name
        cache = StatisticsCache(tmp_path / "statistics")
        other = dict(model="someone-else", layer=1)
        cache.save(other, good)
        cache.path(other).replace(path)
    calls, handle = count_forwards(model)
    try:
        again = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)[1]
    finally:
        handle.remove()
    assert calls, "a damaged cache file must be recomputed"
    torch.testing.assert_close(again.mean(), good.mean())
    # and the file was rewritten whole
    calls, handle = count_forwards(model)
    try:
        layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)
    finally:
        handle.remove()
    assert calls == []


def test_fingerprint_follows_the_weights(tiny):
    model, _, targets = tiny
    before = model_fingerprint(model, targets, 1)
    assert model_fingerprint(model, targets, 1) == before
    with torch.no_grad():
        original = targets.weight(1).detach().clone()
        targets.weight(1).add_(1e-3)
        changed = model_fingerprint(model, targets, 1)
        targets.weight(1).copy_(original)
    assert changed != before
    assert model_fingerprint(model, targets, 1) == before


def test_finite_garbage_under_a_valid_header_is_rebuilt(tiny, tmp_path, caplog):
    """Bytes of the data changed to other finite values (the header still parses): the checksum
    catches it, and the rebuilt entry equals a fresh build bit for bit."""
    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=8, max_length=32, cache_dir=str(tmp_path), progress=False)
    corpus = load_corpus(config.corpus)
    layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)
    (path,) = (tmp_path / "statistics").glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    middle = header + (len(raw) - header) // 2
    raw[middle : middle + 8] = torch.tensor([1.5], dtype=torch.float64).numpy().tobytes()  # finite, wrong
    path.write_bytes(bytes(raw))
    cache = StatisticsCache(tmp_path / "statistics")
    with safe_open(str(path), framework="pt") as f:  # still a well-formed file of finite numbers
        assert torch.isfinite(f.get_tensor("sum")).all()
    calls, handle = count_forwards(model)
    try:
        with caplog.at_level(logging.WARNING, logger="lightning_alphaedit.statistics"):
            rebuilt = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)[1]
    finally:
        handle.remove()
    assert calls, "a file whose bytes no longer match their checksum must be recomputed"
    assert "checksum" in caplog.text
    fresh = collect_key_moments(model, tokenizer, targets, [1], corpus.texts[:8], max_length=32,
                                batch_size=config.batch_size)[1]
    assert torch.equal(rebuilt.sum, fresh.sum) and rebuilt.count == fresh.count
    assert cache.load(json.loads(safe_open(str(path), framework="pt").metadata()["key"])) is not None


def test_a_cache_entry_without_checksums_is_recomputed(tiny, tmp_path, caplog):
    """Nothing vouches for an entry without checksums: replaced by another valid file of the right
    shapes (here zeros) under the right key, it must be recomputed, not used."""
    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=8, max_length=32, cache_dir=str(tmp_path), progress=False)
    corpus = load_corpus(config.corpus)
    built = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)[1]
    (path,) = (tmp_path / "statistics").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, state = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    forged = {"sum": torch.zeros_like(state["sum"]), "count": state["count"]}
    save_file(forged, str(path), metadata={"key": metadata["key"]})  # the key is right, no checksums
    calls, handle = count_forwards(model)
    try:
        with caplog.at_level(logging.WARNING, logger="lightning_alphaedit.statistics"):
            loaded = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)[1]
    finally:
        handle.remove()
    assert calls, "an entry without checksums must be recomputed"
    assert "no content checksums" in caplog.text
    assert torch.equal(loaded.sum, built.sum) and loaded.count == built.count


TWO_RUNS = """
import json, sys, time
from pathlib import Path
import torch
from lightning_alphaedit.corpus import load_corpus
from lightning_alphaedit.statistics import StatisticsConfig, layer_statistics
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

cache, go = sys.argv[1], Path(sys.argv[2])
model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(architecture="gpt2", num_layers=3, seed=1))
forwards = []
def slow(module, args):  # a slow model: both runs are inside the computation at the same time
    forwards.append(1)
    time.sleep(0.2)
model.register_forward_pre_hook(slow)
config = StatisticsConfig(corpus="tiny-corpus", sample_count=32, max_length=32, batch_size=4, cache_dir=cache, progress=False)
corpus = load_corpus(config.corpus)
while not go.exists():
    time.sleep(0.01)
moments = layer_statistics(model, tokenizer, ModelTargets(model), [0, 1], config, "tiny-test", corpus)
print(json.dumps({"forwards": len(forwards), "sum": float(moments[1].sum.double().sum())}))
"""


def test_two_runs_sharing_an_empty_cache_compute_it_once(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TWO_RUNS)
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()  # both start together, whenever their imports finished
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    forwards = sorted(o["forwards"] for o in outputs)
    assert forwards[0] == 0 and forwards[1] == 8, outputs  # 32 documents in batches of 4, computed once
    assert outputs[0]["sum"] == outputs[1]["sum"]
    assert len(list((tmp_path / "cache" / "statistics").glob("*.safetensors"))) == 2


CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


def test_chat_fraction_renders_a_spread_share_of_documents_and_is_its_own_cache_entry(tmp_path):
    """``chat_fraction``: every 1/f-th document becomes a chat user turn that fits ``max_length``
    whole (the assistant header is never truncated away); the statistics equal an explicit
    formula over exactly those texts; plain statistics keep their cache entry."""
    from lightning_alphaedit.chat import chat_text
    from lightning_alphaedit.statistics import chat_documents

    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(num_layers=3, seed=1))
    tokenizer.chat_template = CHAT_TEMPLATE
    targets = ModelTargets(model)
    texts = chat_documents(tokenizer, TEXTS * 2, 0.5, max_length=64)
    assert [t.startswith("<|endoftext|>user\n") for t in texts] == [False, True] * 5
    assert all(t.endswith("<|endoftext|>assistant\n") and len(tokenizer(t)["input_ids"]) <= 64
               for t in texts if t.startswith("<|endoftext|>"))
    assert texts[1] == chat_text(tokenizer, TEXTS[1]) and texts[0] == TEXTS[0]  # short documents whole
    with pytest.raises(ValueError, match="chat_fraction"):
        StatisticsConfig(chat_fraction=1.5)

    config = StatisticsConfig(corpus="tiny-corpus", sample_count=10, max_length=64, cache_dir=str(tmp_path),
                              progress=False, chat_fraction=0.5)
    corpus = load_corpus(config.corpus)
    chat = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)
    expected = explicit_second_moment(model, tokenizer, targets.projection(1),
                                      chat_documents(tokenizer, corpus.texts[:10], 0.5, 64), 64)
    torch.testing.assert_close(chat[1].mean().double(), expected, rtol=1e-4, atol=1e-6)
    plain = layer_statistics(model, tokenizer, targets, [1], StatisticsConfig(**{**config.__dict__, "chat_fraction": 0.0}),
                             "tiny-test", corpus)
    assert len(list((tmp_path / "statistics").glob("*.safetensors"))) == 2
    assert not torch.equal(plain[1].sum, chat[1].sum)


class Crash(Exception):
    """A process dying at a chosen batch (a kill, an out-of-memory error, a node failure)."""


def crash_at(model, batch: int):
    """A forward pre-hook raising `Crash` on the ``batch``-th forward pass (0-based)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(1)
        if len(seen) == batch + 1:
            raise Crash(f"killed at batch {batch}")

    return model.get_input_embeddings().register_forward_pre_hook(hook, with_kwargs=True)


def test_a_collection_killed_at_random_points_goes_on_to_the_same_bits(tiny, tmp_path):
    """Partial sums saved every 4 documents; the collection dies at three random batches in turn
    (between saves too) and the same call goes on each time: the end is the uninterrupted C0, bitwise,
    and no partial file is left."""
    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=40, max_length=32, batch_size=3, save_every=4,
                              cache_dir=str(tmp_path / "interrupted"), progress=False)
    corpus = load_corpus(config.corpus)
    whole = layer_statistics(model, tokenizer, targets, [0, 2], StatisticsConfig(
        **{**config.__dict__, "cache_dir": str(tmp_path / "whole")}), "tiny-test", corpus)
    points = sorted(torch.randperm(13, generator=torch.Generator().manual_seed(0))[:3].tolist())
    for point in points:
        handle = crash_at(model, point)
        try:
            with pytest.raises(Crash):
                layer_statistics(model, tokenizer, targets, [0, 2], config, "tiny-test", corpus)
        finally:
            handle.remove()
        assert list((tmp_path / "interrupted" / "statistics").glob("partial-*")) or point < 2
    forwards, handle = count_forwards(model)
    try:
        resumed = layer_statistics(model, tokenizer, targets, [0, 2], config, "tiny-test", corpus)
    finally:
        handle.remove()
    assert len(forwards) < 14  # it went on: fewer than the 14 batches of a full collection
    for layer in (0, 2):
        assert torch.equal(resumed[layer].sum, whole[layer].sum) and resumed[layer].count == whole[layer].count
    assert not list((tmp_path / "interrupted" / "statistics").glob("partial-*"))


def test_sigterm_saves_the_partial_sums_and_stops(tiny, tmp_path):
    """SIGTERM (what a scheduler sends before a time limit) during a collection: the sums are saved
    at the next batch boundary, `CollectionStopped` says so, and the next call ends on the same bits."""
    import signal

    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=30, max_length=32, batch_size=4, save_every=1000,
                              cache_dir=str(tmp_path), progress=False)
    corpus = load_corpus(config.corpus)
    reference = collect_key_moments(model, tokenizer, targets, [1], corpus.texts[:30], 32, batch_size=4)
    calls = []

    def terminate(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    handle = model.get_input_embeddings().register_forward_pre_hook(terminate, with_kwargs=True)
    try:
        with pytest.raises(CollectionStopped, match="after 12 of 30 documents"):
            layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)
    finally:
        handle.remove()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    (partial,) = (tmp_path / "statistics").glob("partial-*")
    done = layer_statistics(model, tokenizer, targets, [1], config, "tiny-test", corpus)[1]
    assert torch.equal(done.sum, reference[1].sum) and done.count == reference[1].count
    assert not partial.exists()


def test_exported_statistics_are_used_elsewhere_and_refused_when_they_do_not_fit(tiny, tmp_path):
    """``export_statistics`` writes one file per layer and a manifest; ``statistics.file`` uses them
    without computing anything, and refuses them, naming each differing field, for other settings,
    other layers or changed bytes."""
    model, tokenizer, targets = tiny
    config = StatisticsConfig(corpus="tiny-corpus", sample_count=8, max_length=32, cache_dir=str(tmp_path / "a"),
                              progress=False)
    corpus = load_corpus(config.corpus)
    built = layer_statistics(model, tokenizer, targets, [0, 1], config, "tiny-test", corpus)
    keys = statistics_keys(model, tokenizer, targets, [0, 1], config, "tiny-test", corpus)
    manifest = export_statistics(built, keys, tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["layer0.safetensors", "layer1.safetensors", "manifest.json"]
    elsewhere = StatisticsConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "b"), "file": str(manifest.parent)})
    forwards, handle = count_forwards(model)
    try:
        used = layer_statistics(model, tokenizer, targets, [0, 1], elsewhere, "another/path/to/it", corpus)
    finally:
        handle.remove()
    assert not forwards
    for layer in (0, 1):
        assert torch.equal(used[layer].sum, built[layer].sum) and used[layer].count == built[layer].count
    other = StatisticsConfig(**{**elsewhere.__dict__, "max_length": 16, "dtype": "float64"})
    with pytest.raises(ValueError) as refused:
        layer_statistics(model, tokenizer, targets, [0, 1], other, "tiny-test", corpus)
    assert "max_length is 32 in the file, 16 for this run" in str(refused.value) and "dtype" in str(refused.value)
    with pytest.raises(ValueError, match="layer 2: not in the file"):
        layer_statistics(model, tokenizer, targets, [0, 2], elsewhere, "tiny-test", corpus)
    raw = bytearray((tmp_path / "shared" / "layer1.safetensors").read_bytes())
    raw[-4:] = b"\x00\x00\x80\x3f"
    (tmp_path / "shared" / "layer1.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its checksum"):
        layer_statistics(model, tokenizer, targets, [0, 1], elsewhere, "tiny-test", corpus)
