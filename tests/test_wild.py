"""Free-generation ("in the wild") evaluation, the input forms and editing through the chat template.

The figures are checked against a second code path: every prompt answered alone with a plain
``model.generate`` of the full token budget (no batching, no padding, no early stop), then cut
and compared by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_alphaedit.chat import QA_INSTRUCTION, chat_answer_ids, chat_template, chat_text, render
from lightning_alphaedit.evaluation import EvaluationConfig, evaluate
from lightning_alphaedit.prompts import encode_prompts
from lightning_alphaedit.requests import EditRequest, NeighborhoodPrompt
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.tiny import TinyModelConfig, tiny_model_and_tokenizer
from lightning_alphaedit.wild import (
    WildConfig,
    answer_ended,
    contains,
    cut_answer,
    exact_match,
    normalize_answer,
    reference_key,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
"""A ChatML-like template in the tiny byte-level tokenizer's one special token."""


@pytest.mark.parametrize("continuation, answer", [
    (" Wilt Chamberlain. He scored", "Wilt Chamberlain"),
    ("\n\nWilt Chamberlain\nQ: next", "Wilt Chamberlain"),
    (" Robert C. Newton was born", "Robert C. Newton was born"),
    (" 24,303.04 dollars. More", "24,303.04 dollars"),
    (" THALLIUM.", "THALLIUM"),
    (" Paris", "Paris"),
    ("   ", ""),
])
def test_cut_answer_reads_up_to_the_first_newline_or_full_stop(continuation, answer):
    assert cut_answer(continuation) == answer


def test_answer_ended_waits_for_what_follows_a_full_stop():
    assert not answer_ended(" Wilt Chamberlain")
    assert not answer_ended(" 24,303.")  # a decimal point or a full stop: the next token tells
    assert answer_ended(" 24,303. ")
    assert not answer_ended("\n\n")  # leading newlines are skipped, not an empty answer
    assert answer_ended("\n\nOslo\n")
    assert not answer_ended(" Robert C. Newton")


def test_squad_normalisation_exact_match_and_contains():
    assert normalize_answer("The  Old Betsy!") == "old betsy"
    assert normalize_answer("Wilt Chamberlain *") == "wilt chamberlain"
    assert exact_match("the Old Betsy.", "Old Betsy") and not exact_match("Old Betsy rifle", "Old Betsy")
    assert contains("His rifle was Old Betsy, he said", "Old Betsy")
    assert not contains("Old Betsyville", "Old Betsy")  # whole words only
    assert not contains("anything", "...")  # a target of punctuation only never matches
    assert not exact_match("", ")") and not exact_match(".", ")")  # QAEdit's ")" target: not every empty answer


def test_input_forms_and_the_chat_template_error():
    _, tokenizer = tiny_model_and_tokenizer(TinyModelConfig())
    assert render(tokenizer, "question", "who?") == "who?"
    assert render(tokenizer, "qa_instruction", "who?") == QA_INSTRUCTION.format("who?") == (
        "Please answer the question:\n\nQ: who?\nA:")
    with pytest.raises(ValueError, match="has no chat template"):
        render(tokenizer, "chat", "who?")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert render(tokenizer, "chat", "who?") == "<|endoftext|>user\nwho?<|endoftext|>\n<|endoftext|>assistant\n"
    with pytest.raises(ValueError, match="unknown input form"):
        render(tokenizer, "shout", "who?")
    with pytest.raises(ValueError, match="wild.forms"):
        WildConfig(forms=["question", "shout"])


