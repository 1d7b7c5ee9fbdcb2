"""Placement of BlockSwap block types inside mmdet's ResNet and ResNeXt blocks.

mmdet's ``BasicBlock`` (ResNet-18/34) and ``Bottleneck`` (ResNet-50 and up,
ResNeXt) are post-activation blocks: every convolution is followed by a norm
layer, and the branch output is the last norm's output, added to the shortcut
before the final ReLU. A block type from the pool goes in as follows:

* ``Conv`` keeps the host block unchanged (for ResNeXt this keeps its grouped
  3x3 convolution).
* Other ``conv`` types replace each 3x3 convolution and keep the host's norms:
  ``conv1`` (with the block's stride) and ``conv2`` of a ``BasicBlock``,
  ``conv2`` of a ``Bottleneck``.
* ``bottleneck`` types replace the whole branch by one :class:`SwapBranchBlock`.
  The pool's module maps the block's input to its output channels at the
  block's stride. A norm layer built from the backbone's ``norm_cfg`` follows
  it, as the last norm of a post-activation branch does. The host's
  shortcut (``downsample``) and final ReLU are kept.

This module builds single blocks and checks backbones; it builds no backbone.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule

from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet, ResNetV1d
from mmdet.models.backbones.resnext import ResNeXt

from ..core.blocks import get_block_type
from ..core.errors import BlockSwapError
from ..core.fisher import BranchPoint, register_branch_locator

__all__ = [
    "SUPPORTED_BACKBONES",
    "SwapBranchBlock",
    "swap_block",
    "block_names",
    "check_supported",
    "backbone_model_name",
]

SUPPORTED_BACKBONES = ("ResNet", "ResNetV1d", "ResNeXt")


class SwapBranchBlock(BaseModule):
    """Residual block whose whole branch is one ``bottleneck`` block type from the pool.

    Computes ``relu(norm(branch(x)) + shortcut(x))``, with ``shortcut`` the
    host block's ``downsample`` or the identity.

    Args:
        branch (nn.Module): The block type's module, ``in_channels`` to
            ``out_channels`` at the block's stride.
        out_channels (int): Channels of the branch output.
        norm_cfg (dict): Config of the norm layer after the branch.
            Defaults to ``dict(type='BN')``.
        downsample (nn.Module, optional): Shortcut module. Defaults to None.
        with_cp (bool): Use gradient checkpointing. Defaults to False.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(
        self,
        branch: nn.Module,
        out_channels: int,
        norm_cfg: Optional[dict] = None,
        downsample: Optional[nn.Module] = None,
        with_cp: bool = False,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg)
        self.branch = branch
        _, self.norm = build_norm_layer(norm_cfg or dict(type="BN"), out_channels)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)
        self.with_cp = with_cp

    def forward(self, x):
        def _inner_forward(x):
            out = self.norm(self.branch(x))
            identity = x if self.downsample is None else self.downsample(x)
            return out + identity

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)


def _zero_init_cfg(host_block: nn.Module) -> Optional[dict]:
    """Return the zero-init config of the branch norm when the host block zero-inits its last norm.

    mmdet's ResNet gives each block ``Constant(val=0)`` on ``norm2`` or
    ``norm3`` when ``zero_init_residual`` is set. The branch block gets the
    same on ``norm``, its last norm layer.
    """
    cfg = host_block.init_cfg
    if isinstance(cfg, dict) and cfg.get("type") == "Constant" and "override" in cfg:
        zero = copy.deepcopy(cfg)
        zero["override"] = dict(name="norm")
        return zero
    return None


