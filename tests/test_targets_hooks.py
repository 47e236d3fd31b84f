"""Targets (where the keys/values live) and hooks (how we read and steer a forward),
on tiny random models of the real architectures."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.pytorch_utils import Conv1D

from lightning_alphaedit.hooks import (
    Capture,
    StopForward,
    add_to_output,
    capture_input,
    capture_output,
    stop_after,
)
from lightning_alphaedit.targets import ModelTargets, ModuleTemplates
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

ARCHS = ["gpt2", "gptj", "llama", "qwen2"]

# what the targets must resolve to, per architecture: the released hparams' module paths
EXPECTED = {
    "gpt2": dict(
        block="transformer.h.{}",
        projection="transformer.h.{}.mlp.c_proj",
        final_norm="transformer.ln_f",
        embeddings="transformer.wte",
        kind=Conv1D,
    ),
    "gptj": dict(
        block="transformer.h.{}",
        projection="transformer.h.{}.mlp.fc_out",
        final_norm="transformer.ln_f",
        embeddings="transformer.wte",
        kind=nn.Linear,
    ),
    "gpt_neox": dict(
        block="gpt_neox.layers.{}",
        projection="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        embeddings="gpt_neox.embed_in",
        kind=nn.Linear,
    ),
    "llama": dict(
        block="model.layers.{}",
        projection="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
        embeddings="model.embed_tokens",
        kind=nn.Linear,
    ),
    "qwen2": dict(
        block="model.layers.{}",
        projection="model.layers.{}.mlp.down_proj",
        final_norm="model.norm",
        embeddings="model.embed_tokens",
        kind=nn.Linear,
    ),
}


def build(architecture: str):
    model, _ = tiny_model_and_tokenizer(TinyModelConfig(architecture=architecture))
    return model, ModelTargets(model)


def random_ids(b: int = 3, t: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g)


def hook_counts(module: nn.Module) -> tuple[int, int]:
    return len(module._forward_hooks), len(module._forward_pre_hooks)


# -----------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("architecture", ARCHS + ["gpt_neox"])
def test_targets_resolve(architecture):
    model, targets = build(architecture)
    expected = EXPECTED[architecture]
    params = dict(model.named_parameters())
    assert targets.num_layers == 4
    for layer in range(4):
        name = expected["projection"].format(layer)
        projection = targets.projection(layer)
        assert targets.projection_name(layer) == name
        assert projection is model.get_submodule(name)
        assert type(projection) is expected["kind"]
        assert targets.block(layer) is model.get_submodule(expected["block"].format(layer))
        assert targets.block_name(layer) == expected["block"].format(layer)
        assert params[targets.weight_name(layer)] is targets.weight(layer)
        assert (targets.key_size(layer), targets.value_size(layer)) == (256, 64)
        w = targets.linear_weight(layer)
        assert w.shape == (64, 256)
        assert w.data_ptr() == targets.weight(layer).data_ptr()  # a view, not a copy
    assert targets.final_norm is model.get_submodule(expected["final_norm"])
    assert targets.lm_head is model.lm_head
    assert targets.embeddings is model.get_submodule(expected["embeddings"])


@pytest.mark.parametrize("architecture", ARCHS + ["gpt_neox"])
def test_explicit_templates_give_the_same_modules(architecture):
    model, detected = build(architecture)
    e = EXPECTED[architecture]
    templates = ModuleTemplates(
        block=e["block"],
        projection=e["projection"],
        final_norm=e["final_norm"],
        lm_head="lm_head",
        embeddings=e["embeddings"],
    )
    explicit = ModelTargets(model, templates)
    assert explicit.num_layers == detected.num_layers
    for layer in range(detected.num_layers):
        assert explicit.block(layer) is detected.block(layer)
        assert explicit.projection(layer) is detected.projection(layer)
    assert explicit.final_norm is detected.final_norm
    assert explicit.lm_head is detected.lm_head
    assert explicit.embeddings is detected.embeddings


def test_bad_templates_fail_clearly():
    model, _ = build("gpt2")
    with pytest.raises(ValueError, match=r"projection=.*transformer\.h\.\{\}\.mlp\.nope.*layer 0"):
        ModelTargets(model, ModuleTemplates(projection="transformer.h.{}.mlp.nope"))
    with pytest.raises(ValueError, match=r"block=.*layer 0"):
        ModelTargets(model, ModuleTemplates(block="model.layers.{}"))
    with pytest.raises(ValueError, match=r"final_norm=.*transformer\.norm"):
        ModelTargets(model, ModuleTemplates(final_norm="transformer.norm"))
    with pytest.raises(ValueError, match=r"needs a '\{\}'"):
        ModelTargets(model, ModuleTemplates(projection="transformer.h.0.mlp.c_proj"))
    with pytest.raises(TypeError, match="only nn.Linear and transformers Conv1D"):
        ModelTargets(model, ModuleTemplates(projection="transformer.h.{}.mlp"))


def test_layer_indices_are_validated():
    _, targets = build("llama")
    for bad in (4, -1):
        with pytest.raises(IndexError, match=r"out of range.*4 layers"):
            targets.projection(bad)
    with pytest.raises(TypeError):
        targets.block(1.0)


class ToyBlock(nn.Module):
    """A block with no child named `mlp`: detection must find the FFN by structure."""

    def __init__(self, d: int, ffn: int, two_outputs: bool = False) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        if two_outputs:
            self.ffn.append(nn.Linear(ffn, d))

    def forward(self, x):
        return x + self.ffn(self.attn(x))


class ToyLM(nn.Module):
    def __init__(self, two_lists: bool = False, two_outputs: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([ToyBlock(8, 16, two_outputs) for _ in range(2)])
        if two_lists:
            self.other = nn.ModuleList([ToyBlock(8, 16) for _ in range(2)])
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 10)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_detection_is_structural():
    toy = ToyLM()
    targets = ModelTargets(toy)
    assert targets.num_layers == 2
    assert targets.projection_name(1) == "layers.1.ffn.2"
    assert targets.final_norm is toy.norm
    assert targets.lm_head is toy.head and targets.embeddings is toy.embed


def test_ambiguous_detection_fails_clearly():
    with pytest.raises(ValueError, match=r"decoder blocks.*'layers'.*'other'.*`block` template"):
        ModelTargets(ToyLM(two_lists=True))
    with pytest.raises(ValueError, match=r"layers\.0\.ffn\.2.*layers\.0\.ffn\.3.*`projection`"):
        ModelTargets(ToyLM(two_outputs=True))
    # ...and the template resolves the ambiguity
    targets = ModelTargets(ToyLM(two_outputs=True), ModuleTemplates(projection="layers.{}.ffn.3"))
    assert targets.projection_name(0) == "layers.0.ffn.3"


# -----------------------------------------------------------------------------
# keys


def manual_mlp_hidden(architecture: str, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden activation (the key), recomputed from the MLP's own submodules."""
    if architecture == "gpt2":
        return mlp.act(mlp.c_fc(x))
    if architecture == "gptj":
        return mlp.act(mlp.fc_in(x))
    if architecture == "gpt_neox":
        return mlp.act(mlp.dense_h_to_4h(x))
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # gated (Llama, Qwen2)


