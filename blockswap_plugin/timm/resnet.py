"""BlockSwap blocks for timm's ResNet family (``BasicBlock`` and ``Bottleneck`` hosts).

:class:`SwappedBlock` replaces one timm residual block by a block built from a
BlockSwap block type, keeping what the host block has around its convolutions:

* ``BasicBlock`` host, ``conv`` type: both 3x3 convolutions become that type
  (``conv1: in -> first_planes``, strided, and ``conv2: first_planes -> out``),
  each followed by the host's norm, as in timm.
* ``Bottleneck`` host, ``conv`` type: only the 3x3 convolution
  (``first_planes -> width``, strided) becomes that type. The two 1x1
  convolutions stay, so the bottleneck width is the host's own width.
* Either host, ``bottleneck`` type: the whole branch becomes the type's
  1x1-3x3-1x1 module, followed by the host's last norm. Its middle width is
  the host's 3x3 width divided by ``b`` for ``B(b)`` and ``BG(b, ...)`` types:
  ``out_channels / b`` in a ``BasicBlock`` (the pool's rule) and
  ``width / b`` in a ``Bottleneck`` (``width`` is the host's middle width,
  ``planes * base_width / 64 * cardinality`` in timm).
* ``Conv`` is the host's own 3x3 convolution, including the grouping of
  ResNeXt blocks, so an all-``Conv`` genotype rebuilds the host exactly.

Kept from the host block: the downsample path, the stride, squeeze-excitation,
drop path, DropBlock (``conv`` types), and the norm and activation classes.
Dilation is applied to every 3x3 convolution of the substitute. With
anti-aliasing, the substitute's 3x3 convolution runs at stride 1 and the
host's blur pool downsamples. Dropped: DropBlock for ``bottleneck`` types.

The Fisher branch output (:class:`~blockswap_plugin.core.fisher.BranchTap`) sits
after squeeze-excitation and before drop path and the residual addition. This
module also registers a branch locator for unswapped timm blocks.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn as nn
from timm.models import ResNet
from timm.models.resnet import BasicBlock, Bottleneck

from ..core.blocks import BottleneckBranch, get_block_type
from ..core.fisher import BranchPoint, BranchTap, register_branch_locator

__all__ = ["SwappedBlock", "is_timm_resnet", "resnet_block_names", "HOST_BLOCKS"]

HOST_BLOCKS = (BasicBlock, Bottleneck)


def is_timm_resnet(model: nn.Module) -> bool:
    """Return whether ``model`` is a timm ``ResNet`` (any of its BasicBlock or Bottleneck variants)."""
    return isinstance(model, ResNet)


def resnet_block_names(model: nn.Module) -> List[str]:
    """Module paths of the timm ``BasicBlock``/``Bottleneck`` blocks of a model, in network order."""
    return [name for name, module in model.named_modules() if isinstance(module, HOST_BLOCKS)]


def _new_norm(template: nn.Module, channels: int) -> nn.Module:
    return type(template)(channels)


def _new_act(template: nn.Module) -> nn.Module:
    try:
        return type(template)(inplace=True)
    except TypeError:
        return type(template)()


def _dilate_(module: nn.Module, dilation: int) -> nn.Module:
    """Give every 3x3 convolution inside ``module`` the dilation (and matching padding) of the host."""
    if dilation == 1:
        return module
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
    return module


def _build_conv(
    block_type: str, in_channels: int, out_channels: int, stride: int, dilation: int, host_groups: int
) -> nn.Module:
    """Build a ``conv``-kind substitute; ``Conv`` keeps the host's grouping (ResNeXt cardinality)."""
    if block_type == "Conv":
        return nn.Conv2d(
            in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, groups=host_groups, bias=False
        )
    return _dilate_(get_block_type(block_type).build(in_channels, out_channels, stride), dilation)


def _build_bottleneck(
    block_type: str, in_channels: int, out_channels: int, stride: int, host: nn.Module
) -> nn.Module:
    """Build a ``bottleneck``-kind branch whose middle width is the host's 3x3 width divided by ``b``.

    For a ``BasicBlock`` the 3x3 width is the output width, which is the pool's
    own rule (``m = out / b``). For a ``Bottleneck`` it is the host's middle
    width, so ``B(4)`` on ResNet-50 has a quarter of the host's middle width.
    """
    conv_width = host.conv2.out_channels
    # The pool's builder checks divisibility and sets the grouping for a branch of this width.
    probe = get_block_type(block_type).build(in_channels, conv_width, stride)
    if not isinstance(probe, BottleneckBranch):
        return _dilate_(get_block_type(block_type).build(in_channels, out_channels, stride), host.dilation)
    mid = probe.reduce.out_channels
    module = BottleneckBranch(in_channels, out_channels, stride, mid, probe.conv.groups)
    return _dilate_(module, host.dilation)


def _copy(module: nn.Module) -> nn.Module:
    # Copies land on the current default device, like the freshly built layers
    # (the meta device when cost tables are filled under ``torch.device("meta")``).
    return copy.deepcopy(module).to(torch.empty(0).device)


