"""Tiny, randomly initialised causal LMs of the real architectures, built in-process.

Why: every part of the editing pipeline (targets, hooks, statistics, value optimisation,
the update itself) must be tested on the *same module classes* the real checkpoints use
(GPT-2's `Conv1D`, GPT-J's parallel block, Llama/Qwen2's gated MLP and RMSNorm, NeoX's
partial rotary), but tests must run on a CPU in seconds and never touch the network.
So we build the transformers config classes with toy sizes and initialise them from a
fixed seed, and pair them with a byte-level tokenizer that needs no vocabulary files.
Nothing here decides anything by model name: the architecture string only picks which
transformers config class to instantiate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from importlib import resources

import safetensors.torch
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lightning_alphaedit.paths import atomic_file, default_cache_dir

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"
"""The one special token; it serves as BOS, EOS and padding, as in GPT-2."""

NUM_BYTES = 256
"""The byte alphabet: token id b is byte b, and the special token follows at id 256."""


# -----------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    The `tokenizers` ByteLevel pre-tokenizer rewrites text into exactly these characters,
    so a BPE vocabulary made of them (and no merges) covers every UTF-8 string, one token
    per byte. Written out here so the vocabulary order (id == byte value) is ours, not
    an implementation detail of some library helper.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(NUM_BYTES):
        if b not in mapping:
            mapping[b] = chr(NUM_BYTES + shift)  # unprintable bytes go above 255
            shift += 1
    return mapping


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer: 256 byte tokens plus "<|endoftext|>" (id 256).

    BPE with the byte alphabet as vocabulary and no merges means tokenization is simply
    "one token per UTF-8 byte": every text is representable, nothing is learned or random,
    and decoding gives the text back exactly. The special token is BOS, EOS and PAD;
    padding is on the right, as the editing code reads positions from the left.
    """
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(NUM_BYTES)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


WORD_PATTERN = r"\w+|[^\w\s]+"
"""What the word-level tokenizer splits on: runs of word characters, runs of punctuation."""

UNKNOWN_TOKEN = "[UNK]"


def packaged_vocabulary_texts() -> list[str]:
    """The texts a word-level vocabulary is built from: the packaged tiny corpus and edit set."""
    data = resources.files("lightning_alphaedit") / "data"
    texts = data.joinpath("tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    for line in data.joinpath("tiny_edits.jsonl").read_text(encoding="utf-8").splitlines():
        texts.extend(_strings(json.loads(line)) if line.strip() else [])
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def word_level_tokenizer(texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer whose vocabulary is every word of ``texts``.

    Why: a random tiny model cannot carry a multi-byte answer from one edited position
    to every later byte, so byte-level tokens make value optimization nearly impossible
    on it. With one token per word, prompts are short and answers are one or two tokens,
    as for real models' subword tokenizers. Ids: "[UNK]" is 0, the words follow in sorted
    order, "<|endoftext|>" (BOS, EOS, PAD) is last. ``texts`` defaults to the packaged
    tiny corpus and edit set.
    """
    texts = packaged_vocabulary_texts() if texts is None else texts
    words = sorted({w for text in texts for w in re.findall(WORD_PATTERN, text)})
    vocab = {UNKNOWN_TOKEN: 0, **{w: i + 1 for i, w in enumerate(words)}}
    vocab[SPECIAL_TOKEN] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # splits on WORD_PATTERN, drops spaces
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=UNKNOWN_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


TOKENIZERS = ("bytes", "words")


def tiny_tokenizer(config: TinyModelConfig) -> PreTrainedTokenizerFast:
    """The tokenizer ``config.tokenizer`` names."""
    if config.tokenizer == "bytes":
        return byte_level_tokenizer()
    if config.tokenizer == "words":
        return word_level_tokenizer()
    raise ValueError(f"unknown tiny tokenizer {config.tokenizer!r}; expected one of {TOKENIZERS}")


# -----------------------------------------------------------------------------
# models


@dataclass
class TinyModelConfig:
    """Sizes and seed of a tiny random causal LM."""

    architecture: str = "gpt2"
    """Transformers architecture (config class) to build: one of "gpt2", "gptj", "llama",
    "qwen2", "gpt_neox"."""
    num_layers: int = 4
    """Number of decoder blocks."""
    hidden_size: int = 64
    """Residual-stream width d1 (the edited projection's output width)."""
    intermediate_size: int = 256
    """MLP hidden width d0 (the keys' width, the edited projection's input width)."""
    num_heads: int = 4
    """Attention heads; must divide hidden_size."""
    max_positions: int = 256
    """Maximum sequence length (position embeddings / rotary cache)."""
    seed: int = 0
    """Seed of the weight initialisation; the global torch RNG is left untouched."""
    initializer_range: float = 0.02
    """Standard deviation of the random weights (transformers' ``initializer_range``). The
    default 0.02 gives near-uniform next-token distributions; larger values give a random
    model with confident, input-dependent predictions, closer to a trained one."""
    pretrain_steps: int = 0
    """Full-batch AdamW steps on the packaged tiny corpus and the TRUE answers of the packaged
    tiny edit set, so the model knows facts an edit must overturn and its keys are
    specific to tokens (a purely random model has neither). 0 = purely random."""
    pretrain_lr: float = 3e-3
    """Learning rate of that training."""
    tokenizer: str = "bytes"
    """"bytes" (any text, one token per UTF-8 byte) or "words" (one token per word of the
    packaged tiny corpus and edit set; unknown words become "[UNK]")."""


ARCHITECTURES: tuple[str, ...] = ("gpt2", "gptj", "llama", "qwen2", "gpt_neox")
"""The architecture strings `TinyModelConfig.architecture` accepts."""


def _transformers_config(config: TinyModelConfig, vocab_size: int) -> PretrainedConfig:
    """The transformers config for `config`, with special token ids matching the tokenizer.

    Each config class spells the same sizes differently (n_embd vs hidden_size, n_inner vs
    intermediate_size); this is the only place that knows those spellings.
    """
    if config.hidden_size % config.num_heads != 0:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}"
        )
    head_dim = config.hidden_size // config.num_heads
    special = vocab_size - 1  # the tokenizer's "<|endoftext|>" comes after the bytes
    tokens = dict(
        bos_token_id=special, eos_token_id=special, pad_token_id=special,
        initializer_range=config.initializer_range,
    )
    arch = config.architecture
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=config.max_positions,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            **tokens,
        )
    if arch == "gptj":
        return GPTJConfig(
            vocab_size=vocab_size,
            n_positions=config.max_positions,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            # the real model rotates 64 of 256 head dims; rotate half the (tiny) head, even
            rotary_dim=max(2, (head_dim // 2) // 2 * 2),
            tie_word_embeddings=False,
            **tokens,
        )
    if arch == "gpt_neox":
        # partial_rotary_factor 0.25 (the default) of a 16-dim head is 4 dims: valid (even)
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            max_position_embeddings=config.max_positions,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            **tokens,
        )
    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        return cls(
            vocab_size=vocab_size,
            max_position_embeddings=config.max_positions,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            tie_word_embeddings=False,
            **tokens,
        )
    raise ValueError(
        f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}"
    )