@pytest.mark.parametrize("architecture", ARCHS + ["gpt_neox"])
def test_keys_are_the_mlp_hidden_activation(architecture):
    model, targets = build(architecture)
    layer = 2
    mlp = targets.block(layer).mlp
    ids = random_ids()
    positions = torch.tensor([0, 5, 7])
    with (
        capture_input(mlp) as mlp_in,
        capture_input(targets.projection(layer), positions) as keys,
        capture_input(targets.projection(layer)) as all_keys,
        torch.no_grad(),
    ):
        model(ids)
    assert mlp_in.value.shape == (3, 8, 64)
    assert keys.value.shape == (3, 256)
    assert not keys.value.requires_grad
    with torch.no_grad():
        manual = manual_mlp_hidden(architecture, mlp, mlp_in.value)  # (b, t, d0)
    torch.testing.assert_close(all_keys.value, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys.value, manual[torch.arange(3), positions], atol=1e-5, rtol=1e-5)


def test_capture_detach_and_last_call_wins():
    _, targets = build("gpt2")
    projection = targets.projection(0)
    first, second = torch.randn(2, 256), torch.randn(2, 256)
    with capture_input(projection, detach=False) as cap_in, capture_output(projection) as cap_out:
        projection(first)
        projection(second)
    assert torch.equal(cap_in.value, second)
    torch.testing.assert_close(cap_out.value, targets.project(0, second))
    assert not cap_out.value.requires_grad
    with capture_output(projection, detach=False) as cap:
        projection(first)
    assert cap.value.requires_grad


