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


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fresh_directory(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` with the permissions ``mkdir`` would give it.

    ``tempfile.mkdtemp`` makes it 0700; what a run leaves behind follows the user's umask
    instead, so colleagues sharing a cluster can read it when the umask says they may.
    """
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~current_umask())
    return folder


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Readers never see a half-written file; on error the temporary file is removed. The file
    gets the permissions a plain ``open`` would give it (``tempfile.mkstemp`` makes it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())
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
