"""BlockSwap search: sample in-budget genotypes, score each by Fisher potential, rank.

Every candidate is built fresh and initialised as in the BlockSwap paper
(:func:`~blockswap_plugin.core.init.init_paper_`), then scored on the same
minibatch. Which genotypes are drawn depends only on the seed, and candidate
``i`` is initialised from a seed derived from ``(seed, i)``, so a search is
reproducible and its scores do not depend on how the work is split: over
local scoring threads (:mod:`~blockswap_plugin.core.workers`) or over
``torch.distributed`` ranks (:mod:`~blockswap_plugin.core.sharding`).

With a fast precision (:mod:`~blockswap_plugin.core.scoring`) the
``refine_top`` best candidates are scored again in exact fp32, and the exact
score replaces the fast one in the ranking. Rescoring goes on until the top
of the ranking has an exact score, so the winner's score is always exact.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import BlockSwapError
from .fisher import fisher_potential
from .genotype import Genotype
from .init import init_paper_
from .sampler import Budget, CostTable, genotype_cost, sample_genotypes
from .scoring import FisherScorer, resolve_precision
from .sharding import Shard, current_shard, gather_scores
from .space import SwapSpace
from .workers import check_num_workers, default_num_workers, score_indices

__all__ = ["Candidate", "SearchResult", "candidate_seed", "score_candidate", "search"]

_logger = logging.getLogger(__name__)

# Seeding torch's global generator and initialising from it must not
# interleave between scoring threads, or a candidate's weights would depend
# on the other threads' timing.
# NOTE: scoring itself runs outside the lock, so a candidate that draws random
# numbers in its forward pass (dropout in train mode) gets draws that depend
# on thread timing. The registered wide ResNets have none at their default
# drop rates of 0.
_INIT_LOCK = threading.Lock()

# Builds a fresh network for a list of canonical block names.
CandidateBuilder = Callable[[Sequence[str]], nn.Module]


@dataclass
class Candidate:
    """One scored candidate.

    Attributes:
        index: Position in the sampled list.
        blocks: Block type per site.
        params: Exact parameter count.
        macs: MACs at the space's reference input size.
        score: Fisher potential at initialisation used for ranking: the exact
            fp32 score where the candidate has one, else the fast score.
        scores: Every score computed, by precision (``{"bf16": ..., "exact": ...}``).
        costs: Costs from extra cost tables, such as ``latency_ms``.
    """

    index: int
    blocks: List[str]
    params: int
    macs: int
    score: float = float("nan")
    scores: Dict[str, float] = field(default_factory=dict)
    costs: Dict[str, float] = field(default_factory=dict)


@dataclass
class SearchResult:
    """Outcome of a search: every candidate in sample order, plus the settings.

    Attributes:
        model: Name of the searched model.
        candidates: All candidates in the order they were sampled.
        budgets: Budgets the candidates meet.
        seed: Search seed.
        batch_size: Minibatch size used for scoring.
        seconds: Wall time of sampling and scoring.
        extra: Further settings and figures, written into the JSON result.
    """

    model: str
    candidates: List[Candidate]
    budgets: List[Budget]
    seed: int
    batch_size: int
    seconds: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> List[Candidate]:
        """Candidates sorted by score, best first (ties keep sample order)."""
        return sorted(self.candidates, key=lambda c: (-c.score, c.index))

    @property
    def best(self) -> Candidate:
        return self.ranking()[0]

    def best_genotype(self) -> Genotype:
        best = self.best
        return Genotype(
            self.model, best.blocks,
            {"params": best.params, "macs": best.macs, "fisher_potential": best.score, **best.costs},
        )

    def to_dict(self) -> Dict[str, Any]:
        best = self.best
        return {
            "model": self.model,
            "winner": {
                "model": self.model,
                "blocks": best.blocks,
                "params": best.params,
                "macs": best.macs,
                **best.costs,
                "fisher_potential": best.score,
                "index": best.index,
            },
            "budgets": [b.to_dict() for b in self.budgets],
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": len(self.candidates),
            "seconds": round(self.seconds, 3),
            **self.extra,
            "candidates": [asdict(c) for c in self.candidates],
        }


def candidate_seed(seed: int, index: int) -> int:
    """Seed of candidate ``index``'s initialisation; independent of how the work is split."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 12_345) % (2**63 - 1)