def test_chat_template_keeps_the_subject_and_its_last_token_is_found_exactly():
    _, tokenizer = tiny_model_and_tokenizer(TinyModelConfig())
    tokenizer.chat_template = CHAT_TEMPLATE
    template = chat_template(tokenizer, "Some context. {}")
    assert template == chat_text(tokenizer, "Some context. {}").replace("\x00", "")
    prompt = template.replace("{}", "Who founded {}?")
    batch = encode_prompts(tokenizer, [prompt], ["Acme Corp"])
    text = prompt.replace("{}", "Acme Corp")
    # the byte tokenizer: the special token, then one token per byte up to the subject's last byte
    special = "<|endoftext|>"
    assert text.startswith(special)
    end = text.index("Acme Corp") + len("Acme Corp")
    assert int(batch.subject_last[0]) == 1 + len(text[len(special) : end].encode()) - 1


def test_chat_answer_ids_are_the_answer_without_a_leading_space_and_the_turn_end():
    _, tokenizer = tiny_model_and_tokenizer(TinyModelConfig())
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = chat_answer_ids(tokenizer, " Oslo ")
    assert ids == list("Oslo".encode()) + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def _one_at_a_time(model, tokenizer, prompts, form, tokens=50) -> list[str]:
    """The independent path: each prompt alone, the full budget, no stopping rule, then cut."""
    out = []
    for prompt in prompts:
        ids = tokenizer(render(tokenizer, form, prompt), return_tensors="pt")["input_ids"]
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        out.append(cut_answer(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)))
    return out


def test_wild_figures_equal_an_independent_reference_and_locality_sees_a_changed_model():
    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(initializer_range=0.5))
    tokenizer.chat_template = CHAT_TEMPLATE
    targets = ModelTargets(model)
    forms = ["question", "qa_instruction", "chat"]
    prompts = ["The capital of Norway is", "Oslo lies in", "The river Thames flows through", "Who wrote Hamlet?"]
    own = {form: _one_at_a_time(model, tokenizer, prompts, form) for form in forms}
    # half the requests ask for exactly what the model already answers in the question form
    requests = [
        EditRequest("0", "Norway", "The capital of {} is", own["question"][0] or "x", None,
                    ("Oslo lies in",), (NeighborhoodPrompt("The river Thames flows through", "London"),)),
        EditRequest("1", "Hamlet", "Who wrote {}?", "Marlowe", None, ("The capital of Norway is",),
                    (NeighborhoodPrompt("Oslo lies in", "Norway"), NeighborhoodPrompt("Who wrote Hamlet?", "x"))),
    ]
    config = EvaluationConfig(batch_size=3, generation=False, wild=WildConfig(forms=forms))
    reference: dict[str, str] = {}
    unedited = evaluate(model, tokenizer, targets, requests, config, wild=True, wild_reference=reference,
                        record_wild=True)
    for form in forms:
        answer = dict(zip(prompts, own[form]))
        assert reference[reference_key(form, "Who wrote Hamlet?")] == answer["Who wrote Hamlet?"]
        efficacy = [exact_match(answer[r.text], r.target_new) for r in requests]
        generalization = [exact_match(answer[p], r.target_new) for r in requests for p in r.paraphrase_prompts]
        contained = [contains(answer[r.text], r.target_new) for r in requests]
        assert unedited[f"wild/{form}/efficacy"] == pytest.approx(sum(efficacy) / 2)
        assert unedited[f"wild/{form}/efficacy_contains"] == pytest.approx(sum(contained) / 2)
        assert unedited[f"wild/{form}/generalization"] == pytest.approx(sum(generalization) / 2)
        assert unedited[f"wild/{form}/locality"] == 1.0  # the unedited model is its own reference
    assert unedited["wild/question/efficacy"] == 0.5  # request 0 asks for the model's own answer

    with torch.no_grad():  # a different model: locality is the share of unchanged answers
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    changed = evaluate(model, tokenizer, targets, requests, config, wild=True, wild_reference=reference)
    for form in forms:
        now = dict(zip(prompts, _one_at_a_time(model, tokenizer, prompts, form)))
        neighbours = [n.prompt for r in requests for n in r.neighborhood_prompts]
        kept = [now[p] == reference[reference_key(form, p)] for p in neighbours]
        assert changed[f"wild/{form}/locality"] == pytest.approx(sum(kept) / len(kept))
    assert min(changed[f"wild/{form}/locality"] for form in forms) < 1.0


