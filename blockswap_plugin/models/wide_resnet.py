"""Pre-activation wide ResNets for 32x32 inputs (Zagoruyko and Komodakis, 2016), with BlockSwap blocks.

This is the teacher family of the BlockSwap paper: a 3x3 stem convolution to
16 channels, three stages of ``(depth - 4) / 6`` blocks with ``16k``, ``32k``
and ``64k`` channels (the first block of stages 2 and 3 has stride 2), a final
BN-ReLU, global average pooling and a linear classifier. Every block can be
built from its own block type (``genotype``). This module uses torch only;
``blockswap_plugin.timm`` registers the models with timm.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.blocks import get_block_type
from ..core.errors import BlockSwapError
from ..core.fisher import BranchTap
from ..core.fused import register_batchnorm_relu_pairs
from ..core.genotype import Genotype
from ..core.init import init_paper_

__all__ = ["PreActBlock", "WideResNet"]


class PreActBlock(nn.Module):
    """Pre-activation residual block whose convolutions come from one block type.

    With a ``conv`` block type the branch is BN-ReLU, conv1 (strided), BN-ReLU,
    conv2, both convolutions replaced by that type. With a ``bottleneck`` type
    the branch is BN-ReLU followed by that single (strided) module. A 1x1
    convolution on the pre-activated input is the shortcut when the channels
    or the resolution change.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution and of the shortcut.
        block_type: Name of the block type (``"Conv"`` is the standard block).
        drop_rate: Dropout between the two convolutions (conv types only).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, block_type: str = "Conv", drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        kind = get_block_type(block_type)
        self.block_type = kind.name
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = kind.build(in_channels, out_channels, stride)
        if kind.kind == "conv":
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.act2 = nn.ReLU(inplace=True)
            self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
            self.conv2 = kind.build(out_channels, out_channels, 1)
        else:
            self.conv2 = None
        self.branch_out = BranchTap()
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        if self.conv2 is not None:
            out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return self.branch_out(out) + shortcut


register_batchnorm_relu_pairs(PreActBlock, [("bn1", "act1"), ("bn2", "act2")])


class WideResNet(nn.Module):
    """Pre-activation WRN-``depth``-``widen_factor`` for small (32x32) images.

    Follows timm's model interface (``forward_features``, ``forward_head``,
    ``reset_classifier``, ``num_features``, ``feature_info``).

    Args:
        depth: Network depth; ``(depth - 4)`` must be divisible by 6.
        widen_factor: Width multiplier ``k``.
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        genotype: One block type name per block, a
            :class:`~blockswap_plugin.core.genotype.Genotype`, or the path of
            a genotype JSON file (a ``blockswap search`` result works too);
            all ``"Conv"`` when omitted.
        drop_rate: Dropout rate before the classifier.
        block_drop_rate: Dropout rate inside conv-type blocks.
        global_pool: ``"avg"`` or ``""`` (no pooling in ``forward_head``).
    """

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        genotype: Union[Sequence[str], str, os.PathLike, None] = None,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        global_pool: str = "avg",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"WideResNet got unexpected arguments {sorted(kwargs)}")
        if depth < 10 or (depth - 4) % 6:
            raise BlockSwapError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        num_blocks = 3 * per_stage
        if genotype is None:
            genotype = ["Conv"] * num_blocks
        elif isinstance(genotype, (str, os.PathLike)):
            # A string is a file path here, never a sequence of one-letter block names.
            genotype = Genotype.load(genotype)
        genotype = list(getattr(genotype, "blocks", genotype))
        if len(genotype) != num_blocks:
            raise BlockSwapError(
                f"genotype has {len(genotype)} blocks but WRN-{depth}-{widen_factor} has {num_blocks}; "
                "use a genotype made for this depth"
            )
        self.depth = depth
        self.widen_factor = widen_factor
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.genotype = [get_block_type(name).name for name in genotype]

        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages = []
        self.feature_info: List[Dict] = []
        in_channels = widths[0]
        for stage_index in range(3):
            out_channels = widths[stage_index + 1]
            blocks = []
            for block_index in range(per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                name = self.genotype[stage_index * per_stage + block_index]
                blocks.append(PreActBlock(in_channels, out_channels, stride, name, block_drop_rate))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(
                dict(num_chs=out_channels, reduction=2 ** stage_index, module=f"stages.{stage_index}")
            )
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU(inplace=True)
        self.num_features = self.head_hidden_size = in_channels
        self.fc = nn.Linear(in_channels, num_classes) if num_classes > 0 else nn.Identity()
        init_paper_(self)

    def block_names(self) -> List[str]:
        """Module paths of all residual blocks, in network order."""
        return [f"stages.{s}.{b}" for s, stage in enumerate(self.stages) for b in range(len(stage))]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run stem and stages; return the last stage output and every stage's output."""
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return x, outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.forward_stages(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_batchnorm_relu_pairs(WideResNet, [("norm", "act")])