def swap_block(host_block: nn.Module, type_name: str, norm_cfg: dict) -> nn.Module:
    """Build a new block that puts block type ``type_name`` into ``host_block``'s place.

    The host block is not modified. ``Conv`` returns a copy of the host block.

    Args:
        host_block (nn.Module): An mmdet ``BasicBlock`` or ``Bottleneck``.
        type_name (str): Block type name or alias from the pool.
        norm_cfg (dict): The backbone's norm config, used for the norm after
            a ``bottleneck`` type's branch.

    Raises:
        ValueError: If the block type does not fit the block's channels.
        BlockSwapError: If ``host_block`` is not an mmdet ResNet block.
    """
    block_type = get_block_type(type_name)
    if block_type.name == "Conv":
        return copy.deepcopy(host_block)

    if block_type.kind == "conv":
        block = copy.deepcopy(host_block)
        if isinstance(host_block, BasicBlock):
            planes = host_block.conv1.out_channels
            block.conv1 = block_type.build(host_block.conv1.in_channels, planes, host_block.stride)
            block.conv2 = block_type.build(planes, planes, 1)
        elif isinstance(host_block, Bottleneck):
            width = host_block.conv2.in_channels
            block.conv2 = block_type.build(width, width, host_block.conv2_stride)
        else:
            raise BlockSwapError(f"{type(host_block).__name__} is not an mmdet BasicBlock or Bottleneck")
        return block

    if isinstance(host_block, BasicBlock):
        in_channels, out_channels = host_block.conv1.in_channels, host_block.conv2.out_channels
    elif isinstance(host_block, Bottleneck):
        in_channels, out_channels = host_block.conv1.in_channels, host_block.conv3.out_channels
    else:
        raise BlockSwapError(f"{type(host_block).__name__} is not an mmdet BasicBlock or Bottleneck")
    return SwapBranchBlock(
        block_type.build(in_channels, out_channels, host_block.stride),
        out_channels,
        norm_cfg=norm_cfg,
        downsample=copy.deepcopy(host_block.downsample),
        with_cp=host_block.with_cp,
        init_cfg=_zero_init_cfg(host_block),
    )


def block_names(backbone: ResNet) -> List[str]:
    """Return the module paths of ``backbone``'s residual blocks in network order (``layer1.0``, ...)."""
    names = []
    for layer_name in backbone.res_layers:
        for index, _ in enumerate(getattr(backbone, layer_name)):
            names.append(f"{layer_name}.{index}")
    return names


def check_supported(backbone: nn.Module) -> None:
    """Raise a clear error unless ``backbone`` is an mmdet ResNet or ResNeXt that BlockSwap can rewrite.

    Raises:
        BlockSwapError: On another backbone type, deformable convolutions,
            block plugins, dilated stages or a non-default ``conv_cfg``.
    """
    name = type(backbone).__name__
    if not isinstance(backbone, ResNet):
        raise BlockSwapError(
            f"BlockSwap cannot rewrite the backbone {name}: supported backbones are mmdet's "
            f"{', '.join(SUPPORTED_BACKBONES)} (BasicBlock and Bottleneck blocks); "
            "use one of them or another compression method"
        )
    if backbone.dcn is not None and any(backbone.stage_with_dcn):
        raise BlockSwapError(
            f"BlockSwap does not support {name} with deformable convolutions (dcn={backbone.dcn}); "
            "set dcn=None in the backbone config"
        )
    if backbone.plugins is not None:
        raise BlockSwapError(f"BlockSwap does not support {name} with block plugins; set plugins=None")
    if any(d != 1 for d in backbone.dilations):
        raise BlockSwapError(
            f"BlockSwap does not support dilated stages (dilations={tuple(backbone.dilations)}); "
            "the block types use dilation 1, so set dilations=(1, 1, 1, 1)"
        )
    if backbone.conv_cfg is not None:
        raise BlockSwapError(
            f"BlockSwap does not support conv_cfg={backbone.conv_cfg}: the block types are built "
            "with plain nn.Conv2d; set conv_cfg=None"
        )


def backbone_model_name(backbone: ResNet) -> str:
    """Return the model name recorded in genotypes, such as ``mmdet.ResNet-18`` or ``mmdet.ResNeXt-50-32x4d``."""
    if isinstance(backbone, ResNeXt):
        return f"mmdet.ResNeXt-{backbone.depth}-{backbone.groups}x{backbone.base_width}d"
    if isinstance(backbone, ResNetV1d) or (backbone.deep_stem and backbone.avg_down):
        return f"mmdet.ResNetV1d-{backbone.depth}"
    return f"mmdet.ResNet-{backbone.depth}"


def _locate_branch(name: str, module: nn.Module) -> Optional[BranchPoint]:
    """Return where the branch output of an mmdet ResNet block is read for the Fisher potential.

    The branch output is the last norm's output, before the shortcut is added.
    """
    if isinstance(module, SwapBranchBlock):
        return BranchPoint(name, module.norm, "output")
    if isinstance(module, BasicBlock):
        return BranchPoint(name, module.norm2, "output")
    if isinstance(module, Bottleneck):
        return BranchPoint(name, module.norm3, "output")
    return None


register_branch_locator(_locate_branch)
