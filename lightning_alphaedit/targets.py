"""Where knowledge sits in a model: decoder blocks, MLP output projections, norm and head.

AlphaEdit/MEMIT read each MLP as a key-value memory: the *key* is the input of the MLP's
output projection (the hidden activation, width d0) and the *value* its output (width
d1 = hidden size); editing adds a low-rank Δ (d1 x d0) to that projection's weight.
`ModelTargets` finds those modules in any transformers causal LM *structurally*:

- blocks: the `nn.ModuleList` whose length is `config.num_hidden_layers` (else the
  longest one);
- projection: inside each block's MLP (its child named `mlp`, else the one child that
  holds linear layers mapping into the hidden size), the unique linear layer whose
  output width is the hidden size and whose input width is not;
- final norm: the last norm-like child of `model.base_model`;
- LM head / embeddings: `get_output_embeddings()` / `get_input_embeddings()`.

Nothing is decided by model name, and weight orientation is decided by module type only
(`Conv1D.weight` is (d_in, d_out), `nn.Linear.weight` is (d_out, d_in)): comparing shapes
would be ambiguous for square layers. Everything else in the project talks to weights
through `linear_weight`/`add_delta`, always in nn.Linear orientation (d_out, d_in).
Explicit `ModuleTemplates` override detection for models the heuristics get wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


@dataclass
class ModuleTemplates:
    """Module paths of the edit targets; None means "detect from the model's structure"."""

    block: str | None = None
    """Path template of the decoder blocks, "{}" = layer index (e.g. "transformer.h.{}")."""
    projection: str | None = None
    """Path template of the edited MLP output projection, "{}" = layer index
    (e.g. "transformer.h.{}.mlp.c_proj", "model.layers.{}.mlp.down_proj")."""
    final_norm: str | None = None
    """Path of the norm applied before the LM head (e.g. "transformer.ln_f")."""
    lm_head: str | None = None
    """Path of the LM head (e.g. "lm_head")."""
    embeddings: str | None = None
    """Path of the input token embeddings (e.g. "transformer.wte")."""


def is_norm(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm-like, judged by type: every transformers norm class ends in "Norm"."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def in_out_features(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer, read from its declared sizes; None if not linear."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


class ModelTargets:
    """Resolves and edits the MLP output projections (and friends) of a causal LM.

    Resolution happens once, in the constructor, so a wrong template or an ambiguous
    model fails immediately with a message that names what was found.
    """

    def __init__(self, model: nn.Module, templates: ModuleTemplates | None = None) -> None:
        self.model = model
        self.templates = templates if templates is not None else ModuleTemplates()
        t = self.templates
        self._hidden_size = self._find_hidden_size()

        if t.block is not None:
            self._block_names = self._names_from_template(t.block, "block")
        else:
            self._block_names = self._detect_blocks()
        self.num_layers: int = len(self._block_names)

        if t.projection is not None:
            self._projection_names = [
                self._resolve_template(t.projection, "projection", layer)
                for layer in range(self.num_layers)
            ]
        else:
            self._projection_names = [
                self._detect_projection(name) for name in self._block_names
            ]
        for name in self._projection_names:
            if in_out_features(model.get_submodule(name)) is None:
                found = type(model.get_submodule(name)).__name__
                raise TypeError(
                    f"projection {name!r} is a {found}; only nn.Linear and transformers "
                    "Conv1D are supported"
                )

        self._final_norm = self._single(t.final_norm, "final_norm", self._detect_final_norm)
        self._lm_head = self._single(t.lm_head, "lm_head", model.get_output_embeddings)
        self._embeddings = self._single(t.embeddings, "embeddings", model.get_input_embeddings)

    # -------------------------------------------------------------------------
    # resolution

    def _find_hidden_size(self) -> int:
        """The residual-stream width: config.hidden_size, else the embedding width."""
        config = getattr(self.model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if isinstance(hidden, int):
            return hidden
        embeddings = self.model.get_input_embeddings()
        if isinstance(embeddings, nn.Embedding):
            return embeddings.embedding_dim
        raise ValueError("cannot tell the model's hidden size (no config.hidden_size)")

    def _resolve_template(self, template: str, field: str, layer: int | None = None) -> str:
        """The module path `template` names for `layer`, checked to exist in the model."""
        if layer is not None and "{}" not in template:
            raise ValueError(f"template {field}={template!r} needs a '{{}}' for the layer index")
        name = template.format(layer) if layer is not None else template
        try:
            self.model.get_submodule(name)
        except AttributeError as err:
            at = f" for layer {layer}" if layer is not None else ""
            raise ValueError(
                f"template {field}={template!r} does not resolve{at}: the model has no "
                f"module {name!r} ({err})"
            ) from None
        return name

    def _names_from_template(self, template: str, field: str) -> list[str]:
        """Block paths from a template: layers 0, 1, ... as long as the template resolves."""
        self._resolve_template(template, field, 0)  # layer 0 must exist: clear error if not
        names: list[str] = []
        while True:
            try:
                self.model.get_submodule(template.format(len(names)))
            except AttributeError:
                break
            names.append(template.format(len(names)))
        return names

    def _detect_blocks(self) -> list[str]:
        """Paths of the decoder blocks: the outermost ModuleList of num_hidden_layers modules."""
        lists = {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0
        }
        expected = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
        candidates = [n for n, m in lists.items() if len(m) == expected]
        if not candidates and lists:
            longest = max(len(m) for m in lists.values())
            candidates = [n for n, m in lists.items() if len(m) == longest]
        # a ModuleList nested inside another candidate (e.g. experts) is not the block list
        candidates = [
            n for n in candidates if not any(n.startswith(o + ".") for o in candidates)
        ]
        if len(candidates) != 1:
            found = {n: len(m) for n, m in lists.items()}
            raise ValueError(
                f"cannot detect the decoder blocks: candidates {candidates} among ModuleLists "
                f"{found} (config.num_hidden_layers={expected}); set the `block` template, "
                'e.g. "model.layers.{}"'
            )
        prefix = candidates[0]
        return [f"{prefix}.{i}" for i in range(len(lists[prefix]))]

    def _maps_into_hidden(self, module: nn.Module) -> bool:
        """A linear layer whose output is the hidden size and input is not (d0 -> d1)."""
        sizes = in_out_features(module)
        return sizes is not None and sizes[1] == self._hidden_size and sizes[0] != self._hidden_size

    def _detect_projection(self, block_name: str) -> str:
        """Path of the MLP output projection of one block (the unique d0 -> d1 linear)."""
        block = self.model.get_submodule(block_name)
        children = dict(block.named_children())
        if "mlp" in children:
            mlp_name = "mlp"
        else:
            holders = [
                n
                for n, child in children.items()
                if any(self._maps_into_hidden(m) for m in child.modules())
            ]
            if len(holders) != 1:
                raise ValueError(
                    f"cannot find the MLP of block {block_name!r}: no child named 'mlp' and "
                    f"{len(holders)} children {holders} hold a linear layer into the hidden size "
                    f"{self._hidden_size}; set the `projection` template"
                )
            mlp_name = holders[0]
        found = [
            f"{block_name}.{mlp_name}.{n}"
            for n, m in children[mlp_name].named_modules()
            if n and self._maps_into_hidden(m)
        ]
        if len(found) != 1:
            raise ValueError(
                f"cannot detect the MLP output projection of block {block_name!r}: expected one "
                f"linear layer mapping into the hidden size {self._hidden_size} from another "
                f"width, found {found}; set the `projection` template, "
                'e.g. "model.layers.{}.mlp.down_proj"'
            )
        return found[0]

    def _detect_final_norm(self) -> nn.Module:
        """The last norm-like child of the base model (registered after the blocks)."""
        base = getattr(self.model, "base_model", self.model)
        norms = [m for _, m in base.named_children() if is_norm(m)]
        if not norms:
            children = [n for n, _ in base.named_children()]
            raise ValueError(
                f"cannot detect the final norm: no norm-like child of the base model among "
                f"{children}; set the `final_norm` template"
            )
        return norms[-1]

    def _single(
        self, template: str | None, field: str, detect: Callable[[], nn.Module | None]
    ) -> nn.Module:
        """A module given by a (layer-free) template, else by the detection function."""
        if template is not None:
            return self.model.get_submodule(self._resolve_template(template, field))
        module = detect()
        if module is None:
            raise ValueError(f"cannot detect the model's {field}; set the `{field}` template")
        return module

    # -------------------------------------------------------------------------
    # lookups

    def _check(self, layer: int) -> int:
        """`layer` itself, after checking it names one of the blocks (no negative indices)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(
                f"layer {layer} out of range: the model has {self.num_layers} layers "
                f"(0..{self.num_layers - 1})"
            )
        return layer

    def block(self, layer: int) -> nn.Module:
        """The decoder block `layer` (its output is the residual stream after that layer)."""
        return self.model.get_submodule(self._block_names[self._check(layer)])

    def block_name(self, layer: int) -> str:
        """Module path of block `layer`."""
        return self._block_names[self._check(layer)]

    def projection(self, layer: int) -> nn.Module:
        """The MLP output projection of block `layer` (the edited module)."""
        return self.model.get_submodule(self.projection_name(layer))

    def projection_name(self, layer: int) -> str:
        """Module path of the projection, e.g. "transformer.h.3.mlp.c_proj"."""
        return self._projection_names[self._check(layer)]

    def weight_name(self, layer: int) -> str:
        """Name of the projection's weight as in `model.named_parameters()`."""
        return f"{self.projection_name(layer)}.weight"

    @property
    def final_norm(self) -> nn.Module:
        """The norm between the last block and the LM head."""
        return self._final_norm

    @property
    def lm_head(self) -> nn.Module:
        """The output embeddings (hidden -> vocabulary logits)."""
        return self._lm_head

    @property
    def embeddings(self) -> nn.Module:
        """The input token embeddings."""
        return self._embeddings

    def key_size(self, layer: int) -> int:
        """d0: the projection's input width (the keys)."""
        return in_out_features(self.projection(layer))[0]

    def value_size(self, layer: int) -> int:
        """d1: the projection's output width (the values, the hidden size)."""
        return in_out_features(self.projection(layer))[1]

    # -------------------------------------------------------------------------
    # weights, always seen in nn.Linear orientation (d_out, d_in)

    def weight(self, layer: int) -> nn.Parameter:
        """The raw weight parameter, in the module's own layout."""
        return self.projection(layer).weight

    def linear_weight(self, layer: int) -> Tensor:
        """W (d_out, d_in), a view of the parameter: `.weight.T` for Conv1D, `.weight` else."""
        module = self.projection(layer)
        return module.weight.T if isinstance(module, Conv1D) else module.weight

    def _check_delta(self, layer: int, delta: Tensor) -> None:
        shape = (self.value_size(layer), self.key_size(layer))
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"layer {layer}: expected a (d_out, d_in) = {shape} matrix, "
                f"got {tuple(delta.shape)}"
            )

    def add_delta(self, layer: int, delta: Tensor) -> None:
        """W += Δ in place, Δ (d_out, d_in) in any float dtype/device (cast to the weight's)."""
        self._check_delta(layer, delta)
        with torch.no_grad():
            w = self.linear_weight(layer)  # (d_out, d_in) view of the parameter
            w.add_(delta.to(dtype=w.dtype, device=w.device))

    def set_linear_weight(self, layer: int, value: Tensor) -> None:
        """W = value in place, value (d_out, d_in) (e.g. to restore an unedited weight)."""
        self._check_delta(layer, value)
        with torch.no_grad():
            w = self.linear_weight(layer)  # (d_out, d_in)
            w.copy_(value.to(dtype=w.dtype, device=w.device))

    def project(self, layer: int, keys: Tensor) -> Tensor:
        """keys (n, d_in) -> values (n, d_out) = keys @ Wᵀ (+ bias).

        Runs the projection module itself, so it is exactly what the model computes;
        used to check edits and measure drift on stored keys.
        """
        module = self.projection(layer)
        return module(keys.to(dtype=module.weight.dtype, device=module.weight.device))

    def __repr__(self) -> str:
        first = self._projection_names[0]
        return f"ModelTargets(num_layers={self.num_layers}, projection={first!r}, ...)"
