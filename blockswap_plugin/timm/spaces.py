"""Search spaces and candidate builders for timm models.

:func:`create_space` returns a :class:`~blockswap_plugin.core.space.SwapSpace`
and a candidate builder for a supported timm model. The CIFAR wide ResNets
are supported; other families raise a clear error.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch.nn as nn

from ..core.errors import BlockSwapError
from ..core.space import BlockSite, SwapSpace
from ..models.wide_resnet import PreActBlock, WideResNet

__all__ = ["create_space", "model_name", "SUPPORTED_FAMILIES"]

SUPPORTED_FAMILIES = ("wrn_* (CIFAR wide ResNets: wrn_40_2, wrn_16_2, wrn_40_1, wrn_16_1)",)

CandidateBuilder = Callable[[Sequence[str]], nn.Module]


def model_name(model: nn.Module) -> str:
    """Name of a timm model as recorded in genotypes (its architecture name)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if name:
        return name
    if isinstance(model, WideResNet):
        return f"wrn_{model.depth}_{model.widen_factor}"
    return type(model).__name__


def _default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _wrn_space(model: WideResNet, input_size: Tuple[int, int, int]) -> Tuple[SwapSpace, CandidateBuilder]:
    drop = 0.0
    for module in model.modules():
        if isinstance(module, PreActBlock) and isinstance(getattr(module, "drop", None), nn.Dropout):
            drop = module.drop.p
            break

    def build_block(site: BlockSite, block_type: str) -> nn.Module:
        return PreActBlock(site.in_channels, site.out_channels, site.stride, block_type, drop)

    def build_candidate(blocks: Sequence[str]) -> nn.Module:
        return WideResNet(
            model.depth,
            model.widen_factor,
            model.num_classes,
            in_chans=model.stem.in_channels,
            genotype=blocks,
            drop_rate=model.drop_rate,
            block_drop_rate=drop,
            global_pool=model.global_pool,
        )

    space = SwapSpace.from_model(model, model_name(model), model.block_names(), build_block, input_size)
    return space, build_candidate


def create_space(
    model: nn.Module, input_size: Optional[Sequence[int]] = None
) -> Tuple[SwapSpace, CandidateBuilder]:
    """Return the search space of ``model`` and a builder of fresh candidates.

    Args:
        model: A supported timm model; it is not modified.
        input_size: ``(C, H, W)`` for MACs; the model's ``pretrained_cfg`` input size by default.

    Raises:
        BlockSwapError: If the model family is not supported.
    """
    size = tuple(input_size) if input_size is not None else _default_input_size(model)
    if len(size) != 3:
        raise BlockSwapError(f"input size must be C H W, got {size}")
    if isinstance(model, WideResNet):
        return _wrn_space(model, size)
    raise BlockSwapError(
        f"{type(model).__name__} ({model_name(model)}) has no swappable residual blocks that "
        f"blockswap-plugin knows; supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )
