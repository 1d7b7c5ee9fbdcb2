"""The search loop: scoring threads, exact rescoring of the top, budgets from cost tables, errors."""
import gc
import threading

import pytest
import timm
import torch

import blockswap_plugin.timm  # noqa: F401  (registers wrn_*)
from blockswap_plugin.core.errors import BlockSwapError
from blockswap_plugin.core.sampler import Budget, check_budgets, genotype_cost, sample_genotypes
from blockswap_plugin.core.search import candidate_seed, score_candidate, search
from blockswap_plugin.core.workers import score_indices
from blockswap_plugin.timm.spaces import create_space

BUDGET = [Budget("params", 150_000)]


@pytest.fixture(scope="module")
def space_and_builder():
    model = timm.create_model("wrn_16_2", num_classes=10)
    return create_space(model, (3, 32, 32))


def test_winner_score_is_exact(space_and_builder, cifar_batch):
    space, build = space_and_builder
    images, labels = cifar_batch
    result = search(space, build, images, labels, 6, BUDGET, seed=3, progress=False, refine_top=2, workers=2)
    best = result.best
    reference = score_candidate(build, best.blocks, images, labels, candidate_seed(3, best.index))
    assert best.score == reference
    assert best.scores["exact"] == reference
    assert sum("exact" in c.scores for c in result.candidates) >= 2
    assert max(c.score for c in result.candidates) == best.score
    assert result.extra["workers"] == 2


def test_workers_do_not_change_scores(space_and_builder, cifar_batch):
    space, build = space_and_builder
    images, labels = cifar_batch
    kwargs = dict(progress=False, precision="auto", refine_top=0)
    two = search(space, build, images, labels, 4, BUDGET, seed=5, workers=2, **kwargs)
    one = search(space, build, images, labels, 4, BUDGET, seed=5, workers=1, **kwargs)
    assert [c.blocks for c in one.candidates] == [c.blocks for c in two.candidates]
    assert [c.score for c in one.candidates] == [c.score for c in two.candidates]
    assert one.extra["threads"] == two.extra["threads"] == 1


def test_worker_error_is_raised(space_and_builder, cifar_batch):
    space, _ = space_and_builder
    images, labels = cifar_batch

    def broken_builder(blocks):
        raise ValueError("cannot build this candidate")

    with pytest.raises(RuntimeError, match="cannot build this candidate"):
        search(space, broken_builder, images, labels, 3, BUDGET, progress=False, workers=2)


def test_scoring_threads_report_in_the_calling_thread():
    caller = threading.get_ident()
    threads_before = torch.get_num_threads()
    seen = []
    scores = score_indices(lambda i: 2.0 * i, range(7), num_workers=2, num_threads=1,
                           on_result=lambda i, s: seen.append((threading.get_ident(), i, s)))
    assert scores == {i: 2.0 * i for i in range(7)}
    assert sorted(i for _, i, _ in seen) == list(range(7))
    assert {thread for thread, _, _ in seen} == {caller}
    assert torch.get_num_threads() == threads_before


def test_scoring_thread_error_names_the_candidate():
    def score_one(index):
        if index == 3:
            raise ValueError("no such block")
        return 1.0

    with pytest.raises(RuntimeError, match="candidate 3 failed: ValueError: no such block"):
        score_indices(score_one, range(20), num_workers=2)


def test_invalid_settings_raise(space_and_builder, cifar_batch):
    space, build = space_and_builder
    images, labels = cifar_batch
    with pytest.raises(BlockSwapError, match="workers"):
        search(space, build, images, labels, 2, BUDGET, progress=False, workers=0)
    with pytest.raises(BlockSwapError, match="refine_top"):
        search(space, build, images, labels, 2, BUDGET, progress=False, refine_top=-1)
    with pytest.raises(BlockSwapError, match="'fp8'"):
        search(space, build, images, labels, 2, BUDGET, progress=False, precision="fp8")


def test_cost_table_budget_combines(space_and_builder):
    space, _ = space_and_builder
    # A made-up cost table: every block type costs 1 except Conv, which costs 3.
    table = (0.0, [{name: 3.0 if name == "Conv" else 1.0 for name in space.choices(i)} for i in range(len(space))])
    budgets = [Budget("params", 300_000, 0.2), Budget("units", 8.0, kind="max")]
    genotypes = sample_genotypes(space, 20, budgets, seed=0, tables={"units": table})
    for blocks in genotypes:
        assert genotype_cost(table, blocks) <= 8.0
        assert budgets[0].accepts(space.count_params(blocks))


def test_unreachable_max_budget_names_range(space_and_builder):
    space, _ = space_and_builder
    table = (2.0, [{name: 1.0 for name in space.choices(i)} for i in range(len(space))])
    with pytest.raises(BlockSwapError, match="at most 5 cannot be met.*8 to 8 units;"):
        check_budgets(space, [Budget("units", 5.0, kind="max")], tables={"units": table})
    # Latency is printed as a latency in milliseconds, not under the metric's key.
    with pytest.raises(BlockSwapError, match="latency budget at most 5 ms cannot be met.*8 to 8 ms;"):
        check_budgets(space, [Budget("latency_ms", 5.0, kind="max")], tables={"latency_ms": table})
    with pytest.raises(BlockSwapError, match="unknown budget metric 'latency_ms'"):
        check_budgets(space, [Budget("latency_ms", 5.0, kind="max")])


def test_result_json_has_all_scores(space_and_builder, cifar_batch):
    space, build = space_and_builder
    images, labels = cifar_batch
    result = search(space, build, images, labels, 3, BUDGET, seed=1, progress=False, refine_top=1, workers=1)
    data = result.to_dict()
    assert data["winner"]["fisher_potential"] == result.best.score
    assert data["precision"] in ("bf16", "fp32")
    assert all(data["precision"] in c["scores"] for c in data["candidates"])
    assert torch.isfinite(torch.tensor([c["score"] for c in data["candidates"]])).all()


def test_scoring_freezes_heap_while_running():
    frozen_before = gc.get_freeze_count()
    assert frozen_before == 0
    during = []

    def score_one(index):
        during.append(gc.get_freeze_count())
        return float(index)

    scores = score_indices(score_one, range(4), num_workers=2)
    assert scores == {i: float(i) for i in range(4)}
    # Everything alive when scoring started was in the permanent generation.
    assert min(during) > frozen_before
    assert gc.get_freeze_count() == frozen_before

    def fail(index):
        raise ValueError("boom")

    with pytest.raises(RuntimeError):
        score_indices(fail, range(2), num_workers=1)
    assert gc.get_freeze_count() == frozen_before


def test_scoring_keeps_caller_frozen_heap():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert score_indices(lambda i: float(i), range(3), num_workers=2) == {0: 0.0, 1: 1.0, 2: 2.0}
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
