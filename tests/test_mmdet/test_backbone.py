"""BlockSwapResNet / BlockSwapResNeXt: block placement, exact parameter counts, initialisation, errors."""
import pytest
import torch
import torch.nn as nn

from blockswap_plugin.core.errors import BlockSwapError
from blockswap_plugin.core.fisher import find_branch_points
from blockswap_plugin.core.flops import count_params
from blockswap_plugin.core.blocks import BottleneckBranch, GroupedSeparableConv
from blockswap_plugin.mmdet import BlockSwapResNet, BlockSwapResNeXt, SwapBranchBlock, block_names, check_supported
from mmdet.models.backbones import ResNet, ResNeXt
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck

R18_BLOCKS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def r18(genotype, **kwargs):
    return BlockSwapResNet(genotype=genotype, depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None, **kwargs)


def test_block_names_resnet18():
    assert block_names(ResNet(depth=18)) == R18_BLOCKS


def test_all_conv_genotype_equals_resnet18():
    torch.manual_seed(0)
    student = r18(["Conv"] * 8)
    reference = ResNet(depth=18)
    assert count_params(student) == count_params(reference) == 11_176_512
    assert list(student.state_dict()) == list(reference.state_dict())


def test_conv_type_replaces_both_3x3_of_basic_block():
    student = r18(["DConvA4"] + ["Conv"] * 7)
    block = student.layer1[0]
    assert isinstance(block, BasicBlock)
    assert isinstance(block.conv1, GroupedSeparableConv) and block.conv1.grouped.groups == 4
    assert isinstance(block.conv2, GroupedSeparableConv)
    # Two of (3x3 64->64 in 4 groups: 9216, BN: 128, 1x1 64->64: 4096) plus norm1, norm2 (128 each).
    assert count_params(block) == 2 * (9216 + 128 + 4096) + 256 == 27_136


def test_conv_type_keeps_stride_in_conv1():
    student = r18(["Conv", "Conv", "DConv"] + ["Conv"] * 5)
    block = student.layer2[0]
    assert block.conv1.grouped.stride == (2, 2)
    assert block.conv2.grouped.stride == (1, 1)
    out = student(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]


def test_bottleneck_type_replaces_branch_and_keeps_shortcut():
    student = r18(["Conv", "Conv", "ConvB2"] + ["Conv"] * 5)
    block = student.layer2[0]
    assert isinstance(block, SwapBranchBlock)
    assert isinstance(block.branch, BottleneckBranch) and block.branch.conv.stride == (2, 2)
    assert block.downsample is not None
    # 1x1 64->64 (4096), BN 128, 3x3 64->64 (36864), BN 128, 1x1 64->128 (8192),
    # branch norm 256, shortcut 1x1 64->128 stride 2 (8192) and its BN 256.
    assert count_params(block) == 4096 + 128 + 36864 + 128 + 8192 + 256 + 8192 + 256 == 58_112


def test_conv_type_replaces_conv2_of_bottleneck():
    student = BlockSwapResNet(genotype=["DConvG8"] + ["Conv"] * 15, depth=50, init_cfg=None)
    block = student.layer1[0]
    assert isinstance(block, Bottleneck)
    assert isinstance(block.conv2, GroupedSeparableConv)
    assert block.conv2.grouped.groups == 64 // 8
    assert isinstance(block.conv1, nn.Conv2d) and isinstance(block.conv3, nn.Conv2d)


def test_resnext_conv_keeps_grouped_conv():
    student = BlockSwapResNeXt(genotype=["Conv"] * 15 + ["A4B2"], depth=50, groups=32, base_width=4, init_cfg=None)
    assert student.layer1[0].conv2.groups == 32
    assert isinstance(student.layer4[2], SwapBranchBlock)
    assert student.genotype.model == "mmdet.ResNeXt-50-32x4d"
    assert count_params(student.layer1[0]) == count_params(ResNeXt(depth=50, groups=32, base_width=4).layer1[0])


def test_branch_points_cover_every_block():
    student = r18(["Conv", "DConvA2", "G8B2", "Conv", "ConvB4", "DConv", "Conv", "A2B2"])
    points = find_branch_points(student)
    assert [p.name for p in points] == R18_BLOCKS
    assert points[0].module is student.layer1[0].norm2
    assert points[2].module is student.layer2[0].norm


def test_zero_init_residual_on_substitute_blocks():
    torch.manual_seed(0)
    student = BlockSwapResNet(genotype=["ConvB2", "DConvA4"] + ["Conv"] * 6, depth=18, zero_init_residual=True)
    student.init_weights()
    assert torch.count_nonzero(student.layer1[0].norm.weight) == 0
    assert torch.count_nonzero(student.layer1[1].norm2.weight) == 0
    assert torch.count_nonzero(student.layer2[0].norm2.weight) == 0
    assert torch.count_nonzero(student.layer1[0].branch.bn1.weight - 1) == 0


def test_new_blocks_train_when_not_frozen():
    student = r18(["DConvA4", "ConvB2"] + ["Conv"] * 6)
    student.train()
    assert all(p.requires_grad for p in student.parameters())
    assert student.layer1[1].branch.bn1.training
    assert student.layer1[0].conv1.bn.training


def test_frozen_stages_and_norm_eval_still_apply():
    student = BlockSwapResNet(genotype=["DConvA4", "ConvB2"] + ["Conv"] * 6, depth=18, frozen_stages=1, norm_eval=True)
    student.train()
    assert not any(p.requires_grad for p in student.layer1.parameters())
    assert not student.layer2[0].norm1.training


def test_genotype_wrong_length_error():
    with pytest.raises(BlockSwapError, match="has 3 block types but mmdet.ResNet-18 has 8 residual blocks"):
        r18(["Conv"] * 3)


def test_genotype_unknown_block_type_error():
    with pytest.raises(BlockSwapError, match="unknown block type 'Conv9'"):
        r18(["Conv9"] * 8)


def test_genotype_for_other_model_error():
    with pytest.raises(BlockSwapError, match="made for mmdet.ResNet-34"):
        r18({"model": "mmdet.ResNet-34", "blocks": ["Conv"] * 8})


def test_genotype_json_file(tmp_path):
    from blockswap_plugin.core.genotype import Genotype

    path = tmp_path / "g.json"
    Genotype("mmdet.ResNet-18", ["DConv"] * 8).save(path)
    assert r18(str(path)).genotype.blocks == ("DConv",) * 8


def test_dcn_backbone_rejected():
    backbone = ResNet(depth=50, dcn=dict(type="DCNv2", deform_groups=1, fallback_on_stride=False),
                      stage_with_dcn=(False, True, True, True))
    with pytest.raises(BlockSwapError, match="deformable convolutions"):
        check_supported(backbone)


def test_swin_backbone_rejected():
    from mmdet.models.backbones import SwinTransformer

    backbone = SwinTransformer(embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    with pytest.raises(BlockSwapError, match="cannot rewrite the backbone SwinTransformer: supported backbones"):
        check_supported(backbone)
