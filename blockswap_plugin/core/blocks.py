"""The BlockSwap candidate pool: cheap substitutes for a 3x3 convolution.

Every block type is a module ``(in_channels, out_channels, stride) -> nn.Module``
that maps an ``in_channels`` feature map to ``out_channels`` at the given
stride. Two kinds exist:

* ``conv`` types (``Conv``, ``DConv*``) stand in for a single 3x3 convolution,
  so a basic residual block uses one for each of its two convolutions.
* ``bottleneck`` types (``ConvB*``, ``A*B*``, ``G*B*``) stand in for a whole
  residual branch.

Names follow the BlockSwap authors' code (``DConvA4``, ``G8B2``); the paper's
names (``G(4)``, ``BG(2,M/8)``) are accepted as aliases. This module knows
nothing about any host network: adapters decide where the blocks go.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch.nn as nn

from .fused import register_batchnorm_relu_conv, register_batchnorm_relu_pairs

__all__ = [
    "BlockType",
    "register_block_type",
    "get_block_type",
    "canonical_block_name",
    "list_block_types",
    "build_block",
    "GroupedSeparableConv",
    "BottleneckBranch",
]


@dataclass(frozen=True)
class BlockType:
    """One entry of the candidate pool.

    Attributes:
        name: Canonical name, as in the BlockSwap authors' code.
        paper_name: Name used in the BlockSwap paper.
        kind: ``"conv"`` for a 3x3 convolution substitute, ``"bottleneck"`` for
            a whole-branch substitute.
        description: One-line human description.
        builder: Callable ``(in_channels, out_channels, stride) -> nn.Module``.
    """

    name: str
    paper_name: str
    kind: str
    description: str
    builder: Callable[[int, int, int], nn.Module]

    def build(self, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        return self.builder(in_channels, out_channels, stride)


_REGISTRY: Dict[str, BlockType] = {}
_ALIASES: Dict[str, str] = {}


def _alias_key(name: str) -> str:
    return re.sub(r"\s+", "", name).upper()


def register_block_type(block_type: BlockType, aliases: Optional[List[str]] = None) -> BlockType:
    """Add a block type to the pool, reachable by its name, paper name and aliases."""
    if block_type.kind not in ("conv", "bottleneck"):
        raise ValueError(f"block kind must be 'conv' or 'bottleneck', got {block_type.kind!r}")
    if block_type.name in _REGISTRY:
        raise ValueError(f"block type {block_type.name!r} is already registered")
    _REGISTRY[block_type.name] = block_type
    for alias in [block_type.name, block_type.paper_name, *(aliases or [])]:
        _ALIASES[_alias_key(alias)] = block_type.name
    return block_type


def canonical_block_name(name: str) -> str:
    """Map a block name or alias (``DConvA4``, ``G(4)``) to its canonical name.

    Raises:
        KeyError: If no block type has that name, with the list of valid names.
    """
    key = _alias_key(str(name))
    if key not in _ALIASES:
        raise KeyError(
            f"unknown block type {name!r}; valid names: {', '.join(_REGISTRY)} "
            "(paper names such as 'G(4)' or 'BG(2,M/8)' also work; run 'blockswap blocks' to list them)"
        )
    return _ALIASES[key]


def get_block_type(name: str) -> BlockType:
    """Return the registered block type for a name or alias."""
    return _REGISTRY[canonical_block_name(name)]


def list_block_types() -> List[BlockType]:
    """Return all registered block types in registration order."""
    return list(_REGISTRY.values())


def build_block(name: str, in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """Build the block type ``name`` for the given channels and stride."""
    return get_block_type(name).build(in_channels, out_channels, stride)


def _check_divisible(what: str, channels: int, divisor: int, block: str) -> None:
    if divisor <= 0 or channels % divisor:
        raise ValueError(
            f"block type {block} needs {what} ({channels}) divisible by {divisor}; "
            "choose another block type for this position"
        )


class GroupedSeparableConv(nn.Module):
    """A grouped 3x3 convolution ``i -> i``, BN, ReLU, then a 1x1 convolution ``i -> o``.

    ``groups == 1`` with no pointwise step is the standard convolution, built by
    :func:`_standard_conv` instead.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.act(self.bn(self.grouped(x))))