def test_the_chat_value_step_scores_the_assistant_turn():
    """With δ = 0 (one step only measures), the value step's NLL is the mean over its templates of
    the model's NLL of the answer: a continuation with a leading space after the bare prompt, the
    chat answer ids after the chat rendering. The labels sit exactly on each row's answer."""
    from lightning_alphaedit.prompts import target_token_ids
    from lightning_alphaedit.values import ValueOptimizationConfig, optimize_values

    model, tokenizer = tiny_model_and_tokenizer(TinyModelConfig(initializer_range=0.5))
    model.requires_grad_(False)
    tokenizer.chat_template = CHAT_TEMPLATE
    request = EditRequest("0", "Norway", "The capital of {} is", "Bergen", None)
    templates = ["{}", chat_template(tokenizer, "{}")]
    result = optimize_values(model, tokenizer, ModelTargets(model), [request], 1, templates,
                             ValueOptimizationConfig(num_grad_steps=1), chat=[False, True])

    def nll(template: str, answer: list[int]) -> float:
        prompt = tokenizer(template.replace("{}", request.text))["input_ids"]
        log_probs = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        return float(-torch.stack([log_probs[len(prompt) - 1 + j, a] for j, a in enumerate(answer)]).mean())

    plain = nll("{}", target_token_ids(tokenizer, "Bergen"))
    chat = nll(templates[1], chat_answer_ids(tokenizer, "Bergen"))
    assert float(result.nll[0]) == pytest.approx((plain + chat) / 2, rel=1e-4)
    assert abs(plain - chat) > 1e-3  # the two rows really score different answers


def test_an_edit_run_through_the_chat_template_records_every_wild_figure(tmp_path):
    """The CLI on the tiny model with a chat template: editing through it, WILD in two forms at the
    baseline, after each edit epoch and at the test, in metrics.jsonl, results.json and the table;
    the unedited answers kept in the checkpoint."""
    from lightning_alphaedit.cli import run

    cli = run(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
               "--model.lm.chat_template", CHAT_TEMPLATE, "--model.context.forms", "[chat, question]",
               "--model.evaluation.wild.forms", "[question, chat]", "--model.evaluation.wild.max_new_tokens", "8",
               "--data.limit", "8", "--edit.statistics.cache_dir", str(tmp_path / "stats")])
    module = cli.model
    chat, plain = module.context_templates[:6], module.context_templates[6:]  # five context prefixes and the bare prompt
    assert all(t.startswith("<|endoftext|>user\n") and t.count("{}") == 1 for t in chat)
    assert plain[0] == "{}" and module.chat_templates == [True] * 6 + [False] * 6
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    history = [json.loads(line) for line in next(tmp_path.rglob("metrics.jsonl")).read_text().splitlines()]
    for form in ("question", "chat"):
        for figure in ("efficacy", "efficacy_contains", "generalization", "locality"):
            name = f"wild/{form}/{figure}"
            assert name in results["unedited"] and name in results["edited"], name
            assert all(f"val/{name}" in line for line in history), name  # the baseline line and every epoch
        assert results["unedited"][f"wild/{form}/locality"] == 1.0
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert checkpoint["wild_reference"] == module.wild_reference and len(module.wild_reference) > 0
    assert checkpoint["chat_templates"] == module.chat_templates


def test_a_chat_form_without_a_chat_template_is_refused_before_any_edit(tmp_path):
    from lightning_alphaedit.cli import run

    with pytest.raises(ValueError, match="has no chat template"):
        run(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
             "--model.evaluation.wild.forms", "[chat]", "--edit.statistics.cache_dir", str(tmp_path / "stats")])
    assert not (tmp_path / "stats").exists()  # nothing computed, nothing edited