def tiny_causal_lm(config: TinyModelConfig, vocab_size: int) -> PreTrainedModel:
    """A randomly initialised causal LM of `config.architecture`, in eval mode, float32.

    The weights depend only on `config` and `vocab_size`: the seed is applied inside
    `torch.random.fork_rng()`, so building a model neither depends on nor disturbs the
    caller's global RNG state. Eager attention keeps the forward plain PyTorch (the same
    numbers on every backend, and attention weights available if asked for).
    """
    hf_config = _transformers_config(config, vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="eager", dtype=torch.float32
        )
    return model.eval()


def packaged_training_texts() -> list[str]:
    """The tiny corpus plus every prompt of the tiny edit set completed with its TRUE answer."""
    data = resources.files("lightning_alphaedit") / "data"
    texts = [t for t in data.joinpath("tiny_corpus.txt").read_text(encoding="utf-8").splitlines() if t.strip()]
    for line in data.joinpath("tiny_edits.jsonl").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        true = record["target_true"]
        prompts = [record["prompt"].replace("{}", record["subject"]), *record["paraphrase_prompts"]]
        texts += [f"{p} {true}." for p in prompts]
        texts += [f"{n['prompt']} {n['target']}." for n in record["neighborhood_prompts"]]
    return texts


def pretrain(model: PreTrainedModel, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> PreTrainedModel:
    """Deterministic full-batch next-token training (dropout off) of a tiny model on ``texts``."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (n, t)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(True)


def _pretrained(model: PreTrainedModel, tokenizer, config: TinyModelConfig) -> None:
    """Train ``model`` as ``config`` says, or load the result of an earlier identical training.

    The trained weights are cached under ``<cache>/tiny-models`` keyed by the config and the
    training texts, written atomically; an unreadable file is retrained, never trusted.
    """
    texts = packaged_training_texts()
    key = hashlib.sha256(json.dumps([asdict(config), texts, len(tokenizer)]).encode()).hexdigest()[:24]
    path = default_cache_dir() / "tiny-models" / f"{config.architecture}-{key}.safetensors"
    if path.exists():
        try:
            safetensors.torch.load_model(model, str(path), strict=True)
            return
        except Exception as error:  # corrupted or from another version: retrain
            log.warning("tiny model cache %s unreadable (%s); retraining", path, error)
    pretrain(model, tokenizer, texts, config.pretrain_steps, config.pretrain_lr, config.seed)
    with atomic_file(path) as tmp:
        safetensors.torch.save_model(model, str(tmp))


def tiny_model(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A tiny model sized for ``tokenizer``, trained for ``config.pretrain_steps`` if asked."""
    model = tiny_causal_lm(config, vocab_size=len(tokenizer))
    if config.pretrain_steps:
        _pretrained(model, tokenizer, config)
    return model


def tiny_model_and_tokenizer(
    config: TinyModelConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny model (trained for ``config.pretrain_steps``) and the tokenizer it was sized for."""
    tokenizer = tiny_tokenizer(config)
    return tiny_model(config, tokenizer), tokenizer
