"""Parameter and MAC counting with torch's own FLOP counter.

MACs are half of the FLOPs that :class:`torch.utils.flop_counter.FlopCounterMode`
reports, so they cover convolutions and matrix products (the usual convention
for network MACs) and leave out normalisation, activations and additions.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs"]


def count_params(module: nn.Module) -> int:
    """Count the parameters of ``module``: weights, biases, norm gammas and betas.

    Buffers such as BatchNorm running statistics are not parameters and are not counted.
    """
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(
    module: nn.Module, input_shape: Sequence[int], per_module: bool = False
) -> Union[int, Tuple[int, Dict[str, int]]]:
    """Count multiply-accumulates of one forward pass at ``input_shape``.

    Args:
        module: Module to run; it runs once in eval mode on zeros, on the device
            of its parameters (the meta device counts without computing).
        input_shape: Full input shape including the batch dimension.
        per_module: Also return MACs per submodule, keyed by module path
            (``""`` for ``module`` itself).

    Returns:
        Total MACs, or ``(total, per-module dict)`` when ``per_module`` is set.
    """
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    was_training = module.training
    module.eval()
    try:
        with counter:
            module(torch.zeros(*input_shape, device=device))
    finally:
        module.train(was_training)
    total = counter.get_total_flops() // 2
    if not per_module:
        return total
    # FlopCounterMode keys submodules as "<RootClass>.<path>"; strip the root.
    root = type(module).__name__
    breakdown: Dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        breakdown[path] = sum(ops.values()) // 2
    return total, breakdown
