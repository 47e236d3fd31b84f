"""The whole edit loop through the real Lightning Trainer on tiny random models (CPU, no downloads)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_alphaedit.algebra import KeyMoments
from lightning_alphaedit.callbacks import (
    DriftMonitor,
    EditCheckpoint,
    EditHistory,
    ExportEditedModel,
    NullSpaceUpdate,
    find_callback,
)
from lightning_alphaedit.datamodule import EditStreamDataModule
from lightning_alphaedit.evaluation import EvaluationConfig
from lightning_alphaedit.export import DELTAS_FILE, EDITS_FILE
from lightning_alphaedit.models import ModelConfig
from lightning_alphaedit.module import AlphaEditModule
from lightning_alphaedit.requests import EditDataError, read_requests
from lightning_alphaedit.statistics import StatisticsConfig
from lightning_alphaedit.tiny import TinyModelConfig
from lightning_alphaedit.values import ValueOptimizationConfig
from lightning_alphaedit.wild import WildConfig

LAYERS = [1, 2]


def build(tmp_path: Path, method: str = "alphaedit", path: str = "tiny_edits.jsonl", architecture: str = "gpt2",
          values: ValueOptimizationConfig | None = None, l2: float = 10.0, limit: int | None = 16, **edit):
    module = AlphaEditModule(
        lm=ModelConfig(tiny=TinyModelConfig(architecture=architecture, tokenizer="words")),
        values=values or ValueOptimizationConfig(num_grad_steps=25, lr=1.0, clamp_norm_factor=10.0),
        evaluation=EvaluationConfig(wild=WildConfig(max_new_tokens=8)),  # a random model's answers never end
        seed=0,
    )
    data = EditStreamDataModule(path=path, batch_size=4, edits_per_epoch=8, limit=limit)
    update = NullSpaceUpdate(
        layers=LAYERS, method=method, l2=l2, mom2_weight=100.0,
        statistics=StatisticsConfig(corpus="tiny-corpus", sample_count=200, max_length=128,
                                    cache_dir=str(tmp_path / "stats"), progress=False),
        **edit,
    )
    return module, data, update


def monitors(tmp_path: Path, method: str = "alphaedit") -> list[pl.Callback]:
    """The standard callbacks beside the update, as the CLI adds them (the export in ``tmp_path``)."""
    return [DriftMonitor(), EditHistory(), EditCheckpoint(), ExportEditedModel(dir=str(tmp_path / f"export-{method}"))]


def trainer(tmp_path: Path, callbacks, max_epochs: int = -1, checkpoint: bool = False, standard: bool = True):
    """A CPU trainer; with ``standard``, a NullSpaceUpdate among ``callbacks`` gets the standard monitors."""
    update = next((cb for cb in callbacks if isinstance(cb, NullSpaceUpdate)), None)
    if standard and update is not None:
        callbacks = [*callbacks, *monitors(tmp_path, update.method)]
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=checkpoint, default_root_dir=str(tmp_path), callbacks=callbacks,
    )


def answer_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """Mean token log-probability of ' answer' after prompt, one unbatched forward (independent path)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(answer_ids)) / len(answer_ids)


def edited_weights(module: AlphaEditModule) -> dict[int, torch.Tensor]:
    return {layer: module.targets.weight(layer).detach().clone() for layer in LAYERS}


@pytest.fixture(scope="module")
def alphaedit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alphaedit")
    module, data, update = build(tmp)
    trainer(tmp, [update]).fit(module, datamodule=data)
    return tmp, module, data, update


def nll_with_value(model, tokenizer, block, request, value: torch.Tensor | None = None) -> float:
    """Mean NLL of ' target_new' after the rewrite prompt, with ``block``'s output at the subject's
    last token set to ``value`` (a plain forward hook, one unbatched prompt: an independent path)."""
    before_subject = request.prompt[: request.prompt.index("{}")] + request.subject
    last = len(tokenizer(before_subject)["input_ids"]) - 1  # word tokenizer: the subject ends the prefix's tokens
    prompt_ids = tokenizer(request.text)["input_ids"]
    answer_ids = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]

    def put(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, last] = value
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(put) if value is not None else None
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].double(), -1)
    finally:
        if handle is not None:
            handle.remove()
    return -sum(float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(answer_ids)) / len(answer_ids)


