"""Fisher potential (BlockSwap's candidate score) of a network at one minibatch.

For each residual block, with ``a`` the output of the block's residual branch
before the residual addition (N x C x H x W) and ``g`` the gradient of the mean
cross-entropy loss with respect to ``a``::

    Delta_c = 1 / (2N) * sum_n ( sum_{h,w} a[n,c,h,w] * g[n,c,h,w] ) ** 2

A block's score is the sum over its channels and the network's Fisher potential
is the sum over its blocks. Where the branch output sits depends on the host
network, so hosts register a *branch locator*; blocks built by this package
mark the spot with a :class:`BranchTap` module. This module does not
initialise or rebuild anything: it scores the model it is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import BlockSwapError

__all__ = [
    "BranchTap",
    "BranchPoint",
    "register_branch_locator",
    "find_branch_points",
    "fisher_potential",
    "fisher_potential_per_block",
    "fisher_from_activations",
]


class BranchTap(nn.Identity):
    """Identity module placed at the output of a residual branch, before the addition.

    :func:`fisher_potential` reads the activation and its gradient here.
    """


@dataclass(frozen=True)
class BranchPoint:
    """Where to read one block's branch output.

    Attributes:
        name: Name of the block, used as the key of per-block scores.
        module: Module whose output (``where == "output"``) or first positional
            input (``where == "input"``) is the branch output.
        where: ``"output"`` or ``"input"``.
    """

    name: str
    module: nn.Module
    where: str = "output"


# A locator takes (block name, block module) and returns a BranchPoint when it
# recognises the block, else None.
BranchLocator = Callable[[str, nn.Module], Optional[BranchPoint]]
_LOCATORS: List[BranchLocator] = []


def register_branch_locator(locator: BranchLocator) -> BranchLocator:
    """Register a function that finds the branch output of a host library's block type."""
    if locator not in _LOCATORS:
        _LOCATORS.append(locator)
    return locator


def _tap_locator(name: str, module: nn.Module) -> Optional[BranchPoint]:
    taps = [(n, m) for n, m in module.named_children() if isinstance(m, BranchTap)]
    if len(taps) == 1:
        return BranchPoint(name, taps[0][1], "output")
    return None


register_branch_locator(_tap_locator)


def find_branch_points(model: nn.Module) -> List[BranchPoint]:
    """Return the branch point of every residual block in ``model``, in module order.

    A block recognised by a locator is not searched further, so blocks nested
    inside a recognised block are not counted twice.
    """
    points: List[BranchPoint] = []
    skip_prefixes: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        for locator in _LOCATORS:
            point = locator(name, module)
            if point is not None:
                points.append(point)
                skip_prefixes.append(name + "." if name else "")
                break
    return points


