"""Edit requests: the facts to rewrite, and readers for the data sets that hold them.

An :class:`EditRequest` is one counterfactual edit ("The mother tongue of {} is" +
"Danielle Darrieux": "French" -> "English") together with the prompts used to judge it:
paraphrases (the edit should generalise to them), neighbourhood prompts (their answers
must NOT change) and generation prompts (for fluency checks).

Edit data comes in several schemas, so there is one reader per schema, all returning
``list[EditRequest]`` in file order:

* :func:`read_counterfact` - the original CounterFact ``multi_counterfact.json``
  (ROME / AlphaEdit), with ``requested_rewrite`` and a ``{}`` prompt template;
* :func:`read_easyedit_counterfact` - EasyEdit's simplified CounterFact, with the
  subject written into ``prompt``;
* :func:`read_zsre` - the zsRE question answering edits as prepared for MEND;
* :func:`read_qaedit` - QAEdit (the WILD benchmark): real questions with new answers
  and locality questions, but no old answer;
* :func:`read_jsonl` - this project's own schema, one JSON object per line
  (:meth:`EditRequest.to_dict`), also written by :func:`write_jsonl`.

:func:`read_requests` picks the reader from the file (:func:`detect_format`).

Bad data is reported, never dropped: an edit run over thousands of requests must not
quietly lose some of them, nor fail an hour in on a malformed record. Every reader
therefore checks the whole file before returning and raises :class:`EditDataError`
naming the file, the record and the field. A caller who really wants to go on without
the bad records says so (``skip_invalid=True``) and gets one :class:`EditDataWarning`
per skipped record. Checks that need the model's tokenizer (a target that tokenizes to
nothing) live in :func:`validate_requests`.

Normalisation, the same in every reader: surrounding whitespace is stripped from every
text field. The editing code itself puts the single space between a prompt and its
target (``" " + target``, as ROME and AlphaEdit do), so a target stored as
``" Captain Universe"`` (zsRE has a few) would otherwise be edited in with two spaces.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: reading data must not need transformers
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "FORMATS",
    "EditDataError",
    "EditDataWarning",
    "EditRequest",
    "NeighborhoodPrompt",
    "detect_format",
    "read_counterfact",
    "read_easyedit_counterfact",
    "read_jsonl",
    "read_qaedit",
    "read_requests",
    "read_zsre",
    "validate_requests",
    "write_jsonl",
]

FORMATS: tuple[str, ...] = ("counterfact", "easyedit_counterfact", "zsre", "qaedit", "jsonl")
"""The schema names accepted by :func:`read_requests` (besides ``"auto"``)."""

SUBJECT_SLOT = "{}"
"""Where the subject goes in a prompt template."""


# --------------------------------------------------------------------------- errors


class EditDataError(ValueError):
    """Edit data that cannot be used as it is.

    The message always says where the problem is, e.g.
    ``counterfact-edit.json: record 17 (case_id 17): field 'target_new': empty string``,
    so that a user can open the file and fix it. The same parts are kept as attributes
    (``None`` where they do not apply) for code that wants to act on them.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        index: int | None = None,
        line: int | None = None,
        case_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.index = index
        self.line = line
        self.case_id = case_id
        self.field = field
        super().__init__(_compose_message(problem, source, index, line, case_id, field))


class EditDataWarning(UserWarning):
    """A record skipped on request (``skip_invalid=True``), or one that edits nothing
    (``target_new`` equal to ``target_true``); the message says which and why."""


def _compose_message(
    problem: str,
    source: str | None,
    index: int | None,
    line: int | None,
    case_id: str | None,
    field: str | None,
) -> str:
    details = []
    if line is not None:
        details.append(f"line {line}")
    if case_id is not None:
        details.append(f"case_id {case_id}")
    parts = []
    if source is not None:
        parts.append(source)
    if index is not None:
        parts.append(f"record {index}" + (f" ({', '.join(details)})" if details else ""))
    elif details:
        parts.append(", ".join(details))
    if field is not None:
        parts.append(f"field {field!r}")
    parts.append(problem)
    return ": ".join(parts)


