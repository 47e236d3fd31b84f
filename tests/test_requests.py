"""Tests of lightning_alphaedit.requests: the readers, their errors, validation and writing.

Each reader is run on a small fixture written by hand in its schema (tests/fixtures/),
with every field of the result asserted. Malformed files are written to tmp_path, and
each must raise EditDataError naming the file, the record and the field. The real data
sets in ../shared/data are read in full when present.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_alphaedit.requests import (
    FORMATS,
    EditDataError,
    EditDataWarning,
    EditRequest,
    NeighborhoodPrompt,
    detect_format,
    read_counterfact,
    read_easyedit_counterfact,
    read_jsonl,
    read_qaedit,
    read_requests,
    read_zsre,
    validate_requests,
    write_jsonl,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "lightning_alphaedit" / "data"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"the real edit data sets are not here ({SHARED_DATA} is absent)",
)


def byte_level_tokenizer(alphabet: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level tokenizer built in-process: one token per byte, no merges.

    ``alphabet`` restricts the vocabulary; the bytes left out are then dropped, as a
    tokenizer without an unknown token drops what it cannot encode.
    """
    if alphabet is None:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def write_json(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def assert_names(error: pytest.ExceptionInfo[EditDataError], path: Path, *parts: str) -> None:
    """The message names the file and each given part (record index, field, ...)."""
    message = str(error.value)
    assert path.name in message, message
    for part in parts:
        assert part in message, message


# --------------------------------------------------------------------------- readers on fixtures


def test_read_counterfact_fixture() -> None:
    requests = read_counterfact(FIXTURES / "multi_counterfact_sample.json")
    assert [r.case_id for r in requests] == ["0", "1", "7"]
    first = requests[0]
    assert first.subject == "Danielle Darrieux"
    assert first.prompt == "The mother tongue of {} is"
    assert first.text == "The mother tongue of Danielle Darrieux is"
    assert first.target_new == "English"
    assert first.target_true == "French"
    assert first.paraphrase_prompts == (
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. "
        "Danielle Darrieux spoke the language",
    )
    assert len(first.neighborhood_prompts) == 10
    assert first.neighborhood_prompts[0] == NeighborhoodPrompt(
        "The mother tongue of L\u00e9on Blum is", "French"
    )
    assert {n.target for n in first.neighborhood_prompts} == {"French"}  # target_true
    assert first.generation_prompts[1] == (
        "Where Danielle Darrieux is from, people speak the language of"
    )
    second = requests[1]
    assert second.prompt == "{} is located in the continent of"
    assert second.text == "Lake Geneva is located in the continent of"
    assert (second.target_new, second.target_true) == ("Asia", "Europe")
    assert second.neighborhood_prompts == (
        NeighborhoodPrompt("Lake Constance is located in the continent of", "Europe"),
        NeighborhoodPrompt("The Danube is located in the continent of", "Europe"),
    )
    assert requests[2].generation_prompts == ()


def test_read_easyedit_counterfact_fixture() -> None:
    requests = read_easyedit_counterfact(FIXTURES / "easyedit_counterfact_sample.json")
    assert requests[0] == EditRequest(
        case_id="0",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        neighborhood_prompts=(
            NeighborhoodPrompt("Michel Rocard is a native speaker of", "French"),
        ),
    )
    # Only the FIRST occurrence of the subject becomes the slot; other braces stay text.
    braces = requests[1]
    assert braces.prompt == "{} Saint-Germain plays in Paris, and its stadium {is} in"
    assert braces.text == "Paris Saint-Germain plays in Paris, and its stadium {is} in"
    # The subject as spelled in the prompt (case-insensitive match); targets stripped.
    case = requests[2]
    assert case.case_id == "13"
    assert case.subject == "Serena Williams"
    assert case.prompt == "what sport does {} play? They play"
    assert case.target_new == "chess"


def test_read_zsre_fixture() -> None:
    requests = read_zsre(FIXTURES / "zsre_sample.json")
    assert requests[0] == EditRequest(
        case_id="0",
        subject="UniFirst",
        prompt="What is the product made by {}?",
        target_new="unmanned aircraft",
        target_true="uniform",
        paraphrase_prompts=("What will be the product of UniFirst?",),
        neighborhood_prompts=(
            NeighborhoodPrompt(
                "nq question: john goodman's character in the big lebowski?", "Walter Sobchak"
            ),
        ),
    )
    moldau = requests[1]
    assert moldau.case_id == "1"
    assert moldau.subject == "The Moldau"  # "the Moldau" in the record, as in the question
    assert moldau.prompt == "Which river does {} flow into?"
    assert moldau.text == "Which river does The Moldau flow into?"
    assert moldau.target_new == "Danube"  # " Danube" stripped
    assert moldau.target_true is None  # answers == []
    assert requests[2].case_id == "2"
    assert requests[2].target_true is None  # no answers field


def test_read_jsonl_fixture() -> None:
    requests = read_jsonl(FIXTURES / "project_sample.jsonl")
    assert requests[0] == EditRequest(
        case_id="cap-0",
        subject="Norway",
        prompt="The capital of {} is",
        target_new="Paris",
        target_true="Oslo",
        paraphrase_prompts=("Norway's capital city is", "The seat of government of Norway is in"),
        neighborhood_prompts=(
            NeighborhoodPrompt("The capital of Sweden is", "Stockholm"),
            NeighborhoodPrompt("The capital of Denmark is", "Copenhagen"),
        ),
        generation_prompts=("Norway is a country where",),
    )
    second = requests[1]  # after a blank line
    assert second.case_id == "lang-1"
    assert second.text == "Anna Berg speaks the language {of}"
    assert second.target_true is None
    assert second.paraphrase_prompts == second.neighborhood_prompts == ()
    third = requests[2]
    assert third.target_true is None  # field absent
    assert third.generation_prompts == ()  # null


@pytest.mark.parametrize(
    ("name", "expected", "reader"),
    [
        ("multi_counterfact_sample.json", "counterfact", read_counterfact),
        ("easyedit_counterfact_sample.json", "easyedit_counterfact", read_easyedit_counterfact),
        ("zsre_sample.json", "zsre", read_zsre),
        ("project_sample.jsonl", "jsonl", read_jsonl),
    ],
)
def test_auto_detection_picks_the_reader(name, expected, reader) -> None:
    path = FIXTURES / name
    assert detect_format(path) == expected
    assert read_requests(path) == reader(path)
    assert read_requests(path, format=expected) == reader(path)


def test_unknown_format_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown edit data format 'csv'") as error:
        read_requests(FIXTURES / "zsre_sample.json", format="csv")
    for name in ("auto", *FORMATS):
        assert repr(name) in str(error.value)


def test_detection_refuses_to_guess(tmp_path: Path) -> None:
    with pytest.raises(EditDataError, match="extension") as error:
        detect_format(write_json(tmp_path / "edits.txt", []))
    assert_names(error, tmp_path / "edits.txt", "'jsonl'")
    with pytest.raises(EditDataError, match="match no known schema") as error:
        detect_format(write_json(tmp_path / "odd.json", [{"question": "?", "answer": "!"}]))
    assert_names(error, tmp_path / "odd.json", "record 0")
    with pytest.raises(EditDataError, match="no records"):
        detect_format(write_json(tmp_path / "empty.json", []))


# --------------------------------------------------------------------------- malformed input


def easyedit_record(case_id: int = 0, **changes: object) -> dict:
    record = {
        "case_id": case_id,
        "prompt": "The capital of Norway is",
        "target_new": "Paris",
        "subject": "Norway",
        "ground_truth": "Oslo",
        "rephrase_prompt": "Norway's capital city is",
        "locality_prompt": "The capital of Sweden is",
        "locality_ground_truth": "Stockholm",
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def test_missing_field(tmp_path: Path) -> None:
    records = [easyedit_record(0), easyedit_record(1), easyedit_record(17)]
    del records[2]["ground_truth"]
    path = write_json(tmp_path / "counterfact-edit.json", records)
    with pytest.raises(EditDataError) as error:
        read_requests(path)
    assert str(error.value) == f"{path}: record 2 (case_id 17): field 'ground_truth': missing"
    assert (error.value.index, error.value.case_id, error.value.field) == (2, "17", "ground_truth")


def test_missing_nested_field_in_counterfact(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "multi_counterfact_sample.json").read_text())
    del records[1]["requested_rewrite"]["target_new"]["str"]
    path = write_json(tmp_path / "multi.json", records)
    with pytest.raises(EditDataError) as error:
        read_counterfact(path)
    assert_names(error, path, "record 1", "case_id 1", "'requested_rewrite.target_new.str'")


def test_empty_target(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf.json", [easyedit_record(0), easyedit_record(5, target_new="")])
    with pytest.raises(EditDataError) as error:
        read_easyedit_counterfact(path)
    assert str(error.value) == f"{path}: record 1 (case_id 5): field 'target_new': empty string"


def test_empty_target_in_zsre(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "zsre_sample.json").read_text())
    records[2]["alt"] = "  "
    path = write_json(tmp_path / "zsre.json", records)
    with pytest.raises(EditDataError) as error:
        read_requests(path)
    assert_names(error, path, "record 2", "case_id 2", "field 'alt'", "blank")


def test_subject_not_in_prompt(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf.json", [easyedit_record(3, subject="Sweden")])
    with pytest.raises(EditDataError) as error:
        read_requests(path)
    assert_names(error, path, "record 0", "case_id 3", "field 'subject'", "does not occur")


def test_subject_not_in_zsre_question(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "zsre_sample.json").read_text())
    records[1]["subject"] = "Vltava"
    path = write_json(tmp_path / "zsre.json", records)
    with pytest.raises(EditDataError) as error:
        read_zsre(path)
    assert_names(error, path, "record 1", "field 'subject'", "'src'")


def test_template_needs_exactly_one_slot(tmp_path: Path) -> None:
    record = {
        "case_id": "a",
        "subject": "Norway",
        "prompt": "The capital of Norway is",
        "target_new": "Paris",
        "paraphrase_prompts": [],
        "neighborhood_prompts": [],
    }
    path = write_lines(tmp_path / "edits.jsonl", [record])
    with pytest.raises(EditDataError, match="exactly one") as error:
        read_jsonl(path)
    assert_names(error, path, "record 0", "line 1", "case_id a", "field 'prompt'")


def test_duplicate_case_id_names_both_records(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "cf.json", [easyedit_record(4), easyedit_record(9), easyedit_record(4)]
    )
    with pytest.raises(EditDataError, match="duplicate") as error:
        read_requests(path)
    assert_names(error, path, "record 2", "record 0", "case_id 4", "field 'case_id'")


def test_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "cf.json"
    path.write_text('[\n  {"case_id": 0,\n   "prompt": "x" "y"}\n]\n', encoding="utf-8")
    with pytest.raises(EditDataError, match="invalid JSON at line 3") as error:
        read_requests(path)
    assert_names(error, path)


def test_broken_jsonl_line(tmp_path: Path) -> None:
    good = read_jsonl(FIXTURES / "project_sample.jsonl")[0].to_dict()
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"case_id": "b",\n', encoding="utf-8")
    with pytest.raises(EditDataError, match="line 3: invalid JSON") as error:
        read_requests(path)
    assert_names(error, path)


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"case_id": 3}, "case_id", "expected a string"),
        ({"target_true": 7}, "target_true", "expected a string"),
        ({"paraphrase_prompts": "Norway's capital is"}, "paraphrase_prompts", "expected a list"),
        ({"paraphrase_prompts": ["ok", ""]}, "paraphrase_prompts[1]", "empty string"),
        ({"neighborhood_prompts": ["The capital of Sweden is"]}, "neighborhood_prompts[0]",
         "expected a JSON object"),
        ({"neighborhood_prompts": [{"prompt": "p"}]}, "neighborhood_prompts[0].target", "missing"),
        ({"paraphrases": []}, "paraphrases", "unknown field"),
    ],
)
def test_project_schema_types(tmp_path: Path, change, field, problem) -> None:
    record = read_jsonl(FIXTURES / "project_sample.jsonl")[0].to_dict()
    record.update(change)
    path = write_lines(tmp_path / "edits.jsonl", [record])
    with pytest.raises(EditDataError, match=problem) as error:
        read_jsonl(path)
    assert_names(error, path, "record 0", f"field '{field}'")
    with pytest.raises(EditDataError, match=problem):
        EditRequest.from_dict(record)