def fisher_from_activations(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Return the per-channel Fisher terms ``Delta_c`` (a tensor of shape C).

    Args:
        activation: Branch output, N x C x H x W (or N x C x L).
        gradient: Gradient of the loss with respect to ``activation``, same shape.
    """
    batch = activation.shape[0]
    per_sample = (activation * gradient).flatten(2).sum(-1)
    return per_sample.pow(2).sum(0) / (2 * batch)


def _capture_hooks(points: List[BranchPoint], store: Dict[str, torch.Tensor]):
    handles = []
    for point in points:
        # The stored activation and the tensor handed on to the host are two
        # clones, so the host's in-place shortcut addition (timm's
        # ``x += shortcut``) changes only the second. The gradient reaches the
        # stored one through the second clone unchanged.
        if point.where == "output":
            def hook(module, args, output, key=point.name):
                kept = output.clone()
                # The first call wins: a recomputed block (``recompute=True``)
                # runs its hooks again during the backward pass.
                store.setdefault(key, kept)
                return kept.clone()

            handles.append(point.module.register_forward_hook(hook))
        elif point.where == "input":
            def pre_hook(module, args, key=point.name):
                kept = args[0].clone()
                store.setdefault(key, kept)
                return (kept.clone(), *args[1:])

            handles.append(point.module.register_forward_pre_hook(pre_hook))
        else:
            raise ValueError(f"BranchPoint.where must be 'output' or 'input', got {point.where!r}")
    return handles


def _snapshot_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, bool]]:
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    modes = {name: module.training for name, module in model.named_modules()}
    return buffers, modes


def _restore_state(model: nn.Module, buffers: Dict[str, torch.Tensor], modes: Dict[str, bool]) -> None:
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    for name, module in model.named_modules():
        module.training = modes[name]


def fisher_potential_per_block(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    points: Optional[List[BranchPoint]] = None,
    recompute: bool = False,
) -> Dict[str, float]:
    """Return each block's Fisher potential for one minibatch, keyed by block name.

    The model is scored as given (no re-initialisation) in fp32 with every
    module in train mode, as the method prescribes. Module modes and buffers
    (BatchNorm running statistics) are restored afterwards; parameter gradients
    are not touched because only activation gradients are computed.

    Args:
        model: Network whose blocks are recognised by a registered locator.
        images: Minibatch of inputs (N x C x H x W).
        labels: Class indices (N,).
        points: Branch points to read; found with :func:`find_branch_points`
            when omitted.
        recompute: Run each block under ``torch.utils.checkpoint``, so the
            forward pass keeps only block inputs and branch outputs and the
            backward pass runs each block again. The scores are bit for bit
            the same on CPU (the same operators on the same inputs) and the
            pass keeps about half the memory, for about 15 % more time.

    Raises:
        BlockSwapError: If no residual block is found in ``model``.
    """
    points = find_branch_points(model) if points is None else points
    if not points:
        raise BlockSwapError(
            f"no residual blocks found in {type(model).__name__}; Fisher potential needs blocks "
            "built by blockswap_plugin or a supported timm/mmdet ResNet block"
        )
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32).detach()
    labels = labels.to(device)

    store: Dict[str, torch.Tensor] = {}
    buffers, modes = _snapshot_state(model)
    handles = _capture_hooks(points, store)
    blocks: List[nn.Module] = []
    try:
        if recompute:
            blocks.extend(_recompute_blocks(model, points))
        model.train()
        with torch.autocast(device_type=device.type, enabled=False), torch.enable_grad():
            # Gradients with respect to the activations need a graph even when
            # no parameter requires grad, so the input carries one.
            logits = model(images.requires_grad_(not any(p.requires_grad for p in model.parameters())))
            loss = F.cross_entropy(logits.float(), labels)
            names = [p.name for p in points if p.name in store]
            missing = [p.name for p in points if p.name not in store]
            if missing:
                raise BlockSwapError(f"blocks {missing} were not run in the forward pass; cannot score them")
            grads = torch.autograd.grad(loss, [store[n] for n in names])
        scores = {}
        for name, grad in zip(names, grads):
            scores[name] = float(fisher_from_activations(store[name].detach().float(), grad.float()).sum())
        return scores
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            del block.forward
        _restore_state(model, buffers, modes)


def _recompute_blocks(model: nn.Module, points: List[BranchPoint]) -> List[nn.Module]:
    """Make the block of every branch point run its forward under a non-reentrant checkpoint.

    The instance attribute ``forward`` shadows the class's; deleting it restores the block.
    """
    blocks = []
    for point in points:
        block = model.get_submodule(point.name) if point.name else model
        if block is model or "forward" in vars(block):
            continue

        def forward(*args, _run=block.forward, **kwargs):
            return checkpoint(_run, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        blocks.append(block)
    return blocks


def fisher_potential(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    points: Optional[List[BranchPoint]] = None,
    recompute: bool = False,
) -> float:
    """Return the network's Fisher potential for one minibatch: the sum over all blocks.

    See :func:`fisher_potential_per_block` for the conditions of the measurement.

    Example:
        >>> score = fisher_potential(model, images, labels)
    """
    return float(sum(fisher_potential_per_block(model, images, labels, points, recompute).values()))
