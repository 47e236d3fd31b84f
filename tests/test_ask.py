"""`lightning-alphaedit ask`: both models' greedy answers, checked against models loaded on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_alphaedit.ask import Answer, format_answers, load_edited, unedited_weights
from lightning_alphaedit.callbacks import ExportEditedModel, find_callback
from lightning_alphaedit.cli import run
from lightning_alphaedit.export import SUMMARY_FILE
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny CLI run (4 edits), its run folder."""
    runs = tmp_path_factory.mktemp("ask-runs")
    with pytest.MonkeyPatch.context() as patch:  # conftest's environment, for a fixture made before it applies
        for name, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": runs,
                            "LIGHTNING_ALPHAEDIT_RUNS": runs,
                            "LIGHTNING_ALPHAEDIT_CACHE": tmp_path_factory.getbasetemp() / "cache"}.items():
            patch.setenv(name, str(value))
        cli = run(["fit", "--config", str(TINY), "--data.limit", "4", "--data.edits_per_epoch", "4",
                   "--model.evaluation.generation", "false", "--drift.texts", "0",
                   "--trainer.enable_progress_bar", "false"])
    return Path(find_callback(cli.trainer, ExportEditedModel).exported_to).parent


def greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    """One unpadded prompt, plain transformers greedy decoding (not the batched path ask uses)."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_ask_a_run_answers_its_edit_requests_with_both_models(tiny_run, capsys):
    answers = run(["ask", str(tiny_run), "--limit", "3", "--paraphrases", "--tokens", "5"])
    out = capsys.readouterr().out
    summary = json.loads((tiny_run / "edited_model" / SUMMARY_FILE).read_text())
    # the exported model names its base model: here the tiny model of the config, rebuilt from the record
    assert summary["base_model"]["name_or_path"] is None
    assert summary["base_model"]["tiny"] == {**vars(TinyModelConfig()), **yaml.safe_load(TINY.read_text())["model"]["lm"]["tiny"]}
    base, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(**summary["base_model"]["tiny"]))
    edited = AutoModelForCausalLM.from_pretrained(tiny_run / "edited_model").eval()
    edited_tokenizer = AutoTokenizer.from_pretrained(tiny_run / "edited_model")
    assert len(answers) == 9  # 3 requests: the rewrite prompt and 2 paraphrases each
    assert [a.target for a in answers[:3]] == ["Paris"] * 3
    for answer in answers:
        assert answer.unedited == greedy(base.eval(), tokenizer, answer.prompt, 5), answer.prompt
        assert answer.edited == greedy(edited, edited_tokenizer, answer.prompt, 5), answer.prompt
        assert answer.prompt in out
    assert "answer begins with the new target: edited" in out and "unedited:" in out


def test_ask_given_prompts_and_the_model_folder(tiny_run, capsys):
    answers = run(["ask", str(tiny_run / "edited_model"), "The capital of Norway is", "Oslo is a"])
    assert [a.prompt for a in answers] == ["The capital of Norway is", "Oslo is a"]
    assert all(a.target is None for a in answers)
    assert "new target" not in capsys.readouterr().out.split("\n\n", 1)[1]


def test_unedited_weights_are_the_base_and_the_edit_comes_back_exactly(tiny_run):
    model, _, deltas, requests, summary = load_edited(tiny_run)
    assert [r.case_id for r in requests] == ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]
    base, _ = tiny_model_and_tokenizer(TinyModelConfig(**summary["base_model"]["tiny"]))
    base_params = dict(base.named_parameters())
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    with unedited_weights(model, deltas):
        for name, param in model.named_parameters():
            torch.testing.assert_close(param, base_params[name], rtol=0, atol=1e-6, msg=name)
    for name, param in model.named_parameters():
        assert torch.equal(param, edited[name]), name
    assert any(not torch.equal(edited[n], base_params[n]) for n in deltas)  # there was an edit to take off


def test_a_folder_without_an_edited_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        run(["ask", str(tmp_path)])


def test_the_new_target_is_marked():
    text = format_answers([Answer("The capital of Norway is", " Oslo, the", " Paris, the", "Paris"),
                           Answer("Norway's capital city is", " Oslo", " Oslo", "Paris")])
    lines = text.splitlines()
    assert lines[2] == "    edited:   »Paris«, the   <- new target"
    assert lines[1] == "    unedited: Oslo, the"
    assert lines[-1] == "answer begins with the new target: edited 1 of 2, unedited 0 of 2"


def test_ask_through_the_chat_template_reads_whole_answers_of_both_models():
    """``chat=True``: each prompt is the chat template's user turn and both answers are read to
    their end, as the WILD evaluation reads them; the edited side differs by the deltas only."""
    from lightning_alphaedit.ask import ask
    from lightning_alphaedit.wild import answers

    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(initializer_range=0.5))
    tokenizer.chat_template = (
        "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
    name = "transformer.h.1.mlp.c_proj.weight"
    delta = {name: 0.5 * torch.randn(dict(model.named_parameters())[name].shape, generator=torch.Generator().manual_seed(0))}
    prompts = ["The capital of Norway is", "Who wrote Hamlet?"]
    edited_expected = answers(model, tokenizer, prompts, "chat", 50, 16)
    with unedited_weights(model, delta):
        unedited_expected = answers(model, tokenizer, prompts, "chat", 50, 16)
    said = ask(model, tokenizer, delta, [(prompts[0], edited_expected[0] or "x"), prompts[1]], chat=True)
    assert [a.edited for a in said] == edited_expected and [a.unedited for a in said] == unedited_expected
    assert said[0].chat and said[0].takes_hold is bool(edited_expected[0]) and said[1].takes_hold is None
    assert "answer contains the new target" in format_answers(said)
