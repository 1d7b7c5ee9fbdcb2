"""Count-table sampling draws from the same distribution as rejection sampling (BlockSwap's own sampler)."""
from collections import Counter

import pytest
import timm

import blockswap_plugin.timm  # noqa: F401  (registers wrn_*)
from blockswap_plugin.core.counted_sampler import sample_genotypes_counted
from blockswap_plugin.core.errors import BlockSwapError
from blockswap_plugin.core.sampler import Budget, sample_genotypes
from blockswap_plugin.timm.spaces import create_space


@pytest.fixture(scope="module")
def space():
    return create_space(timm.create_model("wrn_16_2", num_classes=10), (3, 32, 32))[0]


def _site_frequencies(genotypes):
    counts = Counter((site, name) for genotype in genotypes for site, name in enumerate(genotype))
    return {key: value / len(genotypes) for key, value in counts.items()}


def test_counted_matches_rejection_frequencies(space):
    # About 2 % of uniform draws meet this budget, so rejection is cheap enough to compare against.
    budgets = [Budget("params", 172_918)]
    rejected = sample_genotypes(space, 3000, budgets, seed=1, method="rejection")
    counted = sample_genotypes(space, 3000, budgets, seed=2, method="counted")
    assert all(budgets[0].accepts(space.count_params(g)) for g in counted)
    rejection_freq = _site_frequencies(rejected)
    counted_freq = _site_frequencies(counted)
    keys = set(rejection_freq) | set(counted_freq)
    # One block type's share at one site is about 0.04 with a standard error near 0.004 per sample set.
    worst = max(abs(rejection_freq.get(k, 0.0) - counted_freq.get(k, 0.0)) for k in keys)
    assert worst < 0.03


def test_counted_honours_every_budget(space):
    budgets = [Budget("params", 172_918), Budget("macs", 30e6, kind="max")]
    genotypes = sample_genotypes_counted(space, 200, budgets, seed=0)
    assert all(budgets[0].accepts(space.count_params(g)) for g in genotypes)
    assert all(space.count_macs(g) <= 30e6 for g in genotypes)


def test_counted_is_deterministic(space):
    budgets = [Budget("params", 300_000)]
    first = sample_genotypes(space, 20, budgets, seed=4, method="counted")
    second = sample_genotypes(space, 20, budgets, seed=4, method="counted")
    assert first == second


def test_auto_switches_on_rare_budget(space, caplog):
    # Near the largest reachable size uniform draws almost never fit; auto must still return the list.
    high = space.fixed_params + sum(max(row.values()) for row in space.params)
    budgets = [Budget("params", high * 0.98)]
    with caplog.at_level("INFO", logger="blockswap_plugin.core.sampler"):
        genotypes = sample_genotypes(space, 30, budgets, seed=0)
    assert "count tables" in caplog.text
    assert len(genotypes) == 30
    assert all(budgets[0].accepts(space.count_params(g)) for g in genotypes)


def test_bad_method_is_named(space):
    with pytest.raises(BlockSwapError, match="'fast'"):
        sample_genotypes(space, 2, [Budget("params", 172_918)], method="fast")
