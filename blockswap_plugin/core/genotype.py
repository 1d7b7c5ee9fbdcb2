"""Genotype: the block type chosen for every swappable block of one model.

A genotype is saved as JSON::

    {"model": "wrn_40_2", "blocks": ["Conv", "DConvA4", ...]}

Loading also accepts the BlockSwap authors' layout (a bare list of names) and
an object with a ``"genotype"`` list, as in the published reference file.
Names are stored in canonical form; paper names are accepted on load.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

from .blocks import canonical_block_name
from .errors import BlockSwapError

__all__ = ["Genotype", "write_json_atomic"]


@dataclass(frozen=True, init=False)
class Genotype:
    """Block types for one model, one entry per swappable block in network order.

    Attributes:
        model: Name of the model the genotype applies to (for example ``"wrn_40_2"``).
        blocks: Canonical block type names.
        meta: Free-form extra information (search budget, score), kept on save.
    """

    model: str
    blocks: tuple
    meta: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __init__(self, model: str, blocks: Sequence[str], meta: Dict[str, Any] = None) -> None:
        names = []
        for position, name in enumerate(blocks):
            try:
                names.append(canonical_block_name(name))
            except KeyError as exc:
                raise BlockSwapError(f"block {position + 1} of {len(blocks)} in the genotype: {exc.args[0]}") from None
        object.__setattr__(self, "model", str(model))
        object.__setattr__(self, "blocks", tuple(names))
        object.__setattr__(self, "meta", dict(meta or {}))

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def to_dict(self) -> Dict[str, Any]:
        data = {"model": self.model, "blocks": list(self.blocks)}
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: Union[Dict[str, Any], Sequence[str]], model: str = "") -> "Genotype":
        """Build a genotype from a dict (``blocks`` or ``genotype`` key) or a list of names."""
        if isinstance(data, (list, tuple)):
            return cls(model, data)
        if not isinstance(data, dict):
            raise BlockSwapError(f"a genotype must be a JSON object or list, got {type(data).__name__}")
        blocks = data.get("blocks", data.get("genotype"))
        if blocks is None and isinstance(data.get("winner"), dict):
            return cls.from_dict(data["winner"], model=data.get("model", model))
        if not isinstance(blocks, (list, tuple)):
            raise BlockSwapError(
                "a genotype object needs a 'blocks' list of block type names, "
                f"found keys {sorted(data)}"
            )
        return cls(data.get("model", model), blocks, data.get("meta"))

    def save(self, path: Union[str, Path]) -> None:
        """Write the genotype as JSON, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path], model: str = "") -> "Genotype":
        """Read a genotype JSON file (also a ``blockswap search`` result file).

        Raises:
            BlockSwapError: If the path is a folder or missing, is not JSON, or names an unknown block type.
        """
        path = Path(path)
        if path.is_dir():
            raise BlockSwapError(f"genotype path {path} is a folder; pass the path of a genotype JSON file in it")
        if not path.is_file():
            raise BlockSwapError(f"genotype file not found: {path}; pass the path of a genotype JSON file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BlockSwapError(f"genotype file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        try:
            return cls.from_dict(data, model=model)
        except BlockSwapError as exc:
            raise BlockSwapError(f"{path}: {exc}") from None


def write_json_atomic(path: Union[str, Path], data: Any) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
