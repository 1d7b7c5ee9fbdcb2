"""Fast Fisher scoring (activation gradients only, channels-last, bf16) against the exact fp32 reference."""
import pytest
import timm
import torch

import blockswap_plugin.timm  # noqa: F401  (registers wrn_* and the timm ResNet locator)
from blockswap_plugin.core.errors import BlockSwapError
from blockswap_plugin.core.fisher import fisher_potential
from blockswap_plugin.core.init import init_paper_
from blockswap_plugin.core.sampler import Budget, sample_genotypes
from blockswap_plugin.core.scoring import FisherScorer, bf16_supported, resolve_precision, spearman
from blockswap_plugin.core.search import candidate_seed, search
from blockswap_plugin.timm.spaces import create_space


def wrn_16_2_space():
    model = timm.create_model("wrn_16_2", num_classes=10)
    return create_space(model, (3, 32, 32))


def fresh(build, blocks, index):
    torch.manual_seed(candidate_seed(0, index))
    return init_paper_(build(blocks))


def test_fp32_fast_path_matches_exact(cifar_batch):
    images, labels = cifar_batch
    space, build = wrn_16_2_space()
    genotypes = sample_genotypes(space, 4, [Budget("params", 150_000)], seed=1)
    scorer = FisherScorer(images, labels, "fp32")
    for index, blocks in enumerate(genotypes):
        exact = fisher_potential(fresh(build, blocks, index), images, labels)
        fast = scorer.score(fresh(build, blocks, index))
        assert exact > 0
        # Channels-last convolutions round differently; the score amplifies that a little.
        assert fast == pytest.approx(exact, rel=2e-3), blocks


def test_fast_path_copies_inplace_shortcut(cifar_batch):
    # timm's BasicBlock adds the shortcut in place (x += shortcut) after the
    # branch output is read, so the scorer must notice and read copies.
    images, labels = cifar_batch
    torch.manual_seed(0)
    model = init_paper_(timm.create_model("resnet18", num_classes=10))
    exact = fisher_potential(model, images[:32], labels[:32])
    fast = FisherScorer(images[:32], labels[:32], "fp32").score(model)
    assert exact > 0
    assert fast == pytest.approx(exact, rel=1e-4)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_ranks_like_exact(cifar_batch):
    images, labels = cifar_batch
    space, build = wrn_16_2_space()
    genotypes = sample_genotypes(space, 8, [Budget("params", 150_000)], seed=2)
    bf16 = FisherScorer(images, labels, "bf16")
    exact, fast = [], []
    for index, blocks in enumerate(genotypes):
        exact.append(fisher_potential(fresh(build, blocks, index), images, labels))
        fast.append(bf16.score(fresh(build, blocks, index)))
    for e, f in zip(exact, fast):
        assert f == pytest.approx(e, rel=0.25)
    assert spearman(fast, exact) >= 0.9


def test_resolve_precision_rejects_unknown():
    with pytest.raises(BlockSwapError, match="'half'"):
        resolve_precision("half", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert resolve_precision("exact", torch.device("cpu")) == "exact"


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


@pytest.mark.slow
@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_agrees_with_exact_over_200_candidates(cifar_batch):
    # The condition for bf16 being the default: same winner, Spearman >= 0.99.
    images, labels = cifar_batch
    model = timm.create_model("wrn_40_2", num_classes=10)
    space, build = create_space(model, (3, 32, 32))
    budgets = [Budget("params", 400_000)]
    fast = search(space, build, images, labels, 200, budgets, seed=0, progress=False, precision="bf16")
    exact = search(space, build, images, labels, 200, budgets, seed=0, progress=False, precision="exact")
    fast_scores = [c.scores["bf16"] for c in fast.candidates]
    exact_scores = [c.score for c in exact.candidates]
    assert spearman(fast_scores, exact_scores) >= 0.99
    assert fast.best.index == exact.best.index
    assert fast.best.score == exact.best.score
