"""The packaged demo edit set and the demo config."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from lightning_alphaedit.scoring import score_answers
from lightning_alphaedit.targets import ModelTargets
from lightning_alphaedit.paths import default_cache_dir
from lightning_alphaedit.requests import read_requests, validate_requests
from lightning_alphaedit.tiny import byte_level_tokenizer

DEMO = Path(str(resources.files("lightning_alphaedit") / "data" / "demo_edits.jsonl"))
# Read before the test fixtures point the cache at a temporary folder: the user's own cache,
# where a previous demo run left the converted SmolLM2 (this test never fetches it).
USER_MODEL = default_cache_dir() / "models" / "smollm2-135m"


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
