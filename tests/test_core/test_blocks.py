"""The block pool: shapes, group semantics, names and aliases."""
import os

import pytest
import torch

from blockswap_plugin.core.blocks import (
    BottleneckBranch,
    GroupedSeparableConv,
    build_block,
    canonical_block_name,
    get_block_type,
    list_block_types,
)
from blockswap_plugin.core.genotype import Genotype
from blockswap_plugin.core.errors import BlockSwapError

EXPECTED_NAMES = [
    "Conv", "DConvA2", "DConvA4", "DConvA8", "DConvA16", "DConvG2", "DConvG4", "DConvG8", "DConvG16", "DConv",
    "ConvB2", "ConvB4", "A2B2", "A4B2", "A8B2", "A16B2", "G2B2", "G4B2", "G8B2", "G16B2", "G2B4", "G4B4", "G8B4",
]


def test_pool_has_every_paper_type():
    assert [t.name for t in list_block_types()] == EXPECTED_NAMES


@pytest.mark.parametrize("name", EXPECTED_NAMES)
@pytest.mark.parametrize("stride", [1, 2])
def test_block_output_shape(name, stride):
    block = build_block(name, 32, 64, stride)
    out = block(torch.randn(2, 32, 16, 16))
    assert out.shape == (2, 64, 16 // stride, 16 // stride)


def test_group_count_and_group_width():
    by_count = build_block("DConvA4", 32, 32)
    assert isinstance(by_count, GroupedSeparableConv)
    assert by_count.grouped.groups == 4
    by_width = build_block("DConvG8", 32, 32)
    assert by_width.grouped.groups == 32 // 8
    depthwise = build_block("DConv", 32, 64)
    assert depthwise.grouped.groups == 32


def test_bottleneck_widths_and_groups():
    b4 = build_block("ConvB4", 32, 64)
    assert isinstance(b4, BottleneckBranch)
    assert b4.conv.in_channels == 16
    assert b4.conv.groups == 1
    a8 = build_block("A8B2", 32, 64)
    assert a8.conv.in_channels == 32
    assert a8.conv.groups == 8
    g8 = build_block("G8B2", 32, 64)
    assert g8.conv.groups == 32 // 8
    g4b4 = build_block("G4B4", 32, 64)
    assert g4b4.conv.in_channels == 16
    assert g4b4.conv.groups == 16 // 4


@pytest.mark.parametrize(
    "alias, name",
    [("G(4)", "DConvA4"), ("G(N/8)", "DConvG8"), ("G(N)", "DConv"), ("B(2)", "ConvB2"),
     ("BG(2,M/16)", "G16B2"), ("BG(2, 4)", "A4B2"), ("S", "Conv"), ("dconva4", "DConvA4")],
)
def test_paper_names_are_aliases(alias, name):
    assert canonical_block_name(alias) == name
    assert get_block_type(alias).name == name


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match="DConvA4"):
        canonical_block_name("DConvA3")
    with pytest.raises(BlockSwapError, match="block 2 of 2 in the genotype.*'Nope'"):
        Genotype("wrn_40_2", ["Conv", "Nope"])


def test_indivisible_channels_rejected():
    with pytest.raises(ValueError, match="divisible by 16"):
        build_block("DConvA16", 24, 24)


def test_genotype_file_mode_is_not_private(tmp_path):
    path = tmp_path / "g.json"
    Genotype("wrn_40_2", ["Conv"]).save(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_genotype_json_round_trip(tmp_path):
    genotype = Genotype("wrn_40_2", ["G(4)", "ConvB2", "DConv"], {"params": 1})
    path = tmp_path / "g.json"
    genotype.save(path)
    loaded = Genotype.load(path)
    assert loaded == genotype
    assert loaded.blocks == ("DConvA4", "ConvB2", "DConv")
    assert loaded.meta == {"params": 1}


def test_genotype_loads_paper_entry(paper_genotypes):
    entry = paper_genotypes["cifar10_wrn_40_2"]["bs404k"]
    genotype = Genotype.from_dict(entry, model="wrn_40_2")
    assert list(genotype.blocks) == entry["genotype"]
