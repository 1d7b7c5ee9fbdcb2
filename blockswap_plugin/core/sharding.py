"""Split a search's candidates across ``torch.distributed`` ranks and gather their scores.

Launch with ``torchrun --nproc_per_node N``: each rank scores every N-th
candidate and all ranks receive every score. Which candidates exist and how
each is initialised depend only on the seed and the candidate index, so the
result does not depend on the number of ranks. CPU ranks talk over gloo and
GPU ranks over NCCL.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["Shard", "current_shard", "init_distributed_from_env", "gather_scores"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks.

    Attributes:
        rank: Global rank.
        world_size: Number of ranks.
        local_world_size: Ranks on this machine (they share its CPU cores).
        group: Process group, or None when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    group: Optional[object] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def indices(self, indices: Sequence[int]) -> List[int]:
        """Return this rank's share: every ``world_size``-th index, starting at ``rank``."""
        return list(indices)[self.rank::self.world_size]


def current_shard(group: Optional[object] = None) -> Shard:
    """Return this process's shard, a single rank when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return Shard()
    world_size = dist.get_world_size(group)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return Shard(dist.get_rank(group), world_size, local, group)


def init_distributed_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if there is one.

    Uses gloo for CPU and NCCL for CUDA, and selects this rank's GPU
    (``LOCAL_RANK``) on CUDA. Does nothing outside ``torchrun`` (no
    ``WORLD_SIZE`` above 1) or when a group already exists.

    Returns:
        Whether this call created the process group (then call
        ``torch.distributed.destroy_process_group()`` at the end).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    _logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def gather_scores(local_scores: Dict[int, float], shard: Shard) -> Dict[int, float]:
    """Merge every rank's ``{index: score}`` into one dict, returned on all ranks."""
    if not shard.distributed:
        return dict(local_scores)
    gathered: List[Optional[Dict[int, float]]] = [None] * shard.world_size
    dist.all_gather_object(gathered, dict(local_scores), group=shard.group)
    merged: Dict[int, float] = {}
    for part in gathered:
        merged.update(part or {})
    return merged
