"""Exact parameter counts of the paper's networks, and table counts against built networks."""
import random

import pytest
import timm

import blockswap_plugin  # noqa: F401  (registers wrn_*)
from blockswap_plugin.core.flops import count_macs, count_params
from blockswap_plugin.models.wide_resnet import WideResNet
from blockswap_plugin.timm.spaces import create_space


def test_wrn_40_2_teacher_params():
    model = timm.create_model("wrn_40_2", num_classes=10)
    assert count_params(model) == 2_243_546


@pytest.mark.parametrize(
    "name, expected",
    [("bs811k", 811_370), ("bs556k", 555_962), ("bs404k", 404_250), ("bs289k", 289_226),
     ("bs217k", 217_050), ("bs162k", 162_202), ("bs1645k", 1_645_018), ("teacher", 2_243_546)],
)
def test_paper_genotype_params(paper_genotypes, name, expected):
    entry = paper_genotypes["cifar10_wrn_40_2"][name]
    assert entry["params"] == expected
    model = timm.create_model("wrn_40_2", num_classes=10, genotype=entry["genotype"])
    assert count_params(model) == expected


@pytest.mark.parametrize("name, depth, width", [("wrn_16_2", 16, 2), ("wrn_40_1", 40, 1), ("wrn_16_1", 16, 1)])
def test_baseline_params_match_paper(paper_genotypes, name, depth, width):
    printed_k = paper_genotypes["cifar10_baselines"][name]["params_k"]
    model = timm.create_model(name, num_classes=10)
    assert isinstance(model, WideResNet)
    assert (model.depth, model.widen_factor) == (depth, width)
    assert round(count_params(model) / 1000, 1) == printed_k


def test_paper_genotypes_in_space_tables(paper_genotypes):
    space, _ = create_space(timm.create_model("wrn_40_2", num_classes=10))
    for name, entry in paper_genotypes["cifar10_wrn_40_2"].items():
        assert space.count_params(entry["genotype"]) == entry["params"], name


def test_table_counts_equal_built_counts():
    space, build = create_space(timm.create_model("wrn_40_2", num_classes=10))
    rng = random.Random(123)
    for _ in range(6):
        blocks = [rng.choice(space.choices(i)) for i in range(len(space))]
        model = build(blocks)
        assert space.count_params(blocks) == count_params(model)
        assert space.count_macs(blocks) == count_macs(model, (1, 3, 32, 32))


def test_table_macs_follow_input_size():
    model = timm.create_model("wrn_16_1", num_classes=10)
    space, build = create_space(model, (3, 64, 64))
    blocks = ["DConvA2", "G4B2", "Conv", "ConvB2", "DConv", "A2B2"]
    assert space.count_macs(blocks) == count_macs(build(blocks), (1, 3, 64, 64))
    assert space.count_params(blocks) == count_params(build(blocks))


def test_param_range_bounds():
    space, build = create_space(timm.create_model("wrn_40_2", num_classes=10))
    low, high = space.param_range()
    assert high == 2_243_546
    smallest = [min(row, key=row.get) for row in space.params]
    assert count_params(build(smallest)) == low