def _optional_copy(module: Optional[nn.Module]) -> Optional[nn.Module]:
    return None if module is None else _copy(module)


class SwappedBlock(nn.Module):
    """A timm residual block whose convolutions come from one BlockSwap block type.

    Build it with :meth:`from_host`. The layout of ``branch`` depends on the
    host block and the block type (see the module docstring), so a state dict
    loads only into a block built from the same host and type.

    Args:
        block_type: Canonical block type name.
        branch: Residual branch up to and including its last norm.
        se: Squeeze-excitation module of the host, or None.
        drop_path: Drop path module of the host, or None.
        downsample: Shortcut projection of the host, or None.
        act: Activation after the residual addition.
    """

    def __init__(
        self,
        block_type: str,
        branch: nn.Sequential,
        se: Optional[nn.Module],
        drop_path: Optional[nn.Module],
        downsample: Optional[nn.Module],
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.block_type = block_type
        self.branch = branch
        self.se = se
        self.branch_out = BranchTap()
        self.drop_path = drop_path
        self.downsample = downsample
        self.act = act

    @classmethod
    def from_host(cls, host: nn.Module, block_type: str) -> "SwappedBlock":
        """Build the substitute of a timm ``BasicBlock`` or ``Bottleneck``.

        Host modules that are kept (downsample, SE, drop path, anti-aliasing)
        are deep copies and keep the host's weights until the model is
        re-initialised.

        Raises:
            ValueError: If the block type does not fit the block's channels.
            TypeError: If ``host`` is not a timm ResNet block.
        """
        if not isinstance(host, HOST_BLOCKS):
            raise TypeError(f"expected a timm BasicBlock or Bottleneck, got {type(host).__name__}")
        kind = get_block_type(block_type)
        basic = isinstance(host, BasicBlock)
        in_channels = host.conv1.in_channels
        last_conv = host.conv2 if basic else host.conv3
        out_channels = last_conv.out_channels
        use_aa = not isinstance(host.aa, nn.Identity)
        conv_stride = 1 if use_aa else host.stride
        last_norm = host.bn2 if basic else host.bn3

        if kind.kind == "bottleneck":
            module = _build_bottleneck(kind.name, in_channels, out_channels, conv_stride, host)
            if use_aa and isinstance(module, BottleneckBranch):
                # Blur pool after the middle activation, where timm's Bottleneck has it.
                module.act2 = nn.Sequential(module.act2, _copy(host.aa))
            # NOTE: DropBlock is not kept for bottleneck types: the pool module has no slot for it.
            layers = [("bottleneck", module), ("bn", _new_norm(last_norm, out_channels))]
        elif basic:
            first_planes = host.conv1.out_channels
            layers = [
                ("conv1", _build_conv(kind.name, in_channels, first_planes, conv_stride, host.conv1.dilation[0], 1)),
                ("bn1", _new_norm(host.bn1, first_planes)),
                ("drop_block", _copy(host.drop_block)),
                ("act1", _new_act(host.act1)),
                ("aa", _copy(host.aa)),
                ("conv2", _build_conv(kind.name, first_planes, out_channels, 1, host.conv2.dilation[0], 1)),
                ("bn2", _new_norm(last_norm, out_channels)),
            ]
        else:
            first_planes = host.conv1.out_channels
            width = host.conv2.out_channels
            layers = [
                ("conv1", nn.Conv2d(in_channels, first_planes, 1, bias=False)),
                ("bn1", _new_norm(host.bn1, first_planes)),
                ("act1", _new_act(host.act1)),
                ("conv2", _build_conv(
                    kind.name, first_planes, width, conv_stride, host.conv2.dilation[0], host.conv2.groups
                )),
                ("bn2", _new_norm(host.bn2, width)),
                ("drop_block", _copy(host.drop_block)),
                ("act2", _new_act(host.act2)),
                ("aa", _copy(host.aa)),
                ("conv3", nn.Conv2d(width, out_channels, 1, bias=False)),
                ("bn3", _new_norm(last_norm, out_channels)),
            ]
        return cls(
            kind.name,
            nn.Sequential(OrderedDict(layers)),
            _optional_copy(host.se),
            _optional_copy(host.drop_path),
            _optional_copy(host.downsample),
            _new_act(host.act2 if basic else host.act3),
        )

    def zero_init_last(self) -> None:
        """Zero the last norm's weight, as timm does for its own blocks."""
        norm = self.branch[-1]
        if getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.branch(x)
        if self.se is not None:
            x = self.se(x)
        x = self.branch_out(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act(x + shortcut)

    def extra_repr(self) -> str:
        return f"block_type={self.block_type}"


def _timm_block_locator(name: str, module: nn.Module) -> Optional[BranchPoint]:
    # The branch of an unswapped timm block ends at SE when present, else at the last norm.
    if isinstance(module, BasicBlock):
        return BranchPoint(name, module.se if module.se is not None else module.bn2, "output")
    if isinstance(module, Bottleneck):
        return BranchPoint(name, module.se if module.se is not None else module.bn3, "output")
    return None


register_branch_locator(_timm_block_locator)
