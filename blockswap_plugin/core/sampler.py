"""Budget-constrained sampling of genotypes.

Each candidate draws one block type per site, uniformly and independently,
and is kept only if every budget holds. A ``"band"`` budget holds when the
cost lies strictly inside ``target * (1 - tolerance)`` and
``target * (1 + tolerance)``; a ``"max"`` budget holds when the cost is at most
``target``. Parameter and MAC costs come from the space's tables; other
metrics (measured latency) come from cost tables passed in by the caller. The
candidate list depends only on the space, the budgets, the cost tables and the seed.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import BlockSwapError
from .space import SwapSpace

__all__ = [
    "Budget", "CostTable", "SAMPLING_METHODS", "check_budgets", "genotype_cost", "metric_unit", "sample_genotypes",
]

_logger = logging.getLogger(__name__)

# (cost outside the sites, one {block type: cost} row per site); the cost of a
# genotype is the fixed part plus one entry per site.
CostTable = Tuple[float, List[Dict[str, float]]]
BUDGET_KINDS = ("band", "max")
SAMPLING_METHODS = ("auto", "rejection", "counted")


@dataclass(frozen=True)
class Budget:
    """A target cost with a relative tolerance.

    Attributes:
        metric: ``"params"``, ``"macs"``, or the name of a cost table passed
            to the sampler (``"latency_ms"``).
        target: Target value (parameters, MACs, milliseconds).
        tolerance: Relative half-width of the accepted band (0.025 is +-2.5 %).
        kind: ``"band"`` (inside target +- tolerance) or ``"max"`` (at most target).
    """

    metric: str
    target: float
    tolerance: float = 0.025
    kind: str = "band"

    @property
    def low(self) -> float:
        return self.target * (1.0 - self.tolerance)

    @property
    def high(self) -> float:
        return self.target * (1.0 + self.tolerance)

    def accepts(self, value: float) -> bool:
        if self.kind == "max":
            return value <= self.target
        return self.low < value < self.high

    def to_dict(self) -> Dict[str, object]:
        """Return the budget as JSON data, without a tolerance for a ``"max"`` budget (where none applies)."""
        data: Dict[str, object] = {"metric": self.metric, "target": self.target, "kind": self.kind}
        if self.kind == "band":
            data["tolerance"] = self.tolerance
        return data

    def describe(self) -> str:
        """Short text such as ``params=400,000+-2.5%`` or ``latency_ms<=5``."""
        target = f"{self.target:,.0f}" if self.target >= 1000 else f"{self.target:.6g}"
        if self.kind == "max":
            return f"{self.metric}<={target}"
        return f"{self.metric}={target}+-{self.tolerance:.1%}"


def _metric_table(
    space: SwapSpace, metric: str, tables: Optional[Mapping[str, CostTable]] = None
) -> CostTable:
    if tables and metric in tables:
        return tables[metric]
    if metric == "params":
        return space.fixed_params, space.params
    if metric == "macs":
        return space.fixed_macs, space.macs
    known = ["params", "macs", *(tables or {})]
    raise BlockSwapError(f"unknown budget metric {metric!r}; use one of {', '.join(known)}")


def _format_cost(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.4g}"


# Name and unit that messages print for a metric; other metrics print their key for both.
_METRIC_WORDS = {"params": ("params", "params"), "macs": ("MACs", "MACs"), "latency_ms": ("latency", "ms")}


def metric_unit(metric: str) -> str:
    """Return the unit printed after a cost of ``metric`` (``"ms"`` for ``"latency_ms"``)."""
    return _METRIC_WORDS.get(metric, (metric, metric))[1]


def _metric_name(metric: str) -> str:
    return _METRIC_WORDS.get(metric, (metric, metric))[0]


def genotype_cost(table: CostTable, genotype: Sequence[str]) -> float:
    """Cost of a genotype under a cost table: the fixed part plus one entry per site."""
    fixed, rows = table
    return fixed + sum(rows[i][name] for i, name in enumerate(genotype))


def check_budgets(
    space: SwapSpace, budgets: Sequence[Budget], tables: Optional[Mapping[str, CostTable]] = None
) -> None:
    """Reject budgets that no genotype of ``space`` can meet, naming the reachable range.

    Args:
        space: Search space.
        budgets: Budgets to check.
        tables: Cost tables for metrics other than params and MACs.

    Raises:
        BlockSwapError: If a budget lies outside the reachable range, its kind
            is unknown, or the tolerance is not in (0, 1).
    """
    for budget in budgets:
        if budget.kind not in BUDGET_KINDS:
            raise BlockSwapError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {budget.kind!r}")
        if not 0 < budget.tolerance < 1:
            raise BlockSwapError(f"tolerance must be in (0, 1), got {budget.tolerance}; 0.025 means +-2.5 %")
        if budget.target <= 0:
            raise BlockSwapError(f"{budget.metric} budget must be positive, got {budget.target:g}")
        fixed, table = _metric_table(space, budget.metric, tables)
        low = fixed + sum(min(row.values()) for row in table)
        high = fixed + sum(max(row.values()) for row in table)
        if budget.kind == "max":
            unreachable = budget.target < low
        else:
            unreachable = budget.high <= low or budget.low >= high
        if unreachable:
            bound = "at most " if budget.kind == "max" else ""
            band = "" if budget.kind == "max" else f" (+-{budget.tolerance:.1%})"
            # "latency budget at most 0.5 ms", but "params budget 1,000", without the name twice.
            name, unit = _metric_name(budget.metric), metric_unit(budget.metric)
            target = _format_cost(budget.target) + ("" if unit == name else f" {unit}")
            raise BlockSwapError(
                f"{name} budget {bound}{target}{band} cannot be met by "
                f"{space.model_name}: genotypes reach {_format_cost(low)} to {_format_cost(high)} "
                f"{unit}; choose a budget inside that range"
            )


def sample_genotypes(
    space: SwapSpace,
    num_samples: int,
    budgets: Sequence[Budget],
    seed: int = 0,
    max_draws: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    tables: Optional[Mapping[str, CostTable]] = None,
    method: str = "auto",
) -> List[List[str]]:
    """Draw ``num_samples`` genotypes that meet every budget.

    Both methods draw uniformly from the genotypes that meet every budget.
    ``"rejection"`` is the paper's: one uniform block type per site, kept when
    every budget is met. ``"counted"`` draws from count tables
    (:mod:`~blockswap_plugin.core.counted_sampler`) and wastes no draws on
    rare budgets. ``"auto"`` rejects first and, when fewer than one draw in
    500 is accepted, draws the whole list from count tables instead.

    Args:
        space: Search space to sample from.
        num_samples: Number of accepted genotypes to return.
        budgets: Budgets that all must hold.
        seed: Seed of the draw; the same seed gives the same list.
        max_draws: With ``"rejection"``, give up after this many draws; ``2000 * num_samples`` by default.
        progress: Called with 1 for every genotype that rejection sampling accepts.
        tables: Cost tables for metrics other than params and MACs, by metric name.
        method: ``"auto"``, ``"rejection"`` or ``"counted"``.

    Raises:
        BlockSwapError: If a budget is unreachable or too few draws are accepted.
    """
    if num_samples < 1:
        raise BlockSwapError(f"the number of samples must be at least 1, got {num_samples}")
    if method not in SAMPLING_METHODS:
        raise BlockSwapError(f"sampling method must be one of {', '.join(SAMPLING_METHODS)}, got {method!r}")
    check_budgets(space, budgets, tables)
    if method == "counted":
        return _counted(space, num_samples, budgets, seed, tables)
    if method == "auto" and max_draws is None:
        max_draws = max(50_000, 500 * num_samples)
    rng = random.Random(seed)
    choices = [space.choices(i) for i in range(len(space))]
    checks = [(budget, _metric_table(space, budget.metric, tables)) for budget in budgets]
    max_draws = max_draws or 2000 * num_samples
    accepted: List[List[str]] = []
    draws = 0
    while len(accepted) < num_samples:
        if draws >= max_draws and method == "auto":
            _logger.info(
                "rejection sampling accepted %d of %d draws; drawing from count tables instead", len(accepted), draws
            )
            return _counted(space, num_samples, budgets, seed, tables)
        if draws >= max_draws:
            raise BlockSwapError(
                f"only {len(accepted)} of {num_samples} genotypes met the budget after {draws:,} random draws; "
                "the budget is reachable but rare under uniform sampling: move it towards the middle of "
                "the reachable range or raise the tolerance"
            )
        draws += 1
        genotype = [rng.choice(options) for options in choices]
        if all(budget.accepts(genotype_cost(table, genotype)) for budget, table in checks):
            accepted.append(genotype)
            if progress is not None:
                progress(1)
    _logger.info("sampled %d genotypes in %d random draws (acceptance %.2g %%)", num_samples, draws, 100.0 * num_samples / draws)
    return accepted


def _counted(space, num_samples, budgets, seed, tables) -> List[List[str]]:
    # Imported here because counted_sampler builds on this module's tables.
    from .counted_sampler import sample_genotypes_counted

    genotypes = sample_genotypes_counted(space, num_samples, budgets, seed, tables)
    _logger.info("sampled %d genotypes from count tables", num_samples)
    return genotypes
