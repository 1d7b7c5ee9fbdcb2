"""SwappedBlock on real timm ResNets: exact rebuilds, kept host features, branch outputs and scoring init."""
import pytest
import timm
import torch

import blockswap_plugin as bp
from blockswap_plugin.core.fisher import find_branch_points, fisher_potential
from blockswap_plugin.core.search import score_candidate
from blockswap_plugin.timm.resnet import SwappedBlock, resnet_block_names
from blockswap_plugin.timm.spaces import candidate_builder, create_space

FAMILY = ["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet50d",
          "resnext50_32x4d", "wide_resnet50_2", "seresnet50"]


@pytest.mark.parametrize("name", FAMILY)
def test_all_conv_rebuilds_host_params(name):
    model = timm.create_model(name, num_classes=10)
    blocks = resnet_block_names(model)
    student = bp.apply_genotype(model, ["Conv"] * len(blocks))
    assert type(student) is type(model)
    assert bp.count_params(student) == bp.count_params(model)
    assert all(isinstance(student.get_submodule(n), SwappedBlock) for n in blocks)


def test_every_pool_type_runs_in_resnet18():
    model = timm.create_model("resnet18", num_classes=10)
    space, _ = create_space(model, (3, 32, 32))
    assert set(space.choices(0)) == set(space.block_types)
    x = torch.randn(2, 3, 32, 32)
    for block_type in space.block_types:
        student = bp.apply_genotype(model, [block_type] * len(space)).eval()
        assert student(x).shape == (2, 10), block_type
        assert bp.count_params(student) == space.count_params([block_type] * len(space)), block_type


def test_every_pool_type_fits_bottleneck_host():
    model = timm.create_model("resnet50", num_classes=10)
    host = model.layer2[0]
    x = torch.randn(2, 256, 16, 16)
    for block_type in bp.core.blocks.list_block_types():
        block = SwappedBlock.from_host(host, block_type.name).eval()
        assert block(x).shape == (2, 512, 8, 8), block_type.name
        if block_type.kind == "bottleneck":
            # Middle width is the host's 3x3 width (128) divided by the type's reduction.
            reduction = 4 if block_type.name in ("ConvB4", "G2B4", "G4B4", "G8B4") else 2
            assert block.branch.bottleneck.reduce.out_channels == 128 // reduction, block_type.name
        else:
            assert block.branch.conv1.out_channels == 128
            assert block.branch.conv3.in_channels == 128


def test_space_table_matches_built_student():
    model = timm.create_model("resnet34", num_classes=10)
    space, build = create_space(model, (3, 32, 32))
    genotype = ["DConvA4", "G8B4", "ConvB2", "DConv", "A2B2", "Conv", "G2B2", "DConvG16",
                "ConvB4", "A16B2", "DConvA2", "G4B4", "DConvG2", "Conv", "A4B2", "DConvA8"]
    student = build(genotype)
    assert bp.count_params(student) == space.count_params(genotype)
    assert bp.count_macs(student, (1, 3, 32, 32)) == space.count_macs(genotype)


