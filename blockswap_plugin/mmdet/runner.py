"""An mmengine Runner whose ``pytorch`` launcher also starts on machines without a GPU.

mmengine 0.10.7's ``init_dist('pytorch')`` calls ``torch.cuda.set_device``
before it creates the process group, which fails where no CUDA device
exists, so ``torchrun ... tools/train.py --launcher pytorch`` cannot train on
CPUs. This runner creates the gloo process group from torchrun's environment
variables first, so mmengine finds an initialised group and skips its own
``init_dist``. Everything else is mmengine's ``Runner``. Select it in a config
with ``runner_type = 'mmdet.AnyDeviceRunner'``.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as torch_dist
from mmengine.dist import is_distributed
from mmengine.logging import print_log
from mmengine.runner import Runner

from mmdet.registry import RUNNERS

from ..core.errors import BlockSwapError

__all__ = ["AnyDeviceRunner"]


@RUNNERS.register_module()
class AnyDeviceRunner(Runner):
    """mmengine ``Runner`` that starts ``pytorch``-launched runs on the CPU with gloo."""

    def setup_env(self, env_cfg: dict) -> None:
        """Create the gloo process group on a machine without CUDA, then set up mmengine's environment."""
        if self.distributed and self.launcher == "pytorch" and not is_distributed() and not torch.cuda.is_available():
            dist_cfg = copy.deepcopy(dict(env_cfg.get("dist_cfg", {})))
            backend = dist_cfg.pop("backend", "gloo")
            dist_cfg.pop("init_backend", None)
            if backend != "gloo":
                raise BlockSwapError(
                    f"distributed training on the CPU needs the gloo backend, but env_cfg.dist_cfg.backend is "
                    f"{backend!r}; set env_cfg = dict(dist_cfg=dict(backend='gloo'))"
                )
            torch_dist.init_process_group(backend="gloo", **dist_cfg)
            print_log(
                f"AnyDeviceRunner: gloo process group started on the CPU, rank {torch_dist.get_rank()} of "
                f"{torch_dist.get_world_size()}",
                logger="current",
            )
        super().setup_env(env_cfg)
