"""BlockSwap search: sample in-budget genotypes, score each by Fisher potential, rank.

Every candidate is built fresh and initialised as in the BlockSwap paper
(:func:`~blockswap_plugin.core.init.init_paper_`), then scored on the same
minibatch. Which genotypes are drawn depends only on the seed, and candidate
``i`` is initialised from a seed derived from ``(seed, i)``, so a search is
reproducible.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .fisher import fisher_potential
from .genotype import Genotype
from .init import init_paper_
from .sampler import Budget, sample_genotypes
from .space import SwapSpace

__all__ = ["Candidate", "SearchResult", "candidate_seed", "score_candidate", "search"]

_logger = logging.getLogger(__name__)

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
        score: Fisher potential at initialisation.
    """

    index: int
    blocks: List[str]
    params: int
    macs: int
    score: float = float("nan")


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
        return Genotype(self.model, best.blocks, {"params": best.params, "macs": best.macs, "fisher_potential": best.score})

    def to_dict(self) -> Dict[str, Any]:
        best = self.best
        return {
            "model": self.model,
            "winner": {
                "model": self.model,
                "blocks": best.blocks,
                "params": best.params,
                "macs": best.macs,
                "fisher_potential": best.score,
                "index": best.index,
            },
            "budgets": [asdict(b) for b in self.budgets],
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
) -> float:
    """Build one candidate with the paper's initialisation and return its Fisher potential."""
    torch.manual_seed(seed)
    model = init_paper_(build_candidate(blocks))
    if device is not None:
        model = model.to(device)
    return fisher_potential(model, images, labels)


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
        device: Device to score on; the candidate builder's device when omitted.
        progress: Show a tqdm progress bar.
    """
    start = time.perf_counter()
    _logger.info(
        "search started: %s, %d candidates, budgets %s, seed %d",
        space.model_name, num_samples, ", ".join(f"{b.metric}={b.target:,.0f}" for b in budgets), seed,
    )
    genotypes = sample_genotypes(space, num_samples, budgets, seed)
    candidates = [
        Candidate(i, list(blocks), space.count_params(blocks), space.count_macs(blocks))
        for i, blocks in enumerate(genotypes)
    ]
    for candidate in tqdm(candidates, desc="scoring", unit="cand", disable=not progress):
        candidate.score = score_candidate(
            build_candidate, candidate.blocks, images, labels, candidate_seed(seed, candidate.index), device
        )
    result = SearchResult(space.model_name, candidates, list(budgets), seed, int(images.shape[0]))
    result.seconds = time.perf_counter() - start
    best = result.best
    _logger.info(
        "search finished in %.1f s: best candidate %d, Fisher potential %.4g, %d params, %d MACs",
        result.seconds, best.index, best.score, best.params, best.macs,
    )
    return result
