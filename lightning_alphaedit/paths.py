"""Where the project keeps what it downloads and computes: never the working directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LIGHTNING_ALPHAEDIT_CACHE``, else ``$XDG_CACHE_HOME/lightning-alphaedit``, else ``~/.cache/lightning-alphaedit``."""
    explicit = os.environ.get("LIGHTNING_ALPHAEDIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning-alphaedit"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder a ``cache_dir`` option names (``~`` expanded), or the default one."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Readers never see a half-written file; on error the temporary file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through `atomic_file`: all of it or nothing."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
