"""Fisher potential of a detector's backbone under the detector's own loss, and the search built on it.

Candidates are scored with the detector's training loss (the sum of every
``loss*`` term, as mmengine's ``parse_losses`` computes it) on one real
training minibatch, not with a classification proxy. This loss is the one
the student is trained on, and COCO images have no single class label to
feed a proxy head. Only the backbone changes between candidates. The neck and head
are built and initialised once, with the host's own initialisation, and
shared by every candidate, so score differences come from the backbone alone.
Each candidate backbone gets the BlockSwap paper's initialisation
(:func:`~blockswap_plugin.core.init.init_paper_`: He-normal convolutions,
BatchNorm gamma 1, beta 0), whatever ``zero_init_residual`` says, because
zeroed last norms make every score 0.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.errors import BlockSwapError
from ..core.fisher import BranchPoint, find_branch_points, fisher_from_activations
from ..core.init import init_paper_
from ..core.sampler import Budget, sample_genotypes
from ..core.search import Candidate, SearchResult, candidate_seed
from ..core.space import SwapSpace

__all__ = ["detector_fisher_potential", "search_detector"]


def _capture(points: List[BranchPoint], store: Dict[str, torch.Tensor]) -> list:
    """Register hooks that keep each branch output; the host gets a copy.

    mmdet blocks add the shortcut in place (``out += identity``), so the block
    receives a clone and the stored tensor stays the branch output.
    """
    handles = []
    for point in points:
        if point.where != "output":
            raise ValueError(f"mmdet branch points read module outputs, got where={point.where!r}")

        def hook(module, args, output, key=point.name):
            store[key] = output
            return output.clone()

        handles.append(point.module.register_forward_hook(hook))
    return handles


def detector_fisher_potential(
    detector: nn.Module,
    inputs: torch.Tensor,
    data_samples: list,
    points: Optional[List[BranchPoint]] = None,
) -> Dict[str, float]:
    """Return the Fisher potential of each backbone block under the detector's loss, keyed by block name.

    The detector runs once in train mode with every BatchNorm of the backbone
    in train mode (``norm_eval`` is overridden), in fp32, followed by one
    backward pass to the branch outputs. Parameter gradients are not computed.

    Args:
        detector (nn.Module): An mmdet detector with a ``backbone``.
        inputs (torch.Tensor): Preprocessed images (N x 3 x H x W).
        data_samples (list): The matching ``DetDataSample`` list with ground truth.
        points (list[BranchPoint], optional): Branch outputs to read; found in
            ``detector.backbone`` when omitted.

    Raises:
        BlockSwapError: If the backbone has no recognised residual block.
    """
    points = find_branch_points(detector.backbone) if points is None else points
    if not points:
        raise BlockSwapError(f"no residual blocks found in {type(detector.backbone).__name__}")
    store: Dict[str, torch.Tensor] = {}
    handles = _capture(points, store)
    try:
        detector.train()
        for module in detector.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.train()
        with torch.autocast(device_type=inputs.device.type, enabled=False), torch.enable_grad():
            losses = detector.loss(inputs.float(), data_samples)
            loss, _ = detector.parse_losses(losses)
            missing = [p.name for p in points if p.name not in store]
            if missing:
                raise BlockSwapError(f"blocks {missing} did not run in the forward pass; cannot score them")
            names = [p.name for p in points]
            grads = torch.autograd.grad(loss, [store[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for name, grad in zip(names, grads):
        # A block whose output does not reach the loss has a zero gradient.
        scores[name] = 0.0 if grad is None else float(fisher_from_activations(store[name].detach().float(), grad.float()).sum())
    return scores


def search_detector(
    detector: nn.Module,
    space: SwapSpace,
    build_backbone: Callable[[Sequence[str]], nn.Module],
    inputs: torch.Tensor,
    data_samples: list,
    num_samples: int,
    budgets: Sequence[Budget],
    seed: int = 0,
) -> SearchResult:
    """Sample in-budget backbone genotypes and rank them by Fisher potential under the detector's loss.

    ``detector`` is copied once; the copy keeps the detector's neck and head
    and receives each candidate backbone in turn. Candidate ``i`` is
    initialised from :func:`~blockswap_plugin.core.search.candidate_seed`, and
    the global random state is restored afterwards, so the search leaves the
    training run's random stream untouched.

    Args:
        detector (nn.Module): The detector whose backbone is searched (not modified).
        space (SwapSpace): Search space of the backbone.
        build_backbone (Callable): Builds a fresh backbone from block type names.
        inputs (torch.Tensor): Preprocessed minibatch images.
        data_samples (list): Their ``DetDataSample`` list.
        num_samples (int): Number of candidates.
        budgets (Sequence[Budget]): Budgets on the backbone every candidate meets.
        seed (int): Seed of sampling and initialisation. Defaults to 0.
    """
    start = time.perf_counter()
    genotypes = sample_genotypes(space, num_samples, budgets, seed)
    candidates = [
        Candidate(i, list(blocks), space.count_params(blocks), space.count_macs(blocks))
        for i, blocks in enumerate(genotypes)
    ]
    device = inputs.device
    cuda_devices = [device] if device.type == "cuda" else []
    report_every = max(1, len(candidates) // 10)
    with torch.random.fork_rng(devices=cuda_devices):
        # The neck and head get the host's initialisation once. The teacher's
        # backbone is swapped out first, so no pretrained backbone weights load.
        torch.manual_seed(seed)
        host = copy.deepcopy(detector)
        host.backbone = build_backbone(candidates[0].blocks)
        host.init_weights()
        host.to(device)
        buffers = {name: buf.detach().clone() for name, buf in host.named_buffers() if not name.startswith("backbone.")}

        for candidate in candidates:
            torch.manual_seed(candidate_seed(seed, candidate.index))
            host.backbone = init_paper_(build_backbone(candidate.blocks)).to(device)
            candidate.score = float(sum(detector_fisher_potential(host, inputs, data_samples).values()))
            # Restore neck and head statistics so every candidate meets the same host.
            with torch.no_grad():
                for name, buf in host.named_buffers():
                    if name in buffers:
                        buf.copy_(buffers[name])
            done = candidate.index + 1
            print_log(
                f"BlockSwap search: {done}/{len(candidates)} scored, candidate {candidate.index} "
                f"(its index in blockswap_search.json): {candidate.params:,} backbone params, "
                f"Fisher potential {candidate.score:.6g}",
                logger="current",
                level=logging.INFO if done % report_every == 0 or done == len(candidates) else logging.DEBUG,
            )
    result = SearchResult(space.model_name, candidates, list(budgets), seed, int(inputs.shape[0]))
    result.seconds = time.perf_counter() - start
    return result
