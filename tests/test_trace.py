"""Causal tracing against a second path: noise added to inputs_embeds, a hand-written patch hook."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_alphaedit.prompts import encode_prompts, target_token_ids
from lightning_alphaedit.requests import EditRequest
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
from lightning_alphaedit.trace import (
    POSITIONS,
    TraceConfig,
    causal_trace,
    noise_std,
    save_trace,
)

REQUESTS = [
    EditRequest(case_id="a", subject="Norway", prompt="The capital of {} is", target_new="Paris", target_true="Oslo"),
    EditRequest(case_id="b", subject="Japan", prompt="The capital city of {} is", target_new="Lima", target_true="Tokyo"),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(architecture=request.param, num_layers=3))
    return model, tokenizer, ModelTargets(model)


def reference_probability(model, targets, request, tokenizer, noise, layer=None, position=None, clean_value=None):
    """p(true answer's first token) with noise on the token embeddings (via inputs_embeds) and,
    optionally, the MLP projection output of ``layer`` at ``position`` set to ``clean_value``."""
    batch = encode_prompts(tokenizer, [request.prompt], [request.subject])
    ids = batch.input_ids[:, : int(batch.lengths[0])].expand(noise.shape[0], -1)
    embeds = targets.embeddings(ids) + noise
    handle = None
    if layer is not None:
        def patch(module, args, output):
            output = output.clone()
            output[:, position] = clean_value
            return output

        handle = targets.projection(layer).register_forward_hook(patch)
    try:
        logits = model(inputs_embeds=embeds).logits[:, -1]
    finally:
        if handle is not None:
            handle.remove()
    return torch.softmax(logits, -1)[:, target_token_ids(tokenizer, request.target_true)[0]].mean()


@torch.no_grad()
def test_trace_matches_a_hand_written_second_path(tiny):
    model, tokenizer, targets = tiny
    config = TraceConfig(samples=3, noise_scale=3.0, seed=7)
    result = causal_trace(model, tokenizer, targets, REQUESTS, config)
    assert result.restored.shape == (2, len(POSITIONS), targets.num_layers)

    generator = torch.Generator().manual_seed(7)
    std = 3.0 * noise_std(model, tokenizer, targets, REQUESTS)
    for index, request in enumerate(REQUESTS):
        batch = encode_prompts(tokenizer, [request.prompt], [request.subject])
        length = int(batch.lengths[0])
        first, last = int(batch.subject_first[0]), int(batch.subject_last[0])
        d = targets.embeddings.weight.shape[1]
        noise = torch.zeros(3, length, d)
        noise[:, first : last + 1] = torch.randn(3, last + 1 - first, d, generator=generator) * std
        clean = reference_probability(model, targets, request, tokenizer, torch.zeros(1, length, d))
        torch.testing.assert_close(result.clean[index], clean)
        torch.testing.assert_close(result.corrupted[index], reference_probability(model, targets, request, tokenizer, noise))
        # the clean MLP output at each layer, recorded by a plain hook
        outputs = []
        hooks = [targets.projection(layer).register_forward_hook(lambda m, a, o, into=outputs: into.append(o[0].clone()))
                 for layer in range(targets.num_layers)]
        model(input_ids=batch.input_ids[:, :length])
        for h in hooks:
            h.remove()
        for p, position in enumerate((last, length - 1)):
            for layer in range(targets.num_layers):
                expected = reference_probability(model, targets, request, tokenizer, noise, layer, position,
                                                 outputs[layer][position])
                torch.testing.assert_close(result.restored[index, p, layer], expected, rtol=1e-4, atol=1e-7)


@torch.no_grad()
def test_no_noise_means_nothing_to_restore(tiny):
    model, tokenizer, targets = tiny
    result = causal_trace(model, tokenizer, targets, REQUESTS, TraceConfig(samples=2, noise_scale=0.0))
    torch.testing.assert_close(result.corrupted, result.clean)
    torch.testing.assert_close(result.restored, result.clean[:, None, None].expand_as(result.restored))


def test_recommended_layers_and_files(tiny, tmp_path):
    model, tokenizer, targets = tiny
    result = causal_trace(model, tokenizer, targets, REQUESTS, TraceConfig(samples=2))
    # a constructed effect: largest at layer 0 (excluded by default), then at layer 2
    result.restored = result.corrupted[:, None, None] + torch.tensor([[0.9, 0.3, 0.5], [0.9, 0.0, 0.0]])
    assert result.recommended_layers(1) == [0]
    assert result.recommended_layers(1, exclude_first=1) == [2]
    assert result.recommended_layers(2, exclude_first=1) == [1, 2]  # centred, kept inside the model
    assert result.recommended_layers(3, exclude_first=1) == [0, 1, 2]
    assert result.recommended_layers(1, window=3, exclude_first=1) == [2]  # layer 1's window holds layer 0
    with pytest.raises(ValueError, match="no layer left"):
        result.recommended_layers(1, window=5, exclude_first=1)
    json_path, png_path = save_trace(result, TraceConfig(span=1), tmp_path, "tiny")
    data = json.loads(json_path.read_text())
    assert data["recommended_layers"] == [2] and data["positions"] == list(POSITIONS)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
