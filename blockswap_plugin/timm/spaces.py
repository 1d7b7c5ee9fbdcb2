"""Search spaces and candidate builders for timm models.

:func:`create_space` returns a :class:`~blockswap_plugin.core.space.SwapSpace`
and a candidate builder for a supported timm model; :func:`candidate_builder`
returns the builder alone, without the cost tables. Supported: the CIFAR wide
ResNets of this package and timm's ``ResNet`` class built from ``BasicBlock``
or ``Bottleneck`` (see :mod:`blockswap_plugin.timm.resnet` for the mapping).
Other families raise a clear error.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..core.errors import BlockSwapError
from ..core.space import BlockSite, SwapSpace
from ..models.wide_resnet import PreActBlock, WideResNet
from .resnet import SwappedBlock, is_timm_resnet, resnet_block_names

__all__ = ["create_space", "candidate_builder", "model_name", "SUPPORTED_FAMILIES"]

SUPPORTED_FAMILIES = (
    "wrn_* (CIFAR wide ResNets: wrn_40_2, wrn_16_2, wrn_40_1, wrn_16_1)",
    "timm ResNet with BasicBlock or Bottleneck blocks (resnet18/26/34/50/101/152, resnet50d and other "
    "resnet*d/*s/*t variants, resnext*, wide_resnet*, seresnet*, seresnext*)",
)

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


def _wrn_block_drop(model: WideResNet) -> float:
    drop = 0.0
    for module in model.modules():
        if isinstance(module, PreActBlock) and isinstance(getattr(module, "drop", None), nn.Dropout):
            drop = module.drop.p
            break
    return drop


def _wrn_builder(model: WideResNet) -> Tuple[List[str], CandidateBuilder]:
    drop = _wrn_block_drop(model)

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

    return model.block_names(), build_candidate


def _wrn_space(model: WideResNet, input_size: Tuple[int, int, int]) -> Tuple[SwapSpace, CandidateBuilder]:
    drop = _wrn_block_drop(model)
    site_names, build_candidate = _wrn_builder(model)

    def build_block(site: BlockSite, block_type: str) -> nn.Module:
        return PreActBlock(site.in_channels, site.out_channels, site.stride, block_type, drop)

    space = SwapSpace.from_model(model, model_name(model), site_names, build_block, input_size)
    return space, build_candidate


def _resnet_builder(model: nn.Module) -> Tuple[List[str], CandidateBuilder]:
    site_names = resnet_block_names(model)
    hosts = {name: model.get_submodule(name) for name in site_names}

    def build_candidate(blocks: Sequence[str]) -> nn.Module:
        if len(blocks) != len(site_names):
            raise BlockSwapError(
                f"genotype has {len(blocks)} blocks but {model_name(model)} has {len(site_names)} "
                "swappable blocks; use a genotype made for this model"
            )
        # NOTE: the copy carries the teacher's weights outside the swapped
        # blocks; callers re-initialise (init_paper_ for scoring, the host's
        # init for students).
        candidate = copy.deepcopy(model)
        for name, block_type in zip(site_names, blocks):
            candidate.set_submodule(name, SwappedBlock.from_host(hosts[name], block_type))
        return candidate

    return site_names, build_candidate


def _resnet_space(model: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[SwapSpace, CandidateBuilder]:
    site_names, build_candidate = _resnet_builder(model)

    def build_block(site: BlockSite, block_type: str) -> nn.Module:
        return SwappedBlock.from_host(model.get_submodule(site.name), block_type)

    space = SwapSpace.from_model(model, model_name(model), site_names, build_block, input_size)
    return space, build_candidate


def _unsupported(model: nn.Module) -> BlockSwapError:
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureListNet

    if not isinstance(model, nn.Module):
        hint = f"timm.create_model({model!r})" if isinstance(model, str) else "timm.create_model(name)"
        return BlockSwapError(
            f"expected a model (torch.nn.Module), got {type(model).__name__} {model!r:.80}; "
            f"build the model first, for example with {hint}"
        )
    if isinstance(model, (FeatureListNet, FeatureDictNet, FeatureGetterNet)):
        return BlockSwapError(
            f"{type(model).__name__} is a features_only wrapper, which returns feature maps instead of logits, "
            "so candidates cannot be scored; build the model without features_only=True, run blockswap on it, "
            "and take features from the student with student.forward_intermediates(x, intermediates_only=True) "
            "or timm.models.FeatureListNet(student, out_indices=...)"
        )
    if any(isinstance(m, SwappedBlock) for m in model.modules()):
        return BlockSwapError(
            f"{model_name(model)} already contains BlockSwap blocks; apply genotypes to the original "
            "(unswapped) model, for example a fresh timm.create_model(...)"
        )
    return BlockSwapError(
        f"{type(model).__name__} ({model_name(model)}) has no swappable residual blocks that "
        f"blockswap-plugin knows; supported families: {'; '.join(SUPPORTED_FAMILIES)}"
    )


def candidate_builder(model: nn.Module) -> Tuple[List[str], CandidateBuilder]:
    """Return the swappable block paths of ``model`` and a builder of candidates, without cost tables.

    The builder takes one canonical block type name per block and returns a
    new network; ``model`` is not modified.

    Raises:
        BlockSwapError: If the model family is not supported.
    """
    if isinstance(model, WideResNet):
        return _wrn_builder(model)
    if is_timm_resnet(model) and resnet_block_names(model):
        return _resnet_builder(model)
    raise _unsupported(model)


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
    if is_timm_resnet(model) and resnet_block_names(model):
        return _resnet_space(model, size)
    raise _unsupported(model)