def test_positions_are_validated():
    model, targets = build("llama")
    with pytest.raises(ValueError, match=">= 0"):
        with capture_input(targets.projection(0), torch.tensor([-1, 0, 0])):
            pass
    with pytest.raises(ValueError, match="1-D integer"):
        with capture_output(targets.block(0), torch.tensor([[1, 2, 3]])):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with capture_output(targets.block(0), torch.tensor([1, 2, 8])), torch.no_grad():
            model(random_ids())


# -----------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("architecture", ARCHS)
def test_add_delta_changes_the_projection_by_delta_k(architecture):
    model, targets = build(architecture)
    layer = 1
    original = targets.linear_weight(layer).detach().clone()
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(5, 256, generator=g)
    delta = 0.1 * torch.randn(64, 256, generator=g, dtype=torch.float64)  # any float dtype
    ids = random_ids()

    def run():
        with (
            capture_input(targets.projection(layer)) as k,
            capture_output(targets.projection(layer)) as v,
            torch.no_grad(),
        ):
            model(ids)
        return k.value, v.value

    with torch.no_grad():
        before = targets.project(layer, keys)
    k0, v0 = run()
    torch.testing.assert_close(targets.project(layer, k0).detach(), v0)  # project == module

    targets.add_delta(layer, delta)
    raw = targets.weight(layer).detach()
    expected_raw = original + delta.float()  # (d_out, d_in)
    torch.testing.assert_close(raw, expected_raw.T if architecture == "gpt2" else expected_raw)

    with torch.no_grad():
        after = targets.project(layer, keys)
    torch.testing.assert_close(after - before, keys @ delta.float().T, atol=1e-5, rtol=1e-4)

    k1, v1 = run()  # nothing before the edited projection changed: same keys
    torch.testing.assert_close(k1, k0)
    torch.testing.assert_close(v1 - v0, k0 @ delta.float().T, atol=1e-5, rtol=1e-4)

    targets.set_linear_weight(layer, original)
    with torch.no_grad():
        torch.testing.assert_close(targets.project(layer, keys), before)
    assert targets.weight(layer).requires_grad  # still the same trainable parameter
    with pytest.raises(ValueError, match=r"\(d_out, d_in\) = \(64, 256\)"):
        targets.add_delta(layer, delta.T)


# -----------------------------------------------------------------------------
# steering and stopping


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("capture_first", [False, True])
def test_add_to_output_shifts_only_the_chosen_positions(architecture, capture_first):
    model, targets = build(architecture)
    block = targets.block(1)
    ids = random_ids()
    positions = torch.tensor([2, 5, -1])  # the last row gets nothing
    vectors = torch.randn(3, 64, requires_grad=True)

    with capture_output(block) as clean, torch.no_grad():
        base_logits = model(ids).logits

    if capture_first:  # the order of entering must not matter: captures see the edit
        with capture_output(block) as edited, add_to_output(block, vectors, positions):
            logits = model(ids).logits
    else:
        with add_to_output(block, vectors, positions), capture_output(block) as edited:
            logits = model(ids).logits

    diff = edited.value - clean.value  # (b, t, d)
    expected = torch.zeros_like(diff)
    expected[0, 2] = vectors[0].detach()
    expected[1, 5] = vectors[1].detach()
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0, 2:], base_logits[0, 2:])
    torch.testing.assert_close(logits[2], base_logits[2])  # untouched row, same logits

    logits[:, -1].logsumexp(-1).sum().backward()
    assert vectors.grad is not None
    assert vectors.grad[0].abs().sum() > 0 and vectors.grad[1].abs().sum() > 0
    assert torch.equal(vectors.grad[2], torch.zeros(64))


def test_add_to_output_is_seen_by_output_hidden_states():
    """transformers 5 records hidden states with its own forward hooks on the blocks;
    add_to_output runs before them, so `output_hidden_states` shows the edited stream."""
    model, targets = build("llama")
    ids = random_ids()
    positions = torch.tensor([1, 2, 3])
    vectors = torch.randn(3, 64)
    with torch.no_grad():
        clean = model(ids, output_hidden_states=True).hidden_states[2]  # after block 1
        with add_to_output(targets.block(1), vectors, positions):
            edited = model(ids, output_hidden_states=True).hidden_states[2]
    rows = torch.arange(3)
    torch.testing.assert_close(edited[rows, positions], clean[rows, positions] + vectors)


class TupleBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "tuple":
            return (x * 2, "extra")
        return BaseModelOutput(last_hidden_state=x * 2)


@pytest.mark.parametrize("kind", ["tuple", "model_output"])
def test_tuple_and_model_outputs(kind):
    block = TupleBlock(kind)
    x = torch.randn(2, 4, 3)
    vectors = torch.ones(2, 3)
    with add_to_output(block, vectors, torch.tensor([0, 3])), capture_output(block) as cap:
        out = block(x)
    hidden = out[0]
    if kind == "tuple":
        assert isinstance(out, tuple) and out[1] == "extra"
    else:
        assert isinstance(out, BaseModelOutput) and out.last_hidden_state is hidden
    expected = x * 2
    expected[0, 0] += 1
    expected[1, 3] += 1
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(cap.value, expected)


@pytest.mark.parametrize("architecture", ARCHS)
def test_stop_after_stops_the_forward(architecture):
    model, targets = build(architecture)
    ids = random_ids()
    with capture_output(targets.block(2)) as full, torch.no_grad():
        model(ids)

    reached_end = False
    with (
        capture_output(targets.block(0)) as early,
        capture_output(targets.block(3)) as late,
        capture_input(targets.projection(2)) as keys,
        stop_after(targets.block(2)),
        capture_output(targets.block(2)) as at_stop,  # entered after the stop: still filled
        capture_output(targets.final_norm) as norm,
        torch.no_grad(),
    ):
        model(ids)
        reached_end = True
    assert not reached_end
    assert early.value is not None and keys.value is not None
    assert late.value is None and norm.value is None
    torch.testing.assert_close(at_stop.value, full.value)


def test_nested_stops_and_foreign_errors():
    model, targets = build("gpt2")
    with stop_after(targets.block(1)):
        with stop_after(targets.block(2)), capture_output(targets.block(2)) as cap:
            model(random_ids())
    assert cap.value is None  # the outer (earlier) stop fired, and only it was suppressed
    with pytest.raises(RuntimeError, match="boom"), stop_after(targets.block(1)):
        raise RuntimeError("boom")
    with pytest.raises(StopForward):  # a StopForward of another module is not swallowed
        with stop_after(targets.block(1)):
            raise StopForward(targets.block(2))


@pytest.mark.parametrize("architecture", ARCHS)
@pytest.mark.parametrize("raises", [False, True])
def test_hooks_are_removed(architecture, raises):
    model, targets = build(architecture)
    ids = random_ids()
    # transformers 5 installs its own (permanent) recording hooks on the blocks the first
    # time hidden states are requested; ours must come and go without touching them
    with torch.no_grad():
        model(ids, output_hidden_states=True)
    modules = [targets.block(1), targets.block(2), targets.projection(1), targets.block(1).mlp]
    before = [hook_counts(m) for m in modules]
    before_hooks = [dict(m._forward_hooks) for m in modules]
    assert hook_counts(targets.projection(1)) == (0, 0)

    try:
        with (
            capture_input(targets.projection(1), torch.tensor([0, 1, 2])),
            capture_output(targets.block(1)),
            capture_input(targets.block(1).mlp),
            add_to_output(targets.block(1), torch.zeros(3, 64), torch.tensor([0, 1, 2])),
            stop_after(targets.block(2)),
            torch.no_grad(),
        ):
            assert [hook_counts(m) for m in modules] != before
            model(ids)
            if raises:
                raise KeyError("body failed")
    except KeyError:
        assert raises
    assert [hook_counts(m) for m in modules] == before
    assert [dict(m._forward_hooks) for m in modules] == before_hooks
    assert hook_counts(targets.projection(1)) == (0, 0)
    assert hook_counts(targets.block(1).mlp) == (0, 0)


def test_hooks_removed_when_the_forward_raises():
    model, targets = build("qwen2")
    block = targets.block(0)
    with pytest.raises(IndexError):
        with capture_output(block, torch.tensor([0, 0, 99])) as cap, torch.no_grad():
            model(random_ids())
    assert isinstance(cap, Capture) and cap.value is None
    assert hook_counts(block) == (0, 0)
