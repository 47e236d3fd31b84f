"""The tiny in-process models and the byte-level tokenizer: deterministic and offline."""

import pytest
import torch

from lightning_alphaedit.tiny import (
    ARCHITECTURES,
    TinyModelConfig,
    byte_level_tokenizer,
    tiny_causal_lm,
    tiny_model_and_tokenizer,
)

TEXT = "Héllo wörld — 東京 🚀 Ελληνικά\n\ttabs  and  spaces, <|endoftext|>?"


def test_tokenizer_round_trip_and_specials():
    tok = byte_level_tokenizer()
    assert len(tok) == 257
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 256
    assert tok.padding_side == "right"

    plain = TEXT.replace("<|endoftext|>", "")
    ids = tok(plain)["input_ids"]
    assert ids == list(plain.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == plain
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT  # the special token survives too

    batch = tok(["a b", "hello"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[97, 32, 98, 256, 256], [104, 101, 108, 108, 111]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_models_build_and_run(architecture):
    model, tok = tiny_model_and_tokenizer(TinyModelConfig(architecture=architecture))
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 4
    assert model.config.hidden_size == 64
    assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id
    ids = tok(["The capital of France is", "Paris"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_seed_determines_weights(architecture):
    a = tiny_causal_lm(TinyModelConfig(architecture=architecture, seed=1), vocab_size=257)
    b = tiny_causal_lm(TinyModelConfig(architecture=architecture, seed=1), vocab_size=257)
    c = tiny_causal_lm(TinyModelConfig(architecture=architecture, seed=2), vocab_size=257)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    tiny_causal_lm(TinyModelConfig(architecture="llama", seed=7), vocab_size=257)
    assert torch.equal(torch.get_rng_state(), state)


def test_sizes_are_configurable():
    config = TinyModelConfig(
        architecture="gptj", num_layers=2, hidden_size=32, intermediate_size=48, num_heads=2
    )
    model = tiny_causal_lm(config, vocab_size=257)
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    assert model.transformer.h[0].mlp.fc_out.in_features == 48
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_causal_lm(TinyModelConfig(architecture="bert"), vocab_size=257)


def test_word_level_tokenizer_is_deterministic_with_offsets():
    from lightning_alphaedit.tiny import UNKNOWN_TOKEN, word_level_tokenizer

    first, second = word_level_tokenizer(), word_level_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    encoded = first("The capital of Norway is", return_offsets_mapping=True)
    assert len(encoded["input_ids"]) == 5 and encoded["offset_mapping"][3] == (15, 21)
    assert first.decode(encoded["input_ids"]) == "The capital of Norway is"
    assert first.convert_ids_to_tokens(first("zzqx-unheard")["input_ids"])[0] == UNKNOWN_TOKEN
    assert first.convert_ids_to_tokens(len(first) - 1) == first.eos_token == first.pad_token


def test_trained_tiny_model_is_cached_and_a_damaged_cache_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_CACHE", str(tmp_path))
    config = TinyModelConfig(tokenizer="words", pretrain_steps=2, num_layers=2)
    trained, _ = tiny_model_and_tokenizer(config)
    untrained, _ = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words", num_layers=2))
    assert not torch.equal(trained.transformer.h[0].mlp.c_proj.weight, untrained.transformer.h[0].mlp.c_proj.weight)
    (cached,) = (tmp_path / "tiny-models").glob("*.safetensors")
    again, _ = tiny_model_and_tokenizer(config)
    for (name, a), (_, b) in zip(trained.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    cached.write_bytes(b"damaged")
    retrained, _ = tiny_model_and_tokenizer(config)
    for (name, a), (_, b) in zip(trained.state_dict().items(), retrained.state_dict().items()):
        assert torch.equal(a, b), name
