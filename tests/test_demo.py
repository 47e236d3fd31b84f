"""The packaged demo edit set and the demo config."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from lightning_alphaedit.scoring import score_answers, starts_with_answer
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.paths import default_cache_dir
from lightning_alphaedit.requests import read_requests, validate_requests
from lightning_alphaedit.tiny import byte_level_tokenizer

DEMO = Path(str(resources.files("lightning_alphaedit") / "data" / "demo_edits.jsonl"))
# Read before the test fixtures point the cache at a temporary folder: the user's own cache,
# where a previous demo run left the converted SmolLM2 (this test never fetches it).
USER_CACHE = default_cache_dir()
USER_MODEL = USER_CACHE / "models" / "smollm2-135m"
USER_CORPUS = USER_CACHE / "corpora" / "wikipedia-vital-en.json"


def test_demo_set_is_complete_and_valid():
    requests = read_requests(DEMO)
    assert 95 <= len(requests) <= 110
    assert len({r.case_id for r in requests}) == len(requests)
    assert len({r.subject for r in requests}) == len(requests)
    validate_requests(requests, byte_level_tokenizer(), str(DEMO))
    for r in requests:
        assert r.target_true and r.target_true != r.target_new, r.case_id
        assert len(r.paraphrase_prompts) >= 2, r.case_id
        assert all(r.subject in p for p in r.paraphrase_prompts), r.case_id
        assert len(r.neighborhood_prompts) >= 3, r.case_id
        # a neighbour must not be about a subject the set edits (the edit would be expected there)
        others = [re.compile(rf"\b{re.escape(o.subject)}\b") for o in requests if o.subject != r.subject]
        assert not any(o.search(n.prompt) for n in r.neighborhood_prompts for o in others), r.case_id


@pytest.mark.skipif(not (USER_MODEL / "config.json").is_file(), reason=f"SmolLM2 is not cached at {USER_MODEL}")
def test_the_unedited_model_knows_the_demo_facts():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(USER_MODEL)
    model = AutoModelForCausalLM.from_pretrained(USER_MODEL, dtype=torch.float32).eval()
    requests = read_requests(DEMO)
    prompts = [r.text for r in requests]
    targets = ModelTargets(model)
    true = score_answers(model, tokenizer, targets, prompts, [r.target_true for r in requests]).nll
    new = score_answers(model, tokenizer, targets, prompts, [r.target_new for r in requests]).nll
    assert (true < new).float().mean() >= 0.9


REAL_MODEL_REQUIRED = os.environ.get("LIGHTNING_ALPHAEDIT_REAL_MODEL") == "1"
"""Set by CI, which fetches SmolLM2 and the corpus first: the real-model test must run, not skip."""


def test_the_real_model_test_runs_where_it_is_required():
    if REAL_MODEL_REQUIRED:
        assert (USER_MODEL / "config.json").is_file() and USER_CORPUS.is_file(), (
            f"LIGHTNING_ALPHAEDIT_REAL_MODEL=1 but SmolLM2 or its corpus is not cached under {USER_CACHE}")


@pytest.mark.skipif(not ((USER_MODEL / "config.json").is_file() and USER_CORPUS.is_file()),
                    reason=f"SmolLM2 or its statistics corpus is not cached under {USER_CACHE} (a demo run fetches both)")
def test_the_demo_edits_take_hold_on_smollm2(monkeypatch):
    """The demo's settings on its first 20 requests, one batch: the new targets win and are what
    the edited model says, where the unedited model said the true ones, teacher-forced and asked
    freely (WILD: the whole greedy answer, bare and through the chat template)."""
    from lightning_alphaedit.api import edit

    monkeypatch.setenv("LIGHTNING_ALPHAEDIT_CACHE", str(USER_CACHE))  # the cached model, corpus, statistics
    result = edit("smollm2-135m", limit=20, edits_per_epoch=20, **{
        "data.batch_size": 20, "model.evaluation.generation": False, "drift.texts": 0, "trainer.logger": False,
        # free answers at the baseline and the test only; chat answers cut at 24 tokens (the figures
        # asserted are the question form's, which end within a few tokens)
        "model.evaluation.wild.every_epoch": False, "model.evaluation.wild.max_new_tokens": 24,
    })
    unedited, edited = result.scores["unedited"], result.scores["edited"]
    assert unedited["efficacy"] <= 0.1 and edited["efficacy"] >= 0.9, (unedited, edited)
    assert edited["generalization"] > unedited["generalization"] + 0.3, (unedited, edited)
    assert unedited["wild/question/efficacy_contains"] <= 0.1, unedited
    assert edited["wild/question/efficacy_contains"] >= 0.8, edited
    assert edited["wild/question/locality"] >= 0.3, edited  # 56.4 % measured: free answers are fragile
    assert {"wild/chat/efficacy_contains", "wild/chat/locality"} <= set(edited)
    answers = result.ask(max_new_tokens=6)
    print(answers)
    assert sum(bool(a.takes_hold) for a in answers) >= 16, answers
    assert sum(starts_with_answer(a.unedited, a.target) for a in answers) <= 2, answers
