"""Folder for files this package caches per machine (latency tables, the compiled scoring kernel)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """Return ``$BLOCKSWAP_CACHE``, or ``~/.cache/blockswap-plugin`` when it is not set."""
    return Path(os.environ.get("BLOCKSWAP_CACHE") or Path.home() / ".cache" / "blockswap-plugin")