def test_original_model_untouched():
    model = timm.create_model("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bp.apply_genotype(model, ["DConv"] * 8)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, SwappedBlock) for m in model.modules())


def test_kept_host_parts_seresnet_drop_path():
    model = timm.create_model("seresnet50", num_classes=10, drop_path_rate=0.2)
    student = bp.apply_genotype(model, ["ConvB4"] * 16)
    last = student.layer4[2]
    assert type(last.se).__name__ == "SEModule"
    assert last.drop_path is not None and last.drop_path.drop_prob == pytest.approx(model.layer4[2].drop_path.drop_prob)
    assert student.layer2[0].downsample is not None


def test_kept_host_parts_resnet50d_downsample():
    model = timm.create_model("resnet50d", num_classes=10)
    student = bp.apply_genotype(model, ["DConvA4"] * 16)
    # resnet50d's shortcut averages before its 1x1 conv.
    assert type(student.layer2[0].downsample[0]).__name__ == "AvgPool2d"


def test_kept_dilation_output_stride_8():
    model = timm.create_model("resnet18", num_classes=10, output_stride=8).eval()
    student = bp.apply_genotype(model, ["DConvA2"] * 4 + ["G4B2"] * 4).eval()
    x = torch.randn(1, 3, 64, 64)
    assert student.forward_features(x).shape == model.forward_features(x).shape == (1, 512, 8, 8)
    dilations = {m.dilation for m in student.layer4.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert dilations == {(4, 4)}


def test_kept_anti_aliasing():
    model = timm.create_model("resnetaa50", num_classes=10).eval()
    student = bp.apply_genotype(model, ["DConvA4"] * 8 + ["ConvB2"] * 8).eval()
    x = torch.randn(1, 3, 64, 64)
    assert student(x).shape == (1, 10)
    aa_type = type(model.layer2[0].aa)
    assert sum(isinstance(m, aa_type) for m in student.modules()) == sum(isinstance(m, aa_type) for m in model.modules())


def test_branch_points_before_addition():
    model = timm.create_model("resnet18", num_classes=10)
    points = find_branch_points(model)
    assert [p.name for p in points] == resnet_block_names(model)
    assert points[0].module is model.layer1[0].bn2
    student = bp.apply_genotype(model, ["G8B4"] * 8)
    student_points = find_branch_points(student)
    assert [p.name for p in student_points] == resnet_block_names(model)
    assert student_points[0].module is student.layer1[0].branch_out


def test_timm_init_scores_zero_paper_init_scores_differ(cifar_batch):
    images, labels = cifar_batch[0][:32], cifar_batch[1][:32]
    model = timm.create_model("resnet18", num_classes=10)
    # Students get timm's init, which zeroes every block's last BN, so every branch outputs zeros.
    student = bp.apply_genotype(model, ["Conv"] * 8)
    assert fisher_potential(student, images, labels) == 0.0
    _, build = candidate_builder(model)
    first = score_candidate(build, ["DConvA4"] * 8, images, labels, seed=0)
    second = score_candidate(build, ["G8B4"] * 8, images, labels, seed=0)
    assert first > 0
    assert second > 0
    assert first != second


def test_timm_features_work_on_student():
    model = timm.create_model("resnet50", num_classes=10)
    student = bp.apply_genotype(model, ["DConvG8"] * 16).eval()
    x = torch.randn(2, 3, 64, 64)
    features = student.forward_features(x)
    assert features.shape == (2, 2048, 2, 2)
    assert student.forward_head(features).shape == (2, 10)
    assert student.forward_head(features, pre_logits=True).shape == (2, 2048)
    final, intermediates = student.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [64, 256, 512, 1024, 2048]
    assert student.pretrained_cfg["architecture"] == "resnet50"
    student.reset_classifier(3)
    assert student(x).shape == (2, 3)
    wrapped = timm.models.FeatureListNet(student, out_indices=(1, 2, 3, 4))
    assert [t.shape[1] for t in wrapped(x)] == [256, 512, 1024, 2048]


def test_features_only_model_rejected(cifar_batch):
    model = timm.create_model("resnet18", features_only=True)
    with pytest.raises(bp.BlockSwapError, match="features_only"):
        bp.blockswap(model, cifar_batch, 0.25, num_samples=2)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b0"])
def test_unsupported_family_lists_supported(name, cifar_batch):
    model = timm.create_model(name, num_classes=10)
    with pytest.raises(bp.BlockSwapError, match="supported families: wrn_"):
        bp.blockswap(model, cifar_batch, 0.25, num_samples=2)


def test_model_name_string_rejected():
    with pytest.raises(bp.BlockSwapError, match=r"got str 'wrn_40_2'.*timm.create_model\('wrn_40_2'\)"):
        create_space("wrn_40_2", (3, 32, 32))
    with pytest.raises(bp.BlockSwapError, match="got NoneType"):
        candidate_builder(None)