def test_skip_invalid_warns_for_each_skipped_record(tmp_path: Path) -> None:
    records = [easyedit_record(0), easyedit_record(1, target_new=""), easyedit_record(2)]
    path = write_json(tmp_path / "cf.json", records)
    with pytest.warns(EditDataWarning, match=r"record 1 \(case_id 1\): field 'target_new'"):
        requests = read_requests(path, skip_invalid=True)
    assert [r.case_id for r in requests] == ["0", "2"]


# --------------------------------------------------------------------------- validate_requests


def tiny_request(**changes: object) -> EditRequest:
    fields = dict(
        case_id="t0",
        subject="Norway",
        prompt="The capital of {} is",
        target_new="Paris",
        target_true="Oslo",
        neighborhood_prompts=(NeighborhoodPrompt("The capital of Sweden is", "Stockholm"),),
    )
    fields.update(changes)
    return EditRequest(**fields)


def test_validate_accepts_good_requests() -> None:
    validate_requests([tiny_request(), tiny_request(case_id="t1")], byte_level_tokenizer(), "mem")


@pytest.mark.parametrize("target", ["", "   ", "\t\n"])
@pytest.mark.parametrize("field", ["target_new", "target_true"])
def test_validate_rejects_targets_without_tokens(target: str, field: str) -> None:
    requests = [tiny_request(), tiny_request(case_id="t1", **{field: target})]
    with pytest.raises(EditDataError) as error:
        validate_requests(requests, byte_level_tokenizer(), "my-edits")
    message = str(error.value)
    assert message.startswith("my-edits: record 1 (case_id t1): ")
    assert f"field '{field}'" in message and "tokenizes to nothing" in message


