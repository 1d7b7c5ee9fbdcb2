"""Latency lookup table: its sums predict measured latency, it is cached, and latency budgets hold."""
import random

import pytest
import timm
import torch

import blockswap_plugin.timm  # noqa: F401  (registers wrn_*)
from blockswap_plugin import cli
from blockswap_plugin.core import latency
from blockswap_plugin.core.latency import load_or_build_latency_table, measure_best_latency
from blockswap_plugin.core.sampler import Budget
from blockswap_plugin.core.search import search
from blockswap_plugin.core.space import SwapSpace
from blockswap_plugin.timm.spaces import create_space

# A part of the pool keeps the table quick to measure: 6 sites x 8 types.
TYPES = ["Conv", "DConvA4", "DConvG8", "DConv", "ConvB2", "A4B2", "G8B2", "G4B4"]


@pytest.fixture(scope="module")
def wrn_table(tmp_path_factory):
    model = timm.create_model("wrn_16_2", num_classes=10)
    full, build = create_space(model, (3, 32, 32))
    space = SwapSpace(full.model_name, full.sites, full.build_block, full.fixed_params, full.fixed_macs,
                      full.input_size, block_types=TYPES)
    cache = tmp_path_factory.mktemp("latency")
    table = load_or_build_latency_table(space, model, batch_size=8, num_threads=1, cache_dir=cache, progress=False,
                                        build_candidate=build)
    return space, build, model, table, cache


def test_table_predicts_measured_latency(wrn_table):
    space, build, _, table, _ = wrn_table
    rng = random.Random(0)
    for _ in range(4):
        blocks = [rng.choice(space.choices(i)) for i in range(len(space))]
        # Timed as the table's calibration times whole networks: the fastest of a few built copies.
        measured = measure_best_latency(lambda: build(blocks), (8, 3, 32, 32), num_threads=1, min_run_time=0.2)
        assert table.predict(blocks) == pytest.approx(measured, rel=0.15), blocks


def test_table_is_read_from_cache(wrn_table, monkeypatch):
    space, build, model, table, cache = wrn_table

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(latency, "measure_latency", no_measuring)
    again = load_or_build_latency_table(space, model, batch_size=8, num_threads=1, cache_dir=cache, progress=False,
                                        build_candidate=build)
    assert again.rows == table.rows
    assert again.fixed_ms == table.fixed_ms
    assert again.scale == table.scale
    assert len(list(cache.iterdir())) == 1


def test_latency_budget_holds_in_search(wrn_table, cifar_batch, capsys):
    space, build, _, table, _ = wrn_table
    images, labels = cifar_batch
    limit = 0.8 * table.teacher_ms
    result = search(
        space, build, images[:32], labels[:32], 4, [Budget("latency_ms", limit, kind="max")], seed=0,
        progress=False, refine_top=0, workers=1, cost_tables={"latency_ms": table.cost_table()},
    )
    for candidate in result.candidates:
        assert candidate.costs["latency_ms"] <= limit
        assert candidate.costs["latency_ms"] == pytest.approx(table.predict(candidate.blocks), abs=1e-3)
    assert torch.isfinite(torch.tensor(result.best.score))
    # A "max" budget has no tolerance, so the result file records none.
    assert result.to_dict()["budgets"] == [{"metric": "latency_ms", "target": limit, "kind": "max"}]
    # The command's ranking shows the predicted latency of each candidate.
    cli._print_ranking(result, 2)
    lines = capsys.readouterr().out.splitlines()
    assert "ms (pred.)" in lines[2]
    assert f"{result.ranking()[0].costs['latency_ms']:.3f}" in lines[3]


def test_calibration_is_recorded(wrn_table):
    _, _, _, table, _ = wrn_table
    calibration = table.meta["calibration"]
    assert calibration["networks"] == latency.CALIBRATION_CANDIDATES + 1
    assert 0.2 <= table.scale <= 5.0
    # The sampler's table gives the same sums as predict().
    fixed, rows = table.cost_table()
    blocks = [next(iter(row)) for row in table.rows]
    assert fixed + sum(rows[i][name] for i, name in enumerate(blocks)) == pytest.approx(table.predict(blocks))


def test_fit_line_and_fallbacks():
    fixed, scale = latency._fit_line([(10.0, 7.0), (20.0, 12.0), (4.0, 4.0)])  # y = 2 + 0.5 x
    assert fixed == pytest.approx(2.0)
    assert scale == pytest.approx(0.5)
    assert latency._fit_line([(10.0, 7.0)]) == (-3.0, 1.0)
    assert latency._fit_line([(10.0, 7.0), (10.0, 9.0)]) == (-3.0, 1.0)  # no spread in x
    assert latency._fit_line([(1.0, 1.0), (2.0, 100.0)]) == (0.0, 1.0)  # scale 99: too noisy, plain sums
