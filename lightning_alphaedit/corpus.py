"""General text for the preserved-key statistics: a packaged corpus or the user's own file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lightning_alphaedit.assets import CORPUS_ASSETS, corpus_file

DATASETS_PREFIX = "datasets:"

PACKAGED_CORPORA = ("tiny-corpus",)
"""Corpora shipped inside the package (name -> ``lightning_alphaedit/data/<name with _>.txt``)."""


@dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order, with an identity that changes whenever the text does."""

    identity: str
    texts: tuple[str, ...]


def load_corpus(name_or_path: str, text_field: str = "text", cache_dir: str | None = None) -> Corpus:
    """Read a corpus: a packaged or registry name, a .txt file (one document per line),
    .json/.jsonl records, or ``datasets:NAME[?config=C&split=S]`` (a `datasets` dataset).

    A registry corpus (``wikipedia-vital-en``) is fetched into ``cache_dir`` on first use and
    read with its own text field.
    """
    if name_or_path.startswith(DATASETS_PREFIX):
        return _load_dataset(name_or_path, text_field)
    if name_or_path in CORPUS_ASSETS:
        path = corpus_file(name_or_path, cache_dir)
        text_field = CORPUS_ASSETS[name_or_path].text_field
    elif name_or_path in PACKAGED_CORPORA:
        path = Path(str(resources.files("lightning_alphaedit") / "data" / f"{name_or_path.replace('-', '_')}.txt"))
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus {name_or_path!r} is neither a known corpus "
                f"{PACKAGED_CORPORA + tuple(CORPUS_ASSETS)} nor a file nor {DATASETS_PREFIX}NAME"
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


def _load_dataset(spec: str, text_field: str) -> Corpus:
    """``datasets:NAME?config=C&split=S``: any dataset the `datasets` library can load; other
    query fields are passed to ``load_dataset`` (e.g. ``data_files=...``)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"corpus {spec!r} needs the `datasets` package: pip install datasets") from None
    parts = urlsplit(spec[len(DATASETS_PREFIX) :])
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    name = parts.path if not parts.netloc else f"{parts.netloc}{parts.path}"
    options = {key: value for key, value in query.items() if key not in ("config", "split")}  # e.g. data_files
    dataset = datasets.load_dataset(name, query.get("config"), split=query.get("split", "train"), **options)
    if text_field not in dataset.column_names:
        raise ValueError(f"corpus {spec}: no column {text_field!r} (columns: {dataset.column_names})")
    texts = tuple(t.strip() for t in dataset[text_field] if isinstance(t, str) and t.strip())
    if not texts:
        raise ValueError(f"corpus {spec}: no documents")
    identity = f"{spec}:fingerprint={getattr(dataset, '_fingerprint', len(texts))}:field={text_field}"
    return Corpus(identity=identity, texts=texts)
