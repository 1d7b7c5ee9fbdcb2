"""Uniform sampling of in-budget genotypes from count tables, for budgets that rejection rarely meets.

Rejection sampling (:func:`~blockswap_plugin.core.sampler.sample_genotypes`)
draws one block type per site and keeps the genotype when it fits the budget.
For some spaces the budget band contains a tiny share of all genotypes (ResNet-50
at a quarter of its parameters accepts about one draw in 40,000), and
rejection needs millions of draws. This module draws from the same
distribution, uniform over the genotypes that meet every budget, without
that waste:

1. Round every per-site cost of one budget's metric to a grid of ``unit``.
2. Count, site by site, how many genotypes reach each rounded total.
3. Draw a total in the band with probability proportional to its count, then
   walk the sites backwards, picking each block type with probability
   proportional to the number of ways the remaining sites complete the total.
4. Check the exact costs against every budget and draw again when one fails
   (only genotypes whose rounded total sits at the band's edge can fail).

Counts are kept as floats, whose range (about 1e308) is far above the
largest count here (23 block types over ResNet-101's 33 sites, about 1e45).
The draw uses only ratios of counts, so float rounding does not bias it.
"""
from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence

import numpy as np

from .errors import BlockSwapError
from .sampler import Budget, CostTable, _metric_table, genotype_cost
from .space import SwapSpace

__all__ = ["sample_genotypes_counted"]

# Grid cells across the guiding budget's band; more cells mean fewer edge rejections.
_CELLS_PER_BAND = 100


def _guide(budgets: Sequence[Budget]) -> Budget:
    """Return the budget whose metric the count table follows: the first band budget, else the first."""
    for budget in budgets:
        if budget.kind == "band":
            return budget
    return budgets[0]


def sample_genotypes_counted(
    space: SwapSpace,
    num_samples: int,
    budgets: Sequence[Budget],
    seed: int = 0,
    tables: Optional[Mapping[str, CostTable]] = None,
    max_attempts: Optional[int] = None,
) -> List[List[str]]:
    """Draw ``num_samples`` genotypes uniformly from those that meet every budget.

    Args:
        space: Search space to sample from.
        num_samples: Number of genotypes to return.
        budgets: Budgets that all must hold; the first band budget guides the count table.
        seed: Seed of the draw; the same seed gives the same list.
        tables: Cost tables for metrics other than params and MACs, by metric name.
        max_attempts: Give up after this many drawn genotypes; ``100 * num_samples`` by default.

    Raises:
        BlockSwapError: If no genotype meets the guiding budget, or too few
            draws meet the other budgets.
    """
    if num_samples < 1:
        raise BlockSwapError(f"the number of samples must be at least 1, got {num_samples}")
    if not budgets:
        raise BlockSwapError("sample_genotypes_counted needs at least one budget")
    guide = _guide(budgets)
    fixed, rows = _metric_table(space, guide.metric, tables)
    low = guide.low if guide.kind == "band" else 0.0
    high = guide.high if guide.kind == "band" else guide.target
    unit = (high - low) / _CELLS_PER_BAND if guide.kind == "band" else guide.target / (10 * _CELLS_PER_BAND)
    choices = [space.choices(i) for i in range(len(space))]
    costs = [[int(round(rows[i][name] / unit)) for name in names] for i, names in enumerate(choices)]

    # counts[i][s] is the number of genotypes of the first i sites whose rounded cost totals s.
    counts = [np.ones(1)]
    for site_costs in costs:
        previous = counts[-1]
        current = np.zeros(len(previous) + max(site_costs))
        for cost in site_costs:
            current[cost:cost + len(previous)] += previous
        counts.append(current)
    # Rounding moves each site's cost by at most half a cell, so the band is widened by one cell per
    # site on each side. The exact check below rejects whatever the widening lets in.
    first = max(0, math.floor((low - fixed) / unit) - len(costs))
    last = min(len(counts[-1]) - 1, math.ceil((high - fixed) / unit) + len(costs))
    weights = np.zeros_like(counts[-1])
    if last >= first:
        weights[first:last + 1] = counts[-1][first:last + 1]
    if weights.sum() == 0:
        raise BlockSwapError(f"no genotype of {space.model_name} meets the budget {guide.describe()}")
    weights /= weights.sum()

    checks = [(budget, _metric_table(space, budget.metric, tables)) for budget in budgets]
    rng = np.random.default_rng(seed)
    max_attempts = max_attempts or 100 * num_samples
    accepted: List[List[str]] = []
    attempts = 0
    while len(accepted) < num_samples:
        if attempts >= max_attempts:
            raise BlockSwapError(
                f"only {len(accepted)} of {num_samples} genotypes met every budget after {attempts:,} draws "
                f"from the {guide.metric} count table; the other budgets are rarely met inside this one: "
                "loosen one of them"
            )
        attempts += 1
        total = int(rng.choice(len(weights), p=weights))
        genotype: List[str] = []
        for site in range(len(costs) - 1, -1, -1):
            previous = counts[site]
            ways = np.array([
                previous[total - cost] if 0 <= total - cost < len(previous) else 0.0 for cost in costs[site]
            ])
            pick = int(rng.choice(len(ways), p=ways / ways.sum()))
            genotype.append(choices[site][pick])
            total -= costs[site][pick]
        genotype.reverse()
        if all(budget.accepts(genotype_cost(table, genotype)) for budget, table in checks):
            accepted.append(genotype)
    return accepted
