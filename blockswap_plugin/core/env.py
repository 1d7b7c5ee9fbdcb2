"""On/off switches read from environment variables."""
from __future__ import annotations

import os

from .errors import BlockSwapError

__all__ = ["env_flag"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool = True) -> bool:
    """Return whether the switch ``name`` is on: 1/true/yes/on mean on, 0/false/no/off off, in any case.

    An unset or empty variable gives ``default``.

    Raises:
        BlockSwapError: If the variable has any other value, so that a typo
            does not leave the switch at its default unnoticed.
    """
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise BlockSwapError(
        f"{name}={os.environ[name]!r} is not an on/off value; set it to 1 or 0 (true/false, yes/no, on/off "
        "also work), or unset it for the default"
    )