@dataclass(frozen=True)
class _Where:
    """The place of one record, carried along so that every error can name it."""

    source: str
    index: int | None = None
    line: int | None = None
    case_id: str | None = None

    def with_case_id(self, case_id: str) -> _Where:
        return _Where(self.source, self.index, self.line, case_id)

    def error(self, field: str | None, problem: str) -> EditDataError:
        return EditDataError(
            problem,
            source=self.source,
            index=self.index,
            line=self.line,
            case_id=self.case_id,
            field=field,
        )


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class NeighborhoodPrompt:
    """A prompt about another subject whose answer must NOT change with the edit."""

    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite, with the prompts that judge the rewrite.

    ``prompt`` is a template with exactly one ``"{}"`` where the subject goes, because
    the editor must know which tokens are the subject (it reads the key vectors at the
    subject's last token). Paraphrase and generation prompts are full prompts with the
    subject already written in. ``target_true`` is the fact before the edit; it can be
    unknown (``None``).

    This is a plain value: building one checks nothing, so that code can make any
    request it likes (tests make broken ones). The readers check what they read, and
    :func:`validate_requests` checks any list of requests before an edit.
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[NeighborhoodPrompt, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The prompt with the subject written in.

        Plain replacement rather than ``str.format``: prompts are free text and may hold
        other braces, which ``format`` would take for fields.
        """
        return self.prompt.replace(SUBJECT_SLOT, self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        """This request in the project's JSONL schema (what :func:`write_jsonl` writes)."""
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": [
                {"prompt": n.prompt, "target": n.target} for n in self.neighborhood_prompts
            ],
            "generation_prompts": list(self.generation_prompts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        """Read one record of the project's JSONL schema, checking it as :func:`read_jsonl` does.

        Raises :class:`EditDataError` naming the field at fault.
        """
        return _parse_project_record(data, _Where("EditRequest.from_dict"))


# --------------------------------------------------------------------------- field access


@dataclass(frozen=True)
class _Fields:
    """Typed access to one JSON object of a record, raising errors that name the field.

    ``prefix`` is the path of this object inside the record (``"requested_rewrite."``),
    so that nested fields are named as the user sees them in the file.
    """

    data: Mapping[str, Any]
    where: _Where
    prefix: str = ""

    @classmethod
    def of(cls, value: Any, where: _Where, name: str | None = None) -> _Fields:
        """Wrap ``value``, which must be a JSON object (``name`` is its field, if any)."""
        if not isinstance(value, Mapping):
            raise where.error(name, f"expected a JSON object, got {_json_type(value)}")
        return cls(value, where, "" if name is None else name + ".")

    def located(self, where: _Where) -> _Fields:
        """The same fields, with errors naming ``where`` (once the case id is known)."""
        return _Fields(self.data, where, self.prefix)

    def name(self, key: str) -> str:
        return self.prefix + key

    def value(self, key: str) -> Any:
        if key not in self.data:
            raise self.where.error(self.name(key), "missing")
        return self.data[key]

    def text(self, key: str) -> str:
        """A required, non-blank string, stripped of surrounding whitespace."""
        return _text(self.value(key), self.where, self.name(key))

    def optional_text(self, key: str) -> str | None:
        """Like :meth:`text`, but a missing field or ``null`` is ``None``."""
        value = self.data.get(key)
        return None if value is None else _text(value, self.where, self.name(key))

    def text_list(self, key: str) -> tuple[str, ...]:
        """A required list of non-blank strings (the list itself may be empty)."""
        return tuple(
            _text(item, self.where, f"{self.name(key)}[{i}]")
            for i, item in enumerate(self.list(key))
        )

    def list(self, key: str) -> list[Any]:
        value = self.value(key)
        if not isinstance(value, list):
            raise self.where.error(
                self.name(key), f"expected a list, got {_json_type(value)}"
            )
        return value

    def nested(self, key: str) -> _Fields:
        return _Fields.of(self.value(key), self.where, self.name(key))

    def case_id(self, key: str = "case_id", *, allow_int: bool) -> str:
        """The record's id as a string; CounterFact numbers its cases, the project names them."""
        value = self.value(key)
        if allow_int and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            expected = "a string or an integer" if allow_int else "a string"
            raise self.where.error(
                self.name(key), f"expected {expected}, got {_json_type(value)}"
            )
        if not value.strip():
            raise self.where.error(self.name(key), "empty string")
        return value


def _text(value: Any, where: _Where, field: str) -> str:
    if not isinstance(value, str):
        raise where.error(field, f"expected a string, got {_json_type(value)}")
    stripped = value.strip()
    if not stripped:
        raise where.error(field, "empty string" if not value else "blank string (whitespace only)")
    return stripped


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, as the user sees it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _check_template(template: str, where: _Where, field: str) -> None:
    slots = template.count(SUBJECT_SLOT)
    if slots != 1:
        raise where.error(
            field, f"prompt template must contain exactly one '{{}}', found {slots}: {template!r}"
        )


def _template_from_text(
    text: str, subject: str, where: _Where, text_field: str
) -> tuple[str, str]:
    """Turn a prompt with the subject written in into ``(template, subject)``.

    The FIRST occurrence of the subject becomes ``"{}"``, so that filling the template
    gives back the original prompt exactly. Where the subject does not occur verbatim,
    a case-insensitive match is accepted and the spelling found in the prompt becomes
    the subject: the editor locates the subject's tokens in the prompt, so the subject
    must be spelled as the prompt spells it ("the Beatles" in "Who founded The
    Beatles?"). A subject that does not occur even so is an error.
    """
    start = text.find(subject)
    if start < 0:
        match = re.search(re.escape(subject), text, flags=re.IGNORECASE)
        if match is None:
            raise where.error(
                "subject", f"{subject!r} does not occur in field {text_field!r} ({text!r})"
            )
        start = match.start()
        subject = match.group(0)
    template = text[:start] + SUBJECT_SLOT + text[start + len(subject) :]
    _check_template(template, where, text_field)  # the prompt may itself hold a "{}"
    return template, subject


# --------------------------------------------------------------------------- schemas


def _parse_counterfact_record(raw: Any, where: _Where) -> EditRequest:
    """One record of the original CounterFact (``multi_counterfact.json``).

    Neighbourhood prompts are plain strings there: they are about other subjects that
    share the true answer, so their expected answer is ``target_true`` (as in ROME's
    evaluation). ``attribute_prompts``, ``pararel_idx`` and the Wikidata ids are not
    used by editing and are not kept.
    """
    record = _Fields.of(raw, where)
    case_id = record.case_id(allow_int=True)
    where = where.with_case_id(case_id)
    record = record.located(where)
    rewrite = record.nested("requested_rewrite")
    prompt = rewrite.text("prompt")
    _check_template(prompt, where, rewrite.name("prompt"))
    target_true = rewrite.nested("target_true").text("str")
    neighborhood = record.text_list("neighborhood_prompts")
    return EditRequest(
        case_id=case_id,
        subject=rewrite.text("subject"),
        prompt=prompt,
        target_new=rewrite.nested("target_new").text("str"),
        target_true=target_true,
        paraphrase_prompts=record.text_list("paraphrase_prompts"),
        neighborhood_prompts=tuple(NeighborhoodPrompt(p, target_true) for p in neighborhood),
        generation_prompts=(
            record.text_list("generation_prompts")
            if record.data.get("generation_prompts") is not None
            else ()
        ),
    )


def _parse_easyedit_counterfact_record(raw: Any, where: _Where) -> EditRequest:
    """One record of EasyEdit's CounterFact: one paraphrase and one neighbourhood prompt."""
    record = _Fields.of(raw, where)
    case_id = record.case_id(allow_int=True)
    where = where.with_case_id(case_id)
    record = record.located(where)
    template, subject = _template_from_text(
        record.text("prompt"), record.text("subject"), where, "prompt"
    )
    return EditRequest(
        case_id=case_id,
        subject=subject,
        prompt=template,
        target_new=record.text("target_new"),
        target_true=record.text("ground_truth"),
        paraphrase_prompts=(record.text("rephrase_prompt"),),
        neighborhood_prompts=(
            NeighborhoodPrompt(
                record.text("locality_prompt"), record.text("locality_ground_truth")
            ),
        ),
    )


def _parse_zsre_record(raw: Any, where: _Where) -> EditRequest:
    """One zsRE-MEND record; it has no id, so its index in the file is its case id.

    The neighbourhood prompt is the Natural Questions question ``loc`` with a "?"
    appended, answered by ``loc_ans``, as ROME and AlphaEdit build it. ``pred``,
    ``cond`` and ``portability`` are not used by editing and are not kept.
    """
    case_id = str(where.index)
    where = where.with_case_id(case_id)
    record = _Fields.of(raw, where)
    template, subject = _template_from_text(
        record.text("src"), record.text("subject"), where, "src"
    )
    target_true = None
    if record.data.get("answers") is not None:
        answers = record.list("answers")
        if answers:
            target_true = _text(answers[0], where, "answers[0]")
    return EditRequest(
        case_id=case_id,
        subject=subject,
        prompt=template,
        target_new=record.text("alt"),
        target_true=target_true,
        paraphrase_prompts=(record.text("rephrase"),),
        neighborhood_prompts=(
            NeighborhoodPrompt(record.text("loc") + "?", record.text("loc_ans")),
        ),
    )


def _parse_qaedit_record(raw: Any, where: _Where) -> EditRequest:
    """One QAEdit record: a question (``prompt``), its new answer and locality questions.

    QAEdit has no old answer, so ``target_true`` is ``None``: the evaluation takes the
    unedited model's own answer instead. Its ids are numbered per source data set (NQ,
    TQA, SQA) and repeat across them, so where ``source`` is given the case id is
    ``"<source>-<id>"`` ("NQ-1104"); otherwise it is the id. ``rephrase`` may be absent
    or null. Other fields are not used by editing and are not kept.
    """
    record = _Fields.of(raw, where)
    case_id = record.case_id("id", allow_int=True)
    source = record.optional_text("source")
    if source is not None:
        case_id = f"{source}-{case_id}"
    where = where.with_case_id(case_id)
    record = record.located(where)
    template, subject = _template_from_text(
        record.text("prompt"), record.text("subject"), where, "prompt"
    )
    target_new = record.text("target")
    rephrase = record.optional_text("rephrase")
    locality = record.list("locality")
    if not locality:
        # Without one there is nothing to tell whether the edit spilled over.
        raise where.error("locality", "empty list: needs at least one locality question")
    neighborhood = []
    for i, item in enumerate(locality):
        fields = _Fields.of(item, where, f"locality[{i}]")
        neighborhood.append(NeighborhoodPrompt(fields.text("loc"), fields.text("loc_ans")))
    return EditRequest(
        case_id=case_id,
        subject=subject,
        prompt=template,
        target_new=target_new,
        target_true=None,
        paraphrase_prompts=() if rephrase is None else (rephrase,),
        neighborhood_prompts=tuple(neighborhood),
    )


_PROJECT_FIELDS = (
    "case_id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "generation_prompts",
)


def _parse_project_record(raw: Any, where: _Where) -> EditRequest:
    """One record of the project's own schema (:meth:`EditRequest.to_dict`).

    Unlike the foreign schemas, unknown fields are errors here: the schema is ours, so an
    unknown field is a typo ("paraphrases") that would otherwise silently lose data.
    """
    record = _Fields.of(raw, where)
    case_id = record.case_id(allow_int=False)
    where = where.with_case_id(case_id)
    record = record.located(where)
    for key in record.data:
        if key not in _PROJECT_FIELDS:
            raise where.error(
                str(key), f"unknown field (known: {', '.join(_PROJECT_FIELDS)})"
            )
    prompt = record.text("prompt")
    _check_template(prompt, where, "prompt")
    neighborhood = []
    for i, item in enumerate(record.list("neighborhood_prompts")):
        fields = _Fields.of(item, where, f"neighborhood_prompts[{i}]")
        for key in fields.data:
            if key not in ("prompt", "target"):
                raise where.error(
                    fields.name(str(key)), "unknown field (known: prompt, target)"
                )
        neighborhood.append(NeighborhoodPrompt(fields.text("prompt"), fields.text("target")))
    return EditRequest(
        case_id=case_id,
        subject=record.text("subject"),
        prompt=prompt,
        target_new=record.text("target_new"),
        target_true=record.optional_text("target_true"),
        paraphrase_prompts=record.text_list("paraphrase_prompts"),
        neighborhood_prompts=tuple(neighborhood),
        generation_prompts=(
            record.text_list("generation_prompts")
            if record.data.get("generation_prompts") is not None
            else ()
        ),
    )


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _RawRecord:
    """One decoded JSON record and where it was found (``line`` only for JSONL)."""

    index: int
    line: int | None
    data: Any


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EditDataError(f"not valid UTF-8 at byte {error.start}", source=str(path)) from error


def _load_json_array(path: Path) -> list[_RawRecord]:
    """Records of a file holding one JSON array (CounterFact, EasyEdit, zsRE, QAEdit)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise EditDataError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            source=str(path),
        ) from error
    if not isinstance(data, list):
        raise EditDataError(
            f"expected a JSON array of records, got {_json_type(data)}", source=str(path)
        )
    return [_RawRecord(index, None, item) for index, item in enumerate(data)]


def _load_jsonl(path: Path) -> list[_RawRecord]:
    """Records of a JSON Lines file; blank lines are not records.

    Lines end at "\n" only: ``str.splitlines`` would also split at U+2028 and other
    separators that JSON allows unescaped inside strings.
    """
    records = []
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise EditDataError(
                f"invalid JSON at column {error.colno}: {error.msg}",
                source=str(path),
                line=line_number,
            ) from error
        records.append(_RawRecord(len(records), line_number, data))
    return records


_RecordParser = Callable[[Any, _Where], EditRequest]


def _parse_records(
    source: str,
    records: Iterable[_RawRecord],
    parse: _RecordParser,
    *,
    skip_invalid: bool,
) -> list[EditRequest]:
    """Parse every record, then check the case ids are unique across the file."""
    parsed: list[tuple[int, EditRequest]] = []
    for raw in records:
        try:
            request = parse(raw.data, _Where(source, raw.index, raw.line))
        except EditDataError as error:
            if not skip_invalid:
                raise
            warnings.warn(f"skipped: {error}", EditDataWarning, stacklevel=3)
            continue
        parsed.append((raw.index, request))
    _check_unique_case_ids(source, parsed)
    return [request for _, request in parsed]


def _check_unique_case_ids(source: str, indexed: Iterable[tuple[int, EditRequest]]) -> None:
    """Results and edits are keyed by case id, so two records must never share one."""
    first_index: dict[str, int] = {}
    for index, request in indexed:
        earlier = first_index.setdefault(request.case_id, index)
        if earlier != index:
            raise EditDataError(
                f"duplicate case id: record {earlier} has the same case id",
                source=source,
                index=index,
                case_id=request.case_id,
                field="case_id",
            )


def _parser_for(format: str) -> _RecordParser:
    if format == "counterfact":
        return _parse_counterfact_record
    if format == "easyedit_counterfact":
        return _parse_easyedit_counterfact_record
    if format == "zsre":
        return _parse_zsre_record
    if format == "qaedit":
        return _parse_qaedit_record
    if format == "jsonl":
        return _parse_project_record
    raise ValueError(f"unknown edit data format {format!r}; choose one of {_choices()}")


def _choices() -> str:
    return ", ".join(repr(name) for name in ("auto", *FORMATS))


# --------------------------------------------------------------------------- readers


def read_counterfact(
    path: str | os.PathLike[str], *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read the original CounterFact schema (``multi_counterfact.json``, ROME / AlphaEdit)."""
    path = Path(path)
    return _parse_records(
        str(path), _load_json_array(path), _parse_counterfact_record, skip_invalid=skip_invalid
    )


def read_easyedit_counterfact(
    path: str | os.PathLike[str], *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read EasyEdit's CounterFact schema (subject written into ``prompt``).

    The template is the prompt with the subject's first occurrence replaced by "{}"; a
    subject found only case-insensitively takes the prompt's spelling (see
    :func:`read_zsre`).
    """
    path = Path(path)
    return _parse_records(
        str(path),
        _load_json_array(path),
        _parse_easyedit_counterfact_record,
        skip_invalid=skip_invalid,
    )


def read_zsre(path: str | os.PathLike[str], *, skip_invalid: bool = False) -> list[EditRequest]:
    """Read zsRE as prepared for MEND; case ids are the records' indices ("0", "1", ...).

    The template is the question ``src`` with the subject's first occurrence replaced by
    "{}". Where ``subject`` does not occur verbatim in ``src`` but does when case is
    ignored, the spelling in the question becomes the subject, because the editor must
    find the subject's tokens in the prompt. A subject not found even so is an error.
    (In zsre-mend-train-1k.json and zsre-mend-edit-portability.json every subject occurs
    verbatim; the fallback is for other zsRE files.)
    """
    path = Path(path)
    return _parse_records(
        str(path), _load_json_array(path), _parse_zsre_record, skip_invalid=skip_invalid
    )


def read_qaedit(
    path: str | os.PathLike[str], *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read QAEdit (the WILD benchmark): a JSON array of questions with new answers.

    The template is the question ``prompt`` with the subject's first occurrence replaced
    by "{}" (a subject found only case-insensitively takes the question's spelling, see
    :func:`read_zsre`); each ``locality`` item becomes a neighbourhood prompt ``loc``
    answered by ``loc_ans``. ``target_true`` is ``None``: QAEdit has no old answer. Case
    ids are ``"<source>-<id>"`` where a record names its source, since ids repeat across
    sources.
    """
    path = Path(path)
    return _parse_records(
        str(path), _load_json_array(path), _parse_qaedit_record, skip_invalid=skip_invalid
    )


def read_jsonl(
    path: str | os.PathLike[str], *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read the project's schema: one :meth:`EditRequest.to_dict` object per line."""
    path = Path(path)
    return _parse_records(
        str(path), _load_jsonl(path), _parse_project_record, skip_invalid=skip_invalid
    )


def detect_format(path: str | os.PathLike[str]) -> str:
    """Name the schema of an edit file: one of :data:`FORMATS`.

    ``.jsonl`` files are the project's schema; ``.json`` files hold a JSON array whose
    first record's keys tell the schema apart (``requested_rewrite``: CounterFact;
    ``src`` and ``alt``: zsRE; ``prompt`` and ``ground_truth``: EasyEdit CounterFact;
    ``prompt``, ``target``, ``subject`` and ``locality``: QAEdit).
    Anything else is an error asking for an explicit format, rather than a guess.
    """
    path = Path(path)
    return _detect(path, _load_for_detection(path))


def _load_for_detection(path: Path) -> list[_RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json_array(path)
    raise EditDataError(
        f"cannot tell the format from the extension {path.suffix!r} (expected .json or "
        f".jsonl); pass format= one of {_choices()}",
        source=str(path),
    )


def _detect(path: Path, records: Sequence[_RawRecord]) -> str:
    if not records:
        raise EditDataError(
            f"no records to tell the format from; pass format= one of {_choices()}",
            source=str(path),
        )
    first = records[0].data
    if not isinstance(first, Mapping):
        raise EditDataError(
            f"expected a JSON object, got {_json_type(first)}",
            source=str(path),
            index=0,
            line=records[0].line,
        )
    keys = set(first)
    if path.suffix.lower() == ".jsonl":
        if {"case_id", "subject", "prompt", "target_new"} <= keys:
            return "jsonl"
    elif "requested_rewrite" in keys:
        return "counterfact"
    elif {"src", "alt"} <= keys:
        return "zsre"
    elif {"prompt", "ground_truth"} <= keys:
        return "easyedit_counterfact"
    elif {"prompt", "target", "subject", "locality"} <= keys:
        return "qaedit"
    raise EditDataError(
        f"the first record's fields ({', '.join(sorted(map(str, keys)))}) match no known "
        f"schema for a {path.suffix} file; pass format= one of {_choices()}",
        source=str(path),
        index=0,
        line=records[0].line,
    )


def read_requests(
    path: str | os.PathLike[str], format: str = "auto", *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read edit requests in any supported schema; ``"auto"`` detects it (:func:`detect_format`).

    With ``skip_invalid=True`` records that fail a check are left out, each with an
    :class:`EditDataWarning`; broken JSON and duplicate case ids still raise, since
    they make the whole file suspect rather than one record.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown edit data format {format!r}; choose one of {_choices()}")
    path = Path(path)
    if format == "auto":
        records = _load_for_detection(path)  # read once: detection and parsing share it
        format = _detect(path, records)
    else:
        records = _load_jsonl(path) if format == "jsonl" else _load_json_array(path)
    return _parse_records(str(path), records, _parser_for(format), skip_invalid=skip_invalid)


# --------------------------------------------------------------------------- checks before an edit


def validate_requests(
    requests: Sequence[EditRequest],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    max_tokens: int | None = None,
) -> None:
    """Check requests against the model's tokenizer before anything is edited.

    A target is edited in as the tokens of ``" " + target`` (ROME, AlphaEdit), so a
    target whose tokens carry no text (``""``, whitespace, or characters the tokenizer
    drops) would give the editor nothing to optimise; a subject with no tokens has no
    last token to read keys from. A ``target_new`` of unknown tokens only would teach the
    model the unknown token. With ``max_tokens`` (what the model's context leaves for one
    prompt and its answer), every prompt followed by its longest answer must fit: a longer
    one fails deep inside a forward pass otherwise. The structural checks the readers make
    (non-empty fields, exactly one "{}", unique case ids) are made again here, since
    requests can also be built in code. Raises :class:`EditDataError` naming ``source``,
    the record index, its case id and the field; a ``target_new`` equal to ``target_true``
    (an edit that changes nothing) is warned about (:class:`EditDataWarning`).
    """
    checked: list[tuple[_Where, str, str]] = []  # (where, field, text) to tokenize
    for index, request in enumerate(requests):
        where = _Where(source, index, None, request.case_id)
        _check_structure(request, where)
        checked.append((where, "subject", request.subject))
        checked.append((where, "target_new", request.target_new))
        if request.target_true is not None:
            checked.append((where, "target_true", request.target_true))
        for i, neighbor in enumerate(request.neighborhood_prompts):
            checked.append((where, f"neighborhood_prompts[{i}].target", neighbor.target))
    _check_unique_case_ids(source, enumerate(requests))
    if not checked:
        return
    token_ids = tokenizer([" " + text for _, _, text in checked], add_special_tokens=False)[
        "input_ids"
    ]
    decoded = tokenizer.batch_decode(token_ids)
    unknown = getattr(tokenizer, "unk_token_id", None)
    for (where, field, text), ids, back in zip(checked, token_ids, decoded, strict=True):
        if not ids or not back.strip():
            raise where.error(
                field, f"{text!r} tokenizes to nothing (tokens of ' ' + text: {list(ids)})"
            )
        if field == "target_new" and unknown is not None and all(i == unknown for i in ids):
            raise where.error(field, f"{text!r} tokenizes to unknown tokens only ({tokenizer.unk_token!r})")
    for index, request in enumerate(requests):
        if request.target_true is not None and request.target_new.strip() == request.target_true.strip():
            problem = f"equals target_true ({request.target_true!r}): the edit changes nothing"
            message = _compose_message(problem, source, index, None, request.case_id, "target_new")
            warnings.warn(message, EditDataWarning, stacklevel=2)
    if max_tokens is not None:
        answers = {(w.index, f): len(ids) for (w, f, _), ids in zip(checked, token_ids, strict=True)}
        _check_lengths(requests, tokenizer, source, max_tokens, answers)


def _check_lengths(
    requests: Sequence[EditRequest],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    max_tokens: int,
    answers: Mapping[tuple[int, str], int],
) -> None:
    """Every prompt followed by its longest answer fits in ``max_tokens``; else the record is named.

    ``answers`` holds the answer tokens per (record index, field).
    """
    rows: list[tuple[_Where, str, str, int]] = []  # (where, field, prompt, answer tokens)
    for index, request in enumerate(requests):
        where = _Where(source, index, None, request.case_id)
        answer = max(answers[index, "target_new"], answers.get((index, "target_true"), 0))
        rows.append((where, "prompt", request.text, answer))
        rows += [(where, f"paraphrase_prompts[{i}]", p, answer) for i, p in enumerate(request.paraphrase_prompts)]
        rows += [
            (where, f"neighborhood_prompts[{i}].prompt", n.prompt, answers[index, f"neighborhood_prompts[{i}].target"])
            for i, n in enumerate(request.neighborhood_prompts)
        ]
        rows += [(where, f"generation_prompts[{i}]", p, 0) for i, p in enumerate(request.generation_prompts)]
    lengths = [len(ids) for ids in tokenizer([prompt for _, _, prompt, _ in rows])["input_ids"]]
    for (where, field, prompt, answer), length in zip(rows, lengths, strict=True):
        if length + answer > max_tokens:
            raise where.error(
                field,
                f"{length} prompt tokens + {answer} answer tokens exceed the {max_tokens} tokens the model's "
                f"context leaves for a prompt and its answer (the prompt starts {prompt[:60]!r})",
            )


def _check_structure(request: EditRequest, where: _Where) -> None:
    """The invariants every reader guarantees, for requests that did not come from one.

    Emptiness of the subject and targets is left to the tokenizer check, which also
    catches text that is there but tokenizes to nothing.
    """
    if not isinstance(request.case_id, str) or not request.case_id.strip():
        raise where.error("case_id", f"expected a non-empty string, got {request.case_id!r}")
    for field in ("subject", "prompt", "target_new"):
        value = getattr(request, field)
        if not isinstance(value, str):
            raise where.error(field, f"expected a string, got {_json_type(value)}")
    if request.target_true is not None and not isinstance(request.target_true, str):
        raise where.error(
            "target_true", f"expected a string or None, got {_json_type(request.target_true)}"
        )
    _check_template(request.prompt, where, "prompt")
    for field in ("paraphrase_prompts", "generation_prompts"):
        for i, prompt in enumerate(getattr(request, field)):
            if not isinstance(prompt, str) or not prompt.strip():
                raise where.error(
                    f"{field}[{i}]", f"expected a non-empty string, got {prompt!r}"
                )
    for i, neighbor in enumerate(request.neighborhood_prompts):
        if not isinstance(neighbor, NeighborhoodPrompt):
            raise where.error(
                f"neighborhood_prompts[{i}]", f"expected a NeighborhoodPrompt, got {neighbor!r}"
            )
        if not isinstance(neighbor.prompt, str) or not neighbor.prompt.strip():
            raise where.error(
                f"neighborhood_prompts[{i}].prompt",
                f"expected a non-empty string, got {neighbor.prompt!r}",
            )


# --------------------------------------------------------------------------- writing


def write_jsonl(requests: Iterable[EditRequest], path: str | os.PathLike[str]) -> None:
    """Write requests in the project's schema, atomically.

    The file is written next to its destination and moved over it with ``os.replace``,
    so a reader (or a crash) never sees half a file, and an existing file is only
    replaced by a complete one. Each record is first put through :func:`read_jsonl`'s
    own checks, so that nothing is written that could not be read back.
    """
    path = Path(path)
    requests = list(requests)
    for index, request in enumerate(requests):
        _parse_project_record(request.to_dict(), _Where(str(path), index))
    _check_unique_case_ids(str(path), enumerate(requests))
    # Not tempfile.NamedTemporaryFile: it creates files readable by their owner only,
    # and os.replace would carry that mode over to the data file.
    temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            for request in requests:
                handle.write(json.dumps(request.to_dict(), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