def score_candidate(
    build_candidate: CandidateBuilder,
    blocks: Sequence[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    device: Optional[torch.device] = None,
    scorer: Optional[FisherScorer] = None,
) -> float:
    """Build one candidate with the paper's initialisation and return its Fisher potential.

    Args:
        build_candidate: Builds a fresh network from block names.
        blocks: Block type per site.
        images: The scoring minibatch (ignored when ``scorer`` is given).
        labels: Its class indices (ignored when ``scorer`` is given).
        seed: Seed of the initialisation (see :func:`candidate_seed`).
        device: Device to score on; the builder's device when omitted.
        scorer: Scores the built network; the exact fp32 reference when omitted.
    """
    with _INIT_LOCK:
        torch.manual_seed(seed)
        model = init_paper_(build_candidate(blocks))
    if scorer is not None:
        return scorer.score(model)
    if device is not None:
        model = model.to(device)
    return fisher_potential(model, images, labels)


def _make_candidates(
    space: SwapSpace, genotypes: Sequence[Sequence[str]], cost_tables: Mapping[str, CostTable]
) -> List[Candidate]:
    candidates = []
    for index, blocks in enumerate(genotypes):
        costs = {name: round(genotype_cost(table, blocks), 4) for name, table in cost_tables.items()}
        candidates.append(
            Candidate(index, list(blocks), space.count_params(blocks), space.count_macs(blocks), costs=costs)
        )
    return candidates


def _score_sharded(
    candidates: Sequence[Candidate],
    indices: Sequence[int],
    build_candidate: CandidateBuilder,
    scorer: FisherScorer,
    seed: int,
    shard: Shard,
    num_workers: int,
    num_threads: Optional[int],
    progress: bool,
    description: str,
    on_result: Optional[Callable[[int, float], None]],
) -> Dict[int, float]:
    """Score this rank's share of ``indices`` (in scoring threads) and gather every rank's scores."""
    local = shard.indices(indices)

    def score_one(index: int) -> float:
        return score_candidate(
            build_candidate, candidates[index].blocks, scorer.images, scorer.labels,
            candidate_seed(seed, index), scorer=scorer,
        )

    with tqdm(total=len(local), desc=description, unit="cand", disable=not progress) as bar:
        def report(index: int, score: float) -> None:
            bar.update(1)
            if on_result is not None:
                on_result(index, score)

        # Exact passes keep about 1.25 GB each (WRN-40-2), over the block
        # cache's limit, unless blocks are recomputed one candidate at a time.
        block_cache = scorer.precision != "exact" or scorer.recompute
        scores = score_indices(score_one, local, num_workers, num_threads, scorer.device, report,
                               block_cache=block_cache)
    return gather_scores(scores, shard)


def search(
    space: SwapSpace,
    build_candidate: CandidateBuilder,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int,
    budgets: Sequence[Budget],
    seed: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
    *,
    precision: str = "auto",
    refine_top: int = 8,
    workers: Optional[int] = None,
    cost_tables: Optional[Mapping[str, CostTable]] = None,
    on_result: Optional[Callable[[int, float], None]] = None,
    group: Optional[object] = None,
) -> SearchResult:
    """Sample ``num_samples`` in-budget genotypes, score each, and rank them.

    Args:
        space: Search space of the host model.
        build_candidate: Builds a fresh network from block names.
        images: The scoring minibatch (with training augmentation).
        labels: Its class indices.
        num_samples: Number of candidates.
        budgets: Budgets every candidate meets.
        seed: Seed of sampling and initialisation.
        device: Device to score on; the minibatch's device when omitted.
        progress: Show a tqdm progress bar.
        precision: ``"auto"``, ``"exact"``, ``"fp32"`` or ``"bf16"`` (see
            :mod:`~blockswap_plugin.core.scoring`).
        refine_top: With a precision other than ``"exact"``, score this many
            of the best candidates again in exact fp32 and pick the winner
            among them by exact score; 0 turns this off.
        workers: Candidates scored at once on this rank, each on one CPU
            thread; by default one per CPU core (shared among the ranks on the
            machine), 1 on accelerators. The exact rescoring runs one
            candidate at a time with this many intra-op threads on CPU.
        cost_tables: Extra per-site cost tables by metric name (for example
            ``{"latency_ms": table.cost_table()}``) that budgets may refer to.
        on_result: Called on this rank with ``(index, score)`` as each score arrives.
        group: ``torch.distributed`` process group to split candidates over;
            the default group when initialised, else none.

    Raises:
        BlockSwapError: On an unreachable budget or invalid settings.
    """
    start = time.perf_counter()
    check_num_workers(workers)
    if refine_top < 0:
        raise BlockSwapError(f"refine_top must be 0 or more, got {refine_top}")
    device = torch.device(device) if device is not None else images.device
    precision = resolve_precision(precision, device)
    cost_tables = dict(cost_tables or {})
    shard = current_shard(group)
    num_workers = workers or default_num_workers(device, shard.local_world_size)
    # One intra-op thread per candidate on CPU, whatever the worker count,
    # because bf16 scores moved by up to 10 % between one and two intra-op
    # threads in a measured run. Scores should depend on the seed alone.
    num_threads = 1 if device.type == "cpu" else None
    _logger.info(
        "search started: %s, %d candidates, budgets %s, seed %d, precision %s, rank %d of %d, "
        "%d worker(s) x %s thread(s)",
        space.model_name, num_samples, ", ".join(b.describe() for b in budgets), seed, precision,
        shard.rank, shard.world_size, num_workers, num_threads or "default",
    )

    genotypes = sample_genotypes(space, num_samples, budgets, seed, tables=cost_tables)
    candidates = _make_candidates(space, genotypes, cost_tables)
    common = dict(
        candidates=candidates, build_candidate=build_candidate, seed=seed, shard=shard,
        num_workers=num_workers, num_threads=num_threads, progress=progress and shard.rank == 0,
    )
    scorer = FisherScorer(images, labels, precision, device)
    scores = _score_sharded(
        indices=range(len(candidates)), scorer=scorer, description="scoring", on_result=on_result, **common
    )
    for candidate in candidates:
        candidate.score = scores[candidate.index]
        candidate.scores[precision] = candidate.score

    refined = 0
    if precision != "exact" and refine_top > 0:
        # Blocks run again in the backward pass: bit for bit the same scores,
        # with half the memory (1.25 against 0.61 GB for a WRN-40-2 candidate).
        exact = FisherScorer(images, labels, "exact", device, recompute=True)
        todo = [c.index for c in sorted(candidates, key=lambda c: (-c.score, c.index))[:refine_top]]
        # One candidate at a time, because an exact pass keeps several times the
        # memory of a bf16 pass. On CPU it gets this rank's cores as intra-op
        # threads instead (WRN-40-2, 2-core AMD EPYC: 1.2 against 2.0 s each).
        # NOTE: fp32 scores were the same bit for bit on 1 and 2 threads, measured
        # on that CPU only. The test of 1 against 2 ranks (2 and 1 threads) checks it.
        exact_threads = num_workers if device.type == "cpu" else None
        exact_common = dict(common, num_workers=1, num_threads=exact_threads)
        while todo:
            exact_scores = _score_sharded(
                indices=todo, scorer=exact, description="exact rescoring", on_result=None, **exact_common
            )
            for index, score in exact_scores.items():
                candidates[index].score = candidates[index].scores["exact"] = score
            refined += len(todo)
            # A candidate whose fast score now beats every exact score is rescored too.
            top = min(candidates, key=lambda c: (-c.score, c.index))
            todo = [] if "exact" in top.scores else [top.index]

    result = SearchResult(space.model_name, candidates, list(budgets), seed, int(images.shape[0]))
    result.extra.update(
        precision=precision, refined=refined, workers=num_workers, threads=num_threads,
        world_size=shard.world_size,
    )
    result.seconds = time.perf_counter() - start
    best = result.best
    _logger.info(
        "search finished in %.1f s: best candidate %d, Fisher potential %.4g, %s params, %s MACs",
        result.seconds, best.index, best.score, f"{best.params:,}", f"{best.macs:,}",
    )
    return result