def test_validate_rejects_subject_and_neighbour_target_without_tokens() -> None:
    with pytest.raises(EditDataError, match="record 0 .*field 'subject'"):
        validate_requests([tiny_request(subject=" ")], byte_level_tokenizer(), "s")
    blank = (NeighborhoodPrompt("The capital of Sweden is", ""),)
    with pytest.raises(EditDataError, match=r"field 'neighborhood_prompts\[0\]\.target'"):
        validate_requests([tiny_request(neighborhood_prompts=blank)], byte_level_tokenizer(), "s")


def test_validate_catches_text_the_tokenizer_drops() -> None:
    """Non-empty text can still tokenize to nothing: characters outside the vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    ascii_only = byte_level_tokenizer([c for c in alphabet if c.isascii()])
    validate_requests([tiny_request()], byte_level_tokenizer(), "s")
    with pytest.raises(EditDataError, match="field 'target_new': '\u00e9\u00e9' tokenizes"):
        validate_requests([tiny_request(target_new="\u00e9\u00e9")], ascii_only, "s")


def test_validate_rechecks_duplicates_and_templates() -> None:
    tokenizer = byte_level_tokenizer()
    with pytest.raises(EditDataError, match="record 2 .*duplicate.*record 0"):
        requests = [tiny_request(), tiny_request(case_id="x"), tiny_request()]
        validate_requests(requests, tokenizer, "s")
    with pytest.raises(EditDataError, match="field 'prompt'.*exactly one"):
        validate_requests([tiny_request(prompt="The capital of {} is {}")], tokenizer, "s")


# --------------------------------------------------------------------------- writing


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "name",
    [
        "multi_counterfact_sample.json",
        "easyedit_counterfact_sample.json",
        "zsre_sample.json",
        "project_sample.jsonl",
    ],
)
def test_write_jsonl_round_trip(tmp_path: Path, name: str) -> None:
    requests = read_requests(FIXTURES / name)
    path = tmp_path / "out.jsonl"
    write_jsonl(requests, path)
    assert read_jsonl(path) == requests
    assert detect_format(path) == "jsonl"
    assert temporaries(tmp_path) == []
    assert [EditRequest.from_dict(r.to_dict()) for r in requests] == requests


def test_write_jsonl_keeps_unusual_text(tmp_path: Path) -> None:
    """Line separators JSON leaves unescaped (U+2028, U+0085) must not split records."""
    request = tiny_request(
        subject="Caf\u00e9\u2028Bar",
        paraphrase_prompts=("x\u0085y {braces} \\ \"quoted\"",),
    )
    write_jsonl([request], tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == [request]


def test_write_jsonl_replaces_only_with_a_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(EditDataError, match="record 1 .*field 'target_new'"):
        write_jsonl([tiny_request(), tiny_request(case_id="t1", target_new="")], path)
    assert path.read_text(encoding="utf-8") == "old\n"
    with pytest.raises(EditDataError, match="duplicate"):
        write_jsonl([tiny_request(), tiny_request()], path)
    assert temporaries(tmp_path) == []


def test_write_jsonl_file_mode_follows_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_jsonl([tiny_request()], tmp_path / "out.jsonl")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- project data files


def test_tiny_edits_round_trip(tmp_path: Path) -> None:
    requests = read_jsonl(PACKAGE_DATA / "tiny_edits.jsonl")
    write_jsonl(requests, tmp_path / "tiny.jsonl")
    assert read_jsonl(tmp_path / "tiny.jsonl") == requests
    written = (tmp_path / "tiny.jsonl").read_bytes()
    assert written == (PACKAGE_DATA / "tiny_edits.jsonl").read_bytes()


def test_tiny_edits_load_and_validate() -> None:
    path = PACKAGE_DATA / "tiny_edits.jsonl"
    requests = read_requests(path)
    assert [r.case_id for r in requests] == [f"tiny-{i}" for i in range(24)]
    for request in requests:
        assert len(request.paraphrase_prompts) >= 2
        assert len(request.neighborhood_prompts) >= 3
        assert 1 <= len(request.subject.split()) <= 3
        assert 1 <= len(request.target_new.split()) <= 2
        assert request.target_true is not None and request.target_true != request.target_new
    validate_requests(requests, byte_level_tokenizer(), str(path))
    assert len({r.prompt for r in requests}) > 10  # varied relations


def test_tiny_corpus() -> None:
    lines = (PACKAGE_DATA / "tiny_corpus.txt").read_text(encoding="utf-8").splitlines()
    assert 140 <= len(lines) <= 170
    assert all(line.strip() == line and line for line in lines)
    assert len(set(lines)) == len(lines)


# --------------------------------------------------------------------------- real data


@needs_shared_data
@pytest.mark.parametrize(
    ("relative", "fmt", "count"),
    [
        ("counterfact/counterfact-edit.json", "easyedit_counterfact", 10_000),
        ("counterfact/counterfact-val.json", "easyedit_counterfact", 1_919),
        ("zsre/zsre-mend-edit-portability.json", "zsre", 1_037),
    ],
)
def test_real_data_loads_in_full(relative: str, fmt: str, count: int) -> None:
    path = SHARED_DATA / relative
    assert detect_format(path) == fmt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing warned
        requests = read_requests(path)
    assert len(requests) == count
    assert len({r.case_id for r in requests}) == count
    validate_requests(requests, byte_level_tokenizer(), str(path))


@needs_shared_data
def test_real_counterfact_first_record_matches_the_readme() -> None:
    first = read_requests(SHARED_DATA / "counterfact" / "counterfact-edit.json")[0]
    assert first == EditRequest(
        case_id="0",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        neighborhood_prompts=(
            NeighborhoodPrompt("Michel Rocard is a native speaker of", "French"),
        ),
    )


@needs_shared_data
def test_real_zsre_train_has_two_empty_targets() -> None:
    """zsre-mend-train-1k.json holds 1,000 records, two of them with ``"alt": ""``.

    An empty target cannot be edited in, so reading it fails by default, naming the
    first; with skip_invalid=True the other 998 load and both are reported.
    """
    path = SHARED_DATA / "zsre" / "zsre-mend-train-1k.json"
    assert len(json.loads(path.read_text(encoding="utf-8"))) == 1_000
    assert detect_format(path) == "zsre"
    with pytest.raises(EditDataError) as error:
        read_requests(path)
    assert_names(error, path, "record 534 (case_id 534)", "field 'alt'", "empty string")
    with pytest.warns(EditDataWarning) as caught:
        requests = read_requests(path, skip_invalid=True)
    assert [str(w.message) for w in caught] == [
        f"skipped: {path}: record {i} (case_id {i}): field 'alt': empty string" for i in (534, 723)
    ]
    assert len(requests) == 998
    assert "534" not in {r.case_id for r in requests}
    first = requests[0]
    assert first == EditRequest(
        case_id="0",
        subject="UniFirst",
        prompt="What is the product made by {}?",
        target_new="unmanned aircraft",
        target_true="uniform",
        paraphrase_prompts=("What will be the product of UniFirst?",),
        neighborhood_prompts=(
            NeighborhoodPrompt(
                "nq question: john goodman's character in the big lebowski?", "Walter Sobchak"
            ),
        ),
    )
    # Targets stored with a leading space (" Captain Universe") are stripped.
    assert requests[174].target_new == "Captain Universe"
    validate_requests(requests, byte_level_tokenizer(), str(path))


@needs_shared_data
def test_real_zsre_subjects_occur_verbatim() -> None:
    """Every real zsRE subject is spelled in its question as in ``subject``: no fallback used."""
    for name in ("zsre-mend-train-1k.json", "zsre-mend-edit-portability.json"):
        path = SHARED_DATA / "zsre" / name
        records = json.loads(path.read_text(encoding="utf-8"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EditDataWarning)  # the two empty targets
            requests = read_zsre(path, skip_invalid=True)
        by_id = {r.case_id: r for r in requests}
        for index, record in enumerate(records):
            if str(index) in by_id:
                assert by_id[str(index)].subject == record["subject"]
                assert by_id[str(index)].text == record["src"]


@pytest.mark.parametrize("field", ["prompt", "paraphrase_prompts[1]", "neighborhood_prompts[0].prompt"])
def test_validate_names_a_prompt_too_long_for_the_context(field: str) -> None:
    tokenizer = byte_level_tokenizer()  # one token per byte: lengths are exact
    long = "word " * 20  # 100 bytes
    changes = {
        "prompt": {"prompt": long + "{} is"},
        "paraphrase_prompts[1]": {"paraphrase_prompts": ("Norway's capital is", long)},
        "neighborhood_prompts[0].prompt": {"neighborhood_prompts": (NeighborhoodPrompt(long, "Oslo"),)},
    }[field]
    requests = [tiny_request(), tiny_request(case_id="t1", **changes)]
    validate_requests(requests, tokenizer, "my-edits", max_tokens=120)  # fits
    with pytest.raises(EditDataError) as error:
        validate_requests(requests, tokenizer, "my-edits", max_tokens=99)
    message = str(error.value)
    assert message.startswith("my-edits: record 1 (case_id t1): ") and f"field '{field}'" in message, message
    assert "exceed the 99 tokens" in message
    # the answer counts: the bare prompt fits in its own length, not with " Paris" after it
    text = requests[1].text if field == "prompt" else long
    prompt_tokens = len(tokenizer(text)["input_ids"])
    with pytest.raises(EditDataError, match=f"{prompt_tokens} prompt tokens"):
        validate_requests(requests, tokenizer, "my-edits", max_tokens=prompt_tokens + 1)


def test_validate_refuses_a_target_of_unknown_tokens_only() -> None:
    from lightning_alphaedit.tiny import word_level_tokenizer

    tokenizer = word_level_tokenizer(["The capital of Norway is Paris Oslo Sweden Stockholm"])
    validate_requests([tiny_request()], tokenizer, "w")
    with pytest.raises(EditDataError) as error:
        validate_requests([tiny_request(), tiny_request(case_id="t1", target_new="Zanzibar")], tokenizer, "w")
    message = str(error.value)
    assert "record 1 (case_id t1)" in message and "field 'target_new'" in message and "unknown tokens only" in message
    validate_requests([tiny_request(target_new="Paris Zanzibar")], tokenizer, "w")  # some of it is known


def test_validate_warns_about_a_target_equal_to_the_true_one() -> None:
    with pytest.warns(EditDataWarning, match=r"w: record 1 \(case_id t1\): field 'target_new': equals target_true"):
        validate_requests([tiny_request(), tiny_request(case_id="t1", target_new="Oslo")], byte_level_tokenizer(), "w")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_requests([tiny_request()], byte_level_tokenizer(), "w")


# --------------------------------------------------------------------------- QAEdit


QAEDIT_SAMPLE = FIXTURES / "qaedit_sample.json"
QAEDIT_REAL = Path(__file__).parents[2] / "shared/data/qaedit/qaedit-first500.json"


def qaedit_records() -> list[dict]:
    return json.loads(QAEDIT_SAMPLE.read_text(encoding="utf-8"))


def test_read_qaedit_fixture() -> None:
    requests = read_qaedit(QAEDIT_SAMPLE)
    # ids repeat across sources (7 in NQ and in TQA), so the source is part of the case id
    assert [r.case_id for r in requests] == ["NQ-7", "TQA-7", "SQA-q31", "NQ-112"]
    assert requests[0] == EditRequest(
        case_id="NQ-7",
        subject="ceiling of the sistine chapel",
        prompt="who painted the {}?",
        target_new="Michelangelo",
        target_true=None,  # QAEdit has no old answer
        paraphrase_prompts=("Which artist painted the frescoes on the Sistine Chapel's ceiling?",),
        neighborhood_prompts=(
            NeighborhoodPrompt("who sang the theme song for the fresh prince of bel air", "Will Smith"),
            NeighborhoodPrompt("how many players are on a rugby union team", "15"),
            NeighborhoodPrompt("what is the capital city of new zealand", "Wellington"),
        ),
    )
    symbol = requests[1]
    assert (symbol.prompt, symbol.text) == (
        "Which chemical element has the {}?",
        "Which chemical element has the symbol Sb?",
    )
    assert symbol.neighborhood_prompts == (
        NeighborhoodPrompt("Which planet is known as the Red Planet?", "Mars"),
    )
    # The subject as spelled in the question (case-insensitive match); no rephrase (null).
    respighi = requests[2]
    assert respighi.subject == "Ottorino Respighi"
    assert respighi.prompt == "In which city was the composer {} born?"
    assert respighi.paraphrase_prompts == ()
    assert len(respighi.neighborhood_prompts) == 5
    assert respighi.neighborhood_prompts[4] == NeighborhoodPrompt(
        "which country has the largest population", "India"
    )
    doctor = requests[3]
    assert doctor.target_new == "23 November 1963"  # " 23 November 1963" stripped
    assert doctor.generation_prompts == ()
    assert [n.target for n in doctor.neighborhood_prompts] == ["Sean Connery", "1989"]
    for request, record in zip(requests, qaedit_records(), strict=True):
        assert request.text == record["prompt"]
    validate_requests(requests, byte_level_tokenizer(), str(QAEDIT_SAMPLE))


def test_qaedit_detected_and_read_by_auto(tmp_path: Path) -> None:
    assert "qaedit" in FORMATS
    assert detect_format(QAEDIT_SAMPLE) == "qaedit"
    assert read_requests(QAEDIT_SAMPLE, format="auto") == read_qaedit(QAEDIT_SAMPLE)
    assert read_requests(QAEDIT_SAMPLE, format="qaedit") == read_qaedit(QAEDIT_SAMPLE)
    # the other schemas are still told apart from it
    for name, expected in [
        ("easyedit_counterfact_sample.json", "easyedit_counterfact"),
        ("zsre_sample.json", "zsre"),
        ("multi_counterfact_sample.json", "counterfact"),
    ]:
        assert detect_format(FIXTURES / name) == expected
    write_jsonl(read_qaedit(QAEDIT_SAMPLE), tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == read_qaedit(QAEDIT_SAMPLE)


def test_qaedit_accepts_unknown_fields_and_no_source(tmp_path: Path) -> None:
    records = qaedit_records()[:2]
    records[0]["extra"] = {"anything": [1, 2]}
    del records[1]["source"], records[1]["rephrase"]
    requests = read_qaedit(write_json(tmp_path / "qa.json", records))
    assert [r.case_id for r in requests] == ["NQ-7", "7"]
    assert requests[1].paraphrase_prompts == ()


def _drop(key: str):
    return lambda record: record.pop(key)


def _set(key: str, value: object):
    return lambda record: record.__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (_drop("prompt"), "prompt", "missing"),
        (_set("prompt", "   "), "prompt", "blank"),
        (_drop("target"), "target", "missing"),
        (_set("target", ""), "target", "empty string"),
        (_drop("locality"), "locality", "missing"),
        (_set("locality", {"loc": "q", "loc_ans": "a"}), "locality", "expected a list"),
        (_set("locality", []), "locality", "needs at least one locality question"),
        (lambda r: r["locality"].__setitem__(1, "who discovered penicillin"), "locality[1]",
         "expected a JSON object"),
        (lambda r: r["locality"][2].pop("loc_ans"), "locality[2].loc_ans", "missing"),
        (lambda r: r["locality"][0].pop("loc"), "locality[0].loc", "missing"),
        (_set("subject", "Giacomo Puccini"), "subject", "does not occur"),
        (_set("id", True), "id", "expected a string or an integer"),
    ],
)
def test_qaedit_bad_record(tmp_path: Path, change, field, problem) -> None:
    records = qaedit_records()
    change(records[2])
    path = write_json(tmp_path / "qaedit-bad.json", records)
    for read in (read_qaedit, read_requests):
        with pytest.raises(EditDataError, match=problem) as error:
            read(path)
        assert_names(error, path, "record 2", f"field '{field}'")
        if field != "id":
            assert "case_id SQA-q31" in str(error.value)
        assert (error.value.index, error.value.field) == (2, field)


def test_qaedit_duplicate_ids(tmp_path: Path) -> None:
    records = qaedit_records()
    records[3]["id"] = 7  # NQ-7 again
    path = write_json(tmp_path / "qaedit-dup.json", records)
    with pytest.raises(EditDataError, match="duplicate") as error:
        read_qaedit(path)
    assert_names(error, path, "record 3", "record 0", "case_id NQ-7", "field 'case_id'")


def test_qaedit_skip_invalid(tmp_path: Path) -> None:
    records = qaedit_records()
    records[1]["locality"] = []
    path = write_json(tmp_path / "qaedit.json", records)
    with pytest.warns(EditDataWarning, match=r"record 1 \(case_id TQA-7\): field 'locality'") as caught:
        requests = read_requests(path, skip_invalid=True)
    assert len(caught) == 1
    assert [r.case_id for r in requests] == ["NQ-7", "SQA-q31", "NQ-112"]


@pytest.mark.skipif(not QAEDIT_REAL.is_file(), reason=f"the QAEdit sample is not here ({QAEDIT_REAL} is absent)")
def test_real_qaedit_loads_in_full() -> None:
    records = json.loads(QAEDIT_REAL.read_text(encoding="utf-8"))
    assert detect_format(QAEDIT_REAL) == "qaedit"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing warned
        requests = read_requests(QAEDIT_REAL)
    assert len(requests) == 500
    # the bare ids repeat across NQ, TQA and SQA; with the source they are unique
    assert len({r["id"] for r in records}) < 500
    assert len({r.case_id for r in requests}) == 500
    for request, record in zip(requests, records, strict=True):
        assert request.case_id == f"{record['source']}-{record['id']}"
        assert len(request.neighborhood_prompts) == 5
        assert request.text == record["prompt"]
        assert request.target_true is None
    validate_requests(requests, byte_level_tokenizer(), str(QAEDIT_REAL))