def test_the_value_step_lowers_the_new_targets_nll_on_the_tiny_model():
    """What a random tiny model can show of "edits take hold" (on SmolLM2: tests/test_demo.py).

    Its next-token distribution is near uniform (NLL about ln 1446 = 7.3 for any word) and its
    attention hardly carries the subject to the answer position, so no value makes a new
    target likely. It can show the direction: the optimised value z lowers the new target's NLL
    for most requests and on average, and the NLL the step reports is the model's with z in place.
    """
    from lightning_alphaedit.targets import ModelTargets
    from lightning_alphaedit.tiny import tiny_model_and_tokenizer
    from lightning_alphaedit.values import optimize_values

    model, tok = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words"))
    model.requires_grad_(False)
    targets = ModelTargets(model)
    requests = read_requests(Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl")[:16]
    result = optimize_values(model, tok, targets, requests, LAYERS[-1], ["{}"],
                             ValueOptimizationConfig(num_grad_steps=25, lr=1.0, clamp_norm_factor=10.0))
    block = targets.block(LAYERS[-1])
    unedited = torch.tensor([nll_with_value(model, tok, block, r) for r in requests], dtype=torch.float64)
    at_value = torch.tensor([nll_with_value(model, tok, block, r, z) for r, z in zip(requests, result.targets)],
                            dtype=torch.float64)
    torch.testing.assert_close(at_value, result.nll.double(), rtol=0, atol=1e-4)
    assert (at_value < unedited).sum() >= 12, (unedited, at_value)
    assert at_value.mean() < unedited.mean() - 0.01, (unedited.mean(), at_value.mean())


def test_the_edited_model_gives_the_new_targets_a_lower_nll_on_average(alphaedit_run):
    """After the stream, the edit reaches the output in the direction of the new targets (on
    average: a tiny random model carries little of it, see the test above)."""
    _, module, data, update = alphaedit_run
    assert update.edits_applied == 16 and not update.rejected and data.position == 16
    unedited = AlphaEditModule(lm=module.lm_config)
    unedited.configure_model()
    before = [-answer_logprob(unedited.lm, unedited.tokenizer, r.text, r.target_new) for r in data.requests]
    after = [-answer_logprob(module.lm, module.tokenizer, r.text, r.target_new) for r in data.requests]
    assert sum(after) < sum(before), (before, after)
    improved = sum(a < b for a, b in zip(after, before))
    assert improved >= 12, f"only {improved} of 16 new targets became more probable: {before} -> {after}"


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_update_moves_the_block_output_to_the_target_values(method):
    """After one batch, the last edited block outputs at the subjects are near z = h0 + δ."""
    from lightning_alphaedit.corpus import load_corpus
    from lightning_alphaedit.keys import block_outputs, request_keys
    from lightning_alphaedit.statistics import collect_key_moments
    from lightning_alphaedit.targets import ModelTargets
    from lightning_alphaedit.tiny import tiny_model_and_tokenizer
    from lightning_alphaedit.update import SequentialEditor
    from lightning_alphaedit.values import optimize_values

    model, tok = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words", initializer_range=0.1))
    model.requires_grad_(False)
    targets = ModelTargets(model)
    requests = read_requests(Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl")[:4]
    moments = collect_key_moments(model, tok, targets, LAYERS, load_corpus("tiny-corpus").texts, 128)
    editor = SequentialEditor(targets, LAYERS, moments, method=method, l2=1.0, mom2_weight=100.0)
    values = optimize_values(model, tok, targets, requests, LAYERS[-1], ["{}"],
                             ValueOptimizationConfig(num_grad_steps=25, lr=1.0, clamp_norm_factor=10.0))
    before = (values.targets - block_outputs(model, tok, targets, requests, LAYERS[-1])).norm(dim=1)
    outcome = editor.apply_batch(
        values.targets,
        keys_at=lambda layer: request_keys(model, tok, targets, requests, layer, ["{}"]),
        current_values=lambda: block_outputs(model, tok, targets, requests, LAYERS[-1]),
    )
    after = (values.targets - block_outputs(model, tok, targets, requests, LAYERS[-1])).norm(dim=1)
    assert outcome.applied
    assert (after < 0.25 * before).all(), f"residual {before.tolist()} -> {after.tolist()}"


def test_keys_of_several_layers_in_one_pass_equal_one_pass_per_layer():
    """The cache update reads every edited layer's keys in one forward pass: the same keys as one
    pass per layer, context prefixes included."""
    from lightning_alphaedit.keys import request_keys
    from lightning_alphaedit.prompts import encode_prompts
    from lightning_alphaedit.targets import ModelTargets
    from lightning_alphaedit.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words"))
    targets = ModelTargets(model)
    requests = read_requests(Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl")[:3]
    contexts = ["{}", "Yes. {}", "Hello there, said the old man. {}"]
    together = request_keys(model, tok, targets, requests, LAYERS, contexts)
    assert sorted(together) == sorted(LAYERS)
    for layer in LAYERS:
        alone = request_keys(model, tok, targets, requests, layer, contexts)
        assert alone.shape == (3, targets.key_size(layer))
        torch.testing.assert_close(together[layer], alone, rtol=1e-5, atol=1e-6)
    # an independent reading: every prompt alone and whole, a plain pre-hook, the mean formula
    layer = LAYERS[0]
    seen = []
    handle = targets.projection(layer).register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    try:
        with torch.no_grad():
            for r in requests:
                for context in contexts:
                    batch = encode_prompts(tok, [context.replace("{}", r.prompt)], [r.subject])
                    model(input_ids=batch.input_ids)
                    seen[-1] = seen[-1][int(batch.subject_last[0])]
    finally:
        handle.remove()
    k = torch.stack(seen).view(3, len(contexts), -1)  # (u, c, d_in)
    torch.testing.assert_close(together[layer], 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1), rtol=1e-4, atol=1e-5)


def test_a_key_reader_replays_only_the_blocks_below_the_edited_ones():
    """During an update the reader replays the blocks below ``frozen_below``: after a weight of an
    edited layer changes it reads what a fresh pass reads, and its first read is the old model's."""
    from lightning_alphaedit.keys import KeyReader, block_outputs, request_keys
    from lightning_alphaedit.targets import ModelTargets
    from lightning_alphaedit.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(TinyModelConfig(tokenizer="words"))
    targets = ModelTargets(model)
    requests = read_requests(Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl")[:3]
    contexts = ["{}", "Yes. {}", "Hello there, said the old man. {}"]
    reader = KeyReader(model, tok, targets, requests, contexts, frozen_below=2)
    before = reader.keys(3)
    weight = targets.weight(2).detach().clone()
    with torch.no_grad():
        targets.weight(2).add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    try:
        after = reader.keys([1, 3])
        torch.testing.assert_close(after[3], request_keys(model, tok, targets, requests, 3, contexts), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after[1], request_keys(model, tok, targets, requests, 1, contexts), rtol=1e-5, atol=1e-6)
        assert (after[3] - before).norm() > 1e-3 * before.norm()  # the edit reached the key
        torch.testing.assert_close(reader.values(3), block_outputs(model, tok, targets, requests, 3), rtol=1e-5, atol=1e-6)
    finally:
        with torch.no_grad():
            targets.weight(2).copy_(weight)


def preserved_keys(tmp_path: Path, layer: int, threshold: float) -> torch.Tensor:
    """Unit keys in the span of C0's eigenvectors with eigenvalue >= threshold, read from the cache files."""
    from safetensors import safe_open

    for path in (tmp_path / "stats" / "statistics").glob(f"layer{layer}-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            moments = KeyMoments.from_state_dict({"sum": f.get_tensor("sum"), "count": f.get_tensor("count")})
        values, vectors = torch.linalg.eigh(moments.mean().double())
        span = vectors[:, values >= threshold]  # (d_in, k)
        mix = torch.randn(span.shape[1], 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        keys = (span @ mix).T  # (32, d_in)
        return keys / keys.norm(dim=1, keepdim=True)
    raise AssertionError(f"no statistics cached for layer {layer}")


def test_alphaedit_leaves_preserved_keys_alone_and_memit_does_not(alphaedit_run):
    tmp, module, _, update = alphaedit_run
    memit_module, memit_data, memit_update = build(tmp, method="memit")
    trainer(tmp / "memit", [memit_update]).fit(memit_module, datamodule=memit_data)
    assert memit_update.edits_applied == 16
    unedited = AlphaEditModule(lm=module.lm_config)
    unedited.configure_model()
    for layer in LAYERS:
        keys = preserved_keys(tmp, layer, update.nullspace_threshold)  # (32, d_in)
        w0 = unedited.targets.linear_weight(layer).detach().double()  # (d_out, d_in)
        before = (keys @ w0.T).norm()
        alpha = module.targets.linear_weight(layer).detach().double()
        memit = memit_module.targets.linear_weight(layer).detach().double()
        alpha_change = float((keys @ (alpha - w0).T).norm() / before)
        memit_change = float((keys @ (memit - w0).T).norm() / before)
        assert alpha_change < 1e-4, f"layer {layer}: AlphaEdit moved preserved outputs by {alpha_change:.2e}"
        assert memit_change > 1e-3, f"layer {layer}: MEMIT moved preserved outputs only by {memit_change:.2e}"
        assert not torch.equal(alpha, w0), "AlphaEdit edited nothing"


def test_export_loads_with_plain_transformers(alphaedit_run):
    from transformers import AutoModelForCausalLM

    tmp, module, _, update = alphaedit_run
    export = tmp / "export-alphaedit"
    loaded = AutoModelForCausalLM.from_pretrained(export)
    edited = dict(module.lm.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, edited[name]), name
    deltas = load_file(str(export / DELTAS_FILE))
    assert sorted(deltas) == sorted(module.targets.weight_name(l) for l in LAYERS)
    for layer in LAYERS:
        name = module.targets.weight_name(layer)
        torch.testing.assert_close(update.original_weights[layer] + deltas[name], edited[name].detach(), rtol=0, atol=1e-6)
    applied = read_requests(export / EDITS_FILE)
    assert [r.case_id for r in applied] == [f"tiny-{i}" for i in range(16)]
    summary = json.loads((export / "alphaedit_summary.json").read_text())
    assert summary["edits_applied"] == 16 and summary["method"] == "alphaedit"


def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(alphaedit_run, tmp_path):
    _, uninterrupted, _, _ = alphaedit_run
    first, data, update = build(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, [update, ckpt], max_epochs=1, checkpoint=True).fit(first, datamodule=data)
    assert update.edits_applied == 8
    assert first.baseline == uninterrupted.baseline  # measured on the same unedited model
    # the resumed run keeps the checkpoint's baseline (marked here) instead of measuring again
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state["baseline"] = {**state["baseline"], "efficacy": -1.0}
    torch.save(state, tmp_path / "ckpt" / "last.ckpt")
    resumed, data2, update2 = build(tmp_path)
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True, save_top_k=0)
    second = trainer(tmp_path, [update2, ckpt2], checkpoint=True)
    second.fit(resumed, datamodule=data2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    history = find_callback(second, EditHistory).history
    assert update2.edits_applied == 16 and data2.position == 16
    assert resumed.context_templates == uninterrupted.context_templates
    assert resumed.baseline["efficacy"] == -1.0
    # the history goes on from the checkpoint's, and ends where the uninterrupted run's does
    uninterrupted_tmp = alphaedit_run[0]
    assert [h["edits"] for h in history] == [0, 8, 16]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    last = json.loads((uninterrupted_tmp / "metrics.jsonl").read_text().splitlines()[-1])
    for name, value in last.items():
        if not name.startswith("time/"):  # wall-clock seconds: never equal
            assert history[-1][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # the edit time goes on from the checkpoint's too: it only grows
    assert 0 < history[1]["time/edit_seconds"] < history[2]["time/edit_seconds"]
    reference = dict(uninterrupted.lm.named_parameters())
    for name, param in resumed.lm.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=1e-6, msg=name)


def test_malformed_record_fails_before_any_weight_changes(tmp_path):
    source = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"
    lines = source.read_text().splitlines()
    record = json.loads(lines[3])
    del record["target_new"]
    lines[3] = json.dumps(record)
    bad = tmp_path / "bad_edits.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    module, data, update = build(tmp_path, path=str(bad))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.lm.named_parameters()}
    with pytest.raises(EditDataError) as error:
        trainer(tmp_path, [update]).fit(module, datamodule=data)
    message = str(error.value)
    assert "bad_edits.jsonl" in message and "record 3" in message and "target_new" in message
    for name, param in module.lm.named_parameters():
        assert torch.equal(param, before[name])
    assert update.edits_applied == 0


def test_non_finite_update_is_rolled_back(tmp_path):
    # lr = inf makes δ (hence the target values and every layer's update) non-finite; the config
    # refuses it, so it is set after the check: the editor's own guard is what is tested here
    values = ValueOptimizationConfig(num_grad_steps=3)
    values.lr = float("inf")
    module, data, update = build(tmp_path, values=values, limit=8)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.lm.named_parameters()}
    pl_trainer = trainer(tmp_path, [update])
    pl_trainer.fit(module, datamodule=data)
    assert update.edits_applied == 0 and len(update.rejected) == 2
    assert "not finite" in update.rejected[0]["reason"]
    for name, param in module.lm.named_parameters():
        assert torch.equal(param, before[name]), name
    # an unchanged model: the test stage (Lightning's loop) gives exactly the baseline that the
    # callback measured before the first batch, seeded fluency samples included
    pl_trainer.test(module, datamodule=data, verbose=False)
    assert module.test_results == module.baseline and "fluency" in module.baseline
    drift = json.loads((tmp_path / "results.json").read_text())["edited"]
    assert drift["drift/kl"] == 0.0 and drift["drift/hidden_shift"] == 0.0


def test_module_refuses_to_run_without_the_callback(tmp_path):
    module, data, _ = build(tmp_path)
    with pytest.raises(RuntimeError, match="NullSpaceUpdate"):
        trainer(tmp_path, []).fit(module, datamodule=data)


def test_validation_after_every_edit_epoch_covers_all_edits_so_far(tmp_path):
    """Epoch e validates the requests edited in epochs 0..e, the first epoch included."""
    seen: dict[int, int] = {}

    class CountValidated(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen[trainer.current_epoch] = seen.get(trainer.current_epoch, 0) + len(batch)

    module, data, update = build(tmp_path, values=ValueOptimizationConfig(num_grad_steps=2))
    trainer(tmp_path, [CountValidated(), update]).fit(module, datamodule=data)
    assert seen == {0: 8, 1: 16}


def test_bf16_true_precision_edits_a_bfloat16_model(tmp_path):
    """precision="bf16-true" loads the model in bfloat16 and edits it; Lightning's input cast
    used to refuse the batch (frozen request dataclasses inside a list)."""
    module, data, update = build(tmp_path, limit=8)
    run = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, reload_dataloaders_every_n_epochs=1, precision="bf16-true",
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[update, *monitors(tmp_path)],
    )
    run.fit(module, datamodule=data)
    weights = edited_weights(module)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert update.edits_applied == 8 and not update.rejected
    # the bookkeeping stays in float32 whatever the weights' dtype
    assert all(c.dtype == torch.float32 for c in update.editor.caches.values())
    exported = load_file(str(tmp_path / "export-alphaedit" / DELTAS_FILE))
    assert exported and all(torch.isfinite(d.float()).all() and d.abs().max() > 0 for d in exported.values())


def test_a_finite_but_absurd_update_is_rejected_and_rolled_back(tmp_path):
    # λ = 1e-30 leaves the AlphaEdit solve nearly singular: finite updates many times ||W||
    module, data, update = build(tmp_path, l2=1e-30, limit=8, max_update_ratio=None)
    trainer(tmp_path, [update]).fit(module, datamodule=data)
    assert update.edits_applied == 8  # without a bound it is applied, and it is absurd
    weights = {layer: update.original_weights[layer].float().norm() for layer in LAYERS}
    ratios = {layer: float(d.norm() / weights[int(layer)]) for layer, d in
              zip(LAYERS, update.deltas(module).values())}
    assert max(ratios.values()) > 10, ratios

    module, data, update = build(tmp_path, l2=1e-30, limit=8)  # the default bound: 10 x ||W||
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.lm.named_parameters()}
    trainer(tmp_path, [update]).fit(module, datamodule=data)
    assert update.edits_applied == 0 and len(update.rejected) == 2
    assert "exceeds 10 x the weight's norm" in update.rejected[0]["reason"], update.rejected
    for name, param in module.lm.named_parameters():
        assert torch.equal(param, before[name]), name
    with pytest.raises(ValueError, match="max_update_ratio"):
        build(tmp_path, max_update_ratio=0.0)


@pytest.mark.parametrize("lr", [1e30, 1.0])
def test_a_batch_that_changes_nothing_is_reported(tmp_path, caplog, lr):
    # lr 1e30: δ overflows and the norm clamp brings it back to 0, so z* = z0 and the update is ~0
    module, data, update = build(tmp_path, values=ValueOptimizationConfig(num_grad_steps=3, lr=lr), limit=8)
    pl_trainer = trainer(tmp_path, [update])
    with caplog.at_level(logging.WARNING, logger="lightning_alphaedit"):
        pl_trainer.fit(module, datamodule=data)
    unchanged = [r for r in caplog.records if "changed nothing" in r.getMessage()]
    ratio = max(float(d.norm() / update.original_weights[layer].float().norm())
                for layer, d in zip(LAYERS, update.deltas(module).values()))
    if lr == 1e30:
        assert len(unchanged) == 2 and "z* equal to z0" in unchanged[0].getMessage()
        assert ratio < 1e-6
        assert float(pl_trainer.callback_metrics["edit/targets_reached"]) == 0.0
    else:
        assert unchanged == [] and ratio > 1e-3


def test_a_prompt_longer_than_the_context_is_refused_before_any_edit(tmp_path):
    source = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"
    lines = source.read_text().splitlines()
    record = json.loads(lines[5])
    record["paraphrase_prompts"][0] = "The " * 25_000 + record["paraphrase_prompts"][0]  # 100k characters
    lines[5] = json.dumps(record)
    long = tmp_path / "long_edits.jsonl"
    long.write_text("\n".join(lines) + "\n")
    module, data, update = build(tmp_path, path=str(long), baseline=False)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.lm.named_parameters()}
    with pytest.raises(EditDataError) as error:
        trainer(tmp_path, [update]).fit(module, datamodule=data)
    message = str(error.value)
    assert "long_edits.jsonl: record 5" in message and "field 'paraphrase_prompts[0]'" in message, message
    assert f"exceed the {256 - module.context.length} tokens" in message  # 256 positions less the context prefix
    for name, param in module.lm.named_parameters():
        assert torch.equal(param, before[name])
    assert update.edits_applied == 0 and not (tmp_path / "stats").exists()  # before the statistics too


def test_resume_with_other_edit_settings_is_refused_before_any_statistics(tmp_path):
    first, data, update = build(tmp_path)
    trainer(tmp_path, [update], max_epochs=1).fit(first, datamodule=data)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert update.edits_applied == 8 and ckpt.exists()

    # other layers: refused at fit start, the setting named with both values, no statistics collected
    module, data, _ = build(tmp_path)
    stats = tmp_path / "other-stats"
    other_layers = NullSpaceUpdate(
        layers=[1, 3], mom2_weight=100.0,
        statistics=StatisticsConfig(corpus="tiny-corpus", sample_count=200, max_length=128,
                                    cache_dir=str(stats), progress=False),
    )
    with pytest.raises(ValueError, match=r"edit\.layers: \[1, 2\] in the checkpoint, \[1, 3\] in this run"):
        trainer(tmp_path / "b", [other_layers]).fit(module, datamodule=data, ckpt_path=str(ckpt))
    assert not stats.exists()

    # another value step
    module, data, update = build(tmp_path, values=ValueOptimizationConfig(num_grad_steps=25, lr=0.5, clamp_norm_factor=10.0))
    with pytest.raises(ValueError, match=r"model\.values\.lr: 1\.0 in the checkpoint, 0\.5 in this run"):
        trainer(tmp_path / "c", [update]).fit(module, datamodule=data, ckpt_path=str(ckpt))

    # the same case ids, other content: the data file changed since the checkpoint
    source = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data" / "tiny_edits.jsonl"
    lines = source.read_text().splitlines()
    record = json.loads(lines[2])
    record["target_new"] = "Oslo" if record["target_new"] != "Oslo" else "Paris"
    lines[2] = json.dumps(record)
    changed = tmp_path / "tiny_edits.jsonl"
    changed.write_text("\n".join(lines) + "\n")
    module, data, update = build(tmp_path, path=str(changed))
    with pytest.raises(ValueError, match="same case ids but other content"):
        trainer(tmp_path / "d", [update]).fit(module, datamodule=data, ckpt_path=str(ckpt))
    assert update.edits_applied == 0