register_batchnorm_relu_pairs(GroupedSeparableConv, [("bn", "act")])
register_batchnorm_relu_conv(GroupedSeparableConv, "bn", "act", "pointwise")


class BottleneckBranch(nn.Module):
    """A 1x1 ``i -> m``, BN, ReLU, grouped 3x3 ``m -> m`` (strided), BN, ReLU, 1x1 ``m -> o`` branch."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, mid_channels: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.act2 = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(mid_channels, out_channels, 1, bias=False)

    def forward(self, x):
        x = self.act1(self.bn1(self.reduce(x)))
        x = self.act2(self.bn2(self.conv(x)))
        return self.expand(x)


register_batchnorm_relu_pairs(BottleneckBranch, [("bn1", "act1"), ("bn2", "act2")])
register_batchnorm_relu_conv(BottleneckBranch, "bn2", "act2", "expand")


def _standard_conv(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


def _grouped_by_count(groups: int, name: str) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, out_channels: int, stride: int) -> nn.Module:
        _check_divisible("input channels", in_channels, groups, name)
        return GroupedSeparableConv(in_channels, out_channels, stride, groups)

    return build


def _grouped_by_width(group_width: int, name: str) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, out_channels: int, stride: int) -> nn.Module:
        _check_divisible("input channels", in_channels, group_width, name)
        return GroupedSeparableConv(in_channels, out_channels, stride, in_channels // group_width)

    return build


def _depthwise(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return GroupedSeparableConv(in_channels, out_channels, stride, in_channels)


def _bottleneck(reduction: int, name: str, groups: int = 1, group_width: int = 0) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, out_channels: int, stride: int) -> nn.Module:
        _check_divisible("output channels", out_channels, reduction, name)
        mid = out_channels // reduction
        if group_width:
            _check_divisible("bottleneck channels", mid, group_width, name)
            count = mid // group_width
        else:
            _check_divisible("bottleneck channels", mid, groups, name)
            count = groups
        return BottleneckBranch(in_channels, out_channels, stride, mid, count)

    return build


def _register_pool() -> None:
    register_block_type(
        BlockType("Conv", "S", "conv", "standard 3x3 convolution (the teacher's own block)", _standard_conv),
        aliases=["standard"],
    )
    for k in (2, 4, 8, 16):
        name = f"DConvA{k}"
        register_block_type(BlockType(
            name, f"G({k})", "conv",
            f"3x3 convolution in {k} groups, BN, ReLU, 1x1 convolution",
            _grouped_by_count(k, name),
        ))
    for k in (2, 4, 8, 16):
        name = f"DConvG{k}"
        register_block_type(BlockType(
            name, f"G(N/{k})", "conv",
            f"3x3 convolution in groups of {k} channels, BN, ReLU, 1x1 convolution",
            _grouped_by_width(k, name),
        ))
    register_block_type(
        BlockType("DConv", "G(N)", "conv", "depthwise 3x3 convolution, BN, ReLU, 1x1 convolution", _depthwise),
        aliases=["depthwise"],
    )
    for b in (2, 4):
        name = f"ConvB{b}"
        register_block_type(BlockType(
            name, f"B({b})", "bottleneck",
            f"bottleneck branch 1x1, 3x3, 1x1 with {b}x fewer middle channels than outputs",
            _bottleneck(b, name),
        ), aliases=[f"BG({b},1)"])
    for k in (2, 4, 8, 16):
        name = f"A{k}B2"
        register_block_type(BlockType(
            name, f"BG(2,{k})", "bottleneck",
            f"bottleneck branch (2x reduction) with its 3x3 convolution in {k} groups",
            _bottleneck(2, name, groups=k),
        ))
    for k in (2, 4, 8, 16):
        name = f"G{k}B2"
        register_block_type(BlockType(
            name, f"BG(2,M/{k})", "bottleneck",
            f"bottleneck branch (2x reduction) with its 3x3 convolution in groups of {k} channels",
            _bottleneck(2, name, group_width=k),
        ))
    for k in (2, 4, 8):
        name = f"G{k}B4"
        register_block_type(BlockType(
            name, f"BG(4,M/{k})", "bottleneck",
            f"bottleneck branch (4x reduction) with its 3x3 convolution in groups of {k} channels",
            _bottleneck(4, name, group_width=k),
        ))


_register_pool()
