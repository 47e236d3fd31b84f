"""General text for the preserved-key statistics: a packaged corpus or the user's own file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PACKAGED_CORPORA = ("tiny-corpus",)
"""Corpora shipped inside the package (name -> ``lightning_alphaedit/data/<name with _>.txt``)."""


@dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order, with an identity that changes whenever the text does."""

    identity: str
    texts: tuple[str, ...]


def load_corpus(name_or_path: str, text_field: str = "text") -> Corpus:
    """Read a corpus: a packaged name, a .txt file (one document per line) or .json/.jsonl records."""
    if name_or_path in PACKAGED_CORPORA:
        path = Path(str(resources.files("lightning_alphaedit") / "data" / f"{name_or_path.replace('-', '_')}.txt"))
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus {name_or_path!r} is neither a packaged corpus {PACKAGED_CORPORA} nor a file"
            )
    raw = path.read_bytes()
    texts = _parse(path, raw.decode("utf-8"), text_field)
    if not texts:
        raise ValueError(f"corpus {path}: no documents")
    identity = f"{path.name}:sha256={hashlib.sha256(raw).hexdigest()[:16]}:field={text_field}"
    return Corpus(identity=identity, texts=tuple(texts))


def _parse(path: Path, text: str, field: str) -> list[str]:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.suffix == ".json":
        records = json.loads(text)
        if isinstance(records, dict):  # {"id": record} layouts
            records = list(records.values())
    else:
        return [line.strip() for line in text.splitlines() if line.strip()]
    texts = []
    for index, record in enumerate(records):
        value = record if isinstance(record, str) else record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"corpus {path}: record {index}: field {field!r} missing or not a string")
        if value.strip():
            texts.append(value.strip())
    return texts
