"""Budget-constrained sampling of genotypes.

Each candidate draws one block type per site, uniformly and independently,
and is kept only if every budget holds: its cost lies strictly inside
``budget * (1 - tolerance)`` and ``budget * (1 + tolerance)``. The candidate
list depends only on the space, the budgets and the seed.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import BlockSwapError
from .space import SwapSpace

__all__ = ["Budget", "sample_genotypes"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """A target cost with a relative tolerance.

    Attributes:
        metric: ``"params"`` or ``"macs"``.
        target: Target value (parameters or MACs).
        tolerance: Relative half-width of the accepted band (0.025 is +-2.5 %).
    """

    metric: str
    target: float
    tolerance: float = 0.025

    @property
    def low(self) -> float:
        return self.target * (1.0 - self.tolerance)

    @property
    def high(self) -> float:
        return self.target * (1.0 + self.tolerance)

    def accepts(self, value: float) -> bool:
        return self.low < value < self.high


def _metric_table(space: SwapSpace, metric: str) -> Tuple[int, List[Dict[str, int]]]:
    if metric == "params":
        return space.fixed_params, space.params
    if metric == "macs":
        return space.fixed_macs, space.macs
    raise BlockSwapError(f"unknown budget metric {metric!r}; use 'params' or 'macs'")


def check_budgets(space: SwapSpace, budgets: Sequence[Budget]) -> None:
    """Reject budgets that no genotype of ``space`` can meet, naming the reachable range.

    Raises:
        BlockSwapError: If a budget band lies outside the reachable range or
            the tolerance is not in (0, 1).
    """
    for budget in budgets:
        if not 0 < budget.tolerance < 1:
            raise BlockSwapError(f"tolerance must be in (0, 1), got {budget.tolerance}; 0.025 means +-2.5 %")
        if budget.target <= 0:
            raise BlockSwapError(f"{budget.metric} budget must be positive, got {budget.target:g}")
        fixed, table = _metric_table(space, budget.metric)
        low = fixed + sum(min(row.values()) for row in table)
        high = fixed + sum(max(row.values()) for row in table)
        if budget.high <= low or budget.low >= high:
            raise BlockSwapError(
                f"{budget.metric} budget {budget.target:,.0f} (+-{budget.tolerance:.1%}) cannot be met by "
                f"{space.model_name}: genotypes reach {low:,} to {high:,} {budget.metric}; "
                "choose a budget inside that range"
            )


def sample_genotypes(
    space: SwapSpace,
    num_samples: int,
    budgets: Sequence[Budget],
    seed: int = 0,
    max_draws: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> List[List[str]]:
    """Draw ``num_samples`` genotypes that meet every budget.

    Args:
        space: Search space to sample from.
        num_samples: Number of accepted genotypes to return.
        budgets: Budgets that all must hold.
        seed: Seed of the draw; the same seed gives the same list.
        max_draws: Give up after this many draws; ``2000 * num_samples`` by default.
        progress: Called with 1 for every accepted genotype.

    Raises:
        BlockSwapError: If a budget is unreachable or too few draws are accepted.
    """
    if num_samples < 1:
        raise BlockSwapError(f"the number of samples must be at least 1, got {num_samples}")
    check_budgets(space, budgets)
    rng = random.Random(seed)
    choices = [space.choices(i) for i in range(len(space))]
    tables = [(budget, *_metric_table(space, budget.metric)) for budget in budgets]
    max_draws = max_draws or 2000 * num_samples
    accepted: List[List[str]] = []
    draws = 0
    while len(accepted) < num_samples:
        if draws >= max_draws:
            raise BlockSwapError(
                f"only {len(accepted)} of {num_samples} genotypes met the budget after {draws:,} random draws; "
                "the budget is reachable but rare under uniform sampling: move it towards the middle of "
                "the reachable range or raise the tolerance"
            )
        draws += 1
        genotype = [rng.choice(options) for options in choices]
        if all(
            budget.accepts(fixed + sum(table[i][name] for i, name in enumerate(genotype)))
            for budget, fixed, table in tables
        ):
            accepted.append(genotype)
            if progress is not None:
                progress(1)
    _logger.info("sampled %d genotypes in %d draws (acceptance %.1f %%)", num_samples, draws, 100.0 * num_samples / draws)
    return accepted
