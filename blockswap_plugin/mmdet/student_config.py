"""Writing the complete config of a BlockSwap student detector.

The student config is the run's own merged config with the searched backbone
type and genotype in place of the teacher's backbone. It has no
``BlockSwapHook`` and no run-specific keys (``work_dir``, ``launcher``,
``load_from``, ``resume``), so mmdet's ``tools/train.py``, ``tools/test.py``
and ``tools/analysis_tools/get_flops.py`` take it as it is.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

from mmengine.config import Config

__all__ = ["student_config", "write_student_config"]

PLUGIN_MODULE = "blockswap_plugin.mmdet"


def _is_blockswap_hook(hook_cfg: Any) -> bool:
    hook_type = hook_cfg.get("type") if isinstance(hook_cfg, dict) else None
    name = hook_type if isinstance(hook_type, str) else getattr(hook_type, "__name__", "")
    return name.split(".")[-1] == "BlockSwapHook"


def student_config(cfg: Config, backbone_cfg: Dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` whose model uses ``backbone_cfg`` and whose hooks omit ``BlockSwapHook``.

    Args:
        cfg (Config): The BlockSwap run's config.
        backbone_cfg (dict): The student backbone config
            (see :func:`~blockswap_plugin.mmdet.backbone.student_backbone_cfg`).
    """
    student = copy.deepcopy(cfg)
    student.model.backbone = copy.deepcopy(backbone_cfg)
    student.custom_hooks = [h for h in student.get("custom_hooks", None) or [] if not _is_blockswap_hook(h)]

    imports = dict(student.get("custom_imports", None) or {})
    modules = list(imports.get("imports", []))
    if PLUGIN_MODULE not in modules:
        modules.append(PLUGIN_MODULE)
    imports.update(imports=modules, allow_failed_imports=False)
    student.custom_imports = imports

    for key in ("work_dir", "launcher"):
        student.pop(key, None)
    student.load_from = None
    student.resume = False
    return student


def write_student_config(cfg: Config, backbone_cfg: Dict[str, Any], path: Union[str, Path]) -> Config:
    """Write the student config (see :func:`student_config`) to ``path`` atomically and return it."""
    student = student_config(cfg, backbone_cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".py", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(student.pretty_text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return student
