"""Where the project keeps what it downloads and computes: never the working directory."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LIGHTNING_ALPHAEDIT_CACHE``, else ``$XDG_CACHE_HOME/lightning-alphaedit``, else ``~/.cache/lightning-alphaedit``."""
    explicit = os.environ.get("LIGHTNING_ALPHAEDIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning-alphaedit"
