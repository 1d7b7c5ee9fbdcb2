"""Fast Fisher potential of throwaway candidates, for search.

:func:`~blockswap_plugin.core.fisher.fisher_potential` is the reference: fp32,
the model's own memory layout, and the model left as it was found. A search
scores hundreds of freshly built networks that are dropped right after, so
:class:`FisherScorer` may change them and takes shortcuts that the reference
cannot take:

* parameters stop requiring gradients, so the backward pass computes the
  gradients of activations only and skips every weight gradient;
* the model and the minibatch use the channels-last memory format, which
  oneDNN runs faster on CPU;
* with ``precision="bf16"`` the forward and backward passes run under bf16
  autocast;
* the minibatch is converted once and reused for every candidate;
* on CPU, registered batch norm + ReLU pairs run as one compiled kernel,
  grouped convolutions with narrow groups run with wider, block-diagonal
  groups, and convolutions keep only their weights for the backward pass
  (:mod:`~blockswap_plugin.core.fused`);
* a branch output made by a fused batch norm + ReLU + convolution step is not
  kept: the step recomputes it in the backward pass and hands it, with its
  gradient, to the Fisher sum there;
* the Fisher terms are summed in fp32 (by a compiled kernel on CPU, without a
  tensor of products).

Precisions (``PRECISIONS``):

* ``"exact"`` calls the reference on the unchanged model.
* ``"fp32"`` is the fast path in fp32, equal to ``"exact"`` up to float rounding.
* ``"bf16"`` is the fast path in bf16 (the Fisher sums stay fp32). Single scores move by a few percent, and
  ``docs/benchmarks.md`` gives the measured rank agreement with ``"exact"``.
* ``"auto"`` picks ``"bf16"`` where the device runs bf16 natively, else ``"fp32"``.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BlockSwapError
from .fisher import BranchPoint, find_branch_points, fisher_potential
from .fused import (
    defer_fisher,
    drop_conv_inputs_,
    fuse_batchnorm_relu_,
    fuse_batchnorm_relu_conv_,
    fused_kernel,
    is_batchnorm_relu_conv_output,
    merge_conv_groups_,
)

__all__ = ["PRECISIONS", "FisherScorer", "bf16_supported", "resolve_precision", "spearman"]

_logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "exact", "fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Return whether ``device`` runs bf16 convolutions natively (AVX-512 BF16 or AMX on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"bf16"`` or ``"fp32"`` for ``device`` and check the name.

    Raises:
        BlockSwapError: If ``precision`` is not one of ``PRECISIONS``, or is
            ``"bf16"`` on a device without native bf16.
    """
    if precision not in PRECISIONS:
        raise BlockSwapError(f"unknown scoring precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise BlockSwapError(
            f"precision 'bf16' needs native bf16 support, which {torch.device(device)} lacks; "
            "use --precision fp32 or auto"
        )
    return precision


class FisherScorer:
    """Fisher potential of many fresh candidates on one minibatch.

    Args:
        images: The scoring minibatch (N x C x H x W).
        labels: Its class indices (N,).
        precision: One of ``PRECISIONS``.
        device: Device to score on; the images' device when omitted.
        channels_last: Use the channels-last memory format on the fast paths.
        rewrite: Rewrite candidates for speed (fused batch norm + ReLU and
            batch norm + ReLU + convolution, merged convolution groups,
            weight-only convolution backward). Applies only on CPU fast
            paths; None and True both mean yes there.
        recompute: With ``"exact"``, run each block again in the backward
            pass instead of keeping its activations (``recompute`` of
            :func:`~blockswap_plugin.core.fisher.fisher_potential`): the same
            scores, bit for bit, with about half the memory and 15 % more time.

    Example:
        >>> scorer = FisherScorer(images, labels, precision="auto")
        >>> score = scorer.score(init_paper_(build_candidate(blocks)))
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        precision: str = "auto",
        device: Optional[torch.device] = None,
        channels_last: bool = True,
        rewrite: Optional[bool] = None,
        recompute: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else images.device
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last and self.precision != "exact"
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.detach().to(device=self.device, dtype=torch.float32)
        self.labels = labels.detach().to(self.device)
        self.images = images.contiguous(memory_format=self.memory_format)
        self._copy_outputs = False
        self.recompute = recompute
        self.rewrite = rewrite is not False and self.precision != "exact" and self.device.type == "cpu"
        # Build or load the kernel now, not inside the first scoring thread.
        self.kernel = fused_kernel() if self.rewrite else None

    def score(self, model: nn.Module) -> float:
        """Return the Fisher potential of ``model``; on the fast paths the model is changed for good.

        The fast paths turn off ``requires_grad`` of every parameter and move
        the model to the scoring device in channels-last format, so pass a
        network that is thrown away afterwards (or use ``"exact"``).

        Raises:
            BlockSwapError: If the model has no recognised residual block.
        """
        if self.precision == "exact":
            return fisher_potential(model.to(self.device), self.images, self.labels, recompute=self.recompute)
        points = find_branch_points(model)
        if not points:
            raise BlockSwapError(
                f"no residual blocks found in {type(model).__name__}; Fisher potential needs blocks "
                "built by blockswap_plugin or a supported timm/mmdet ResNet block"
            )
        model.requires_grad_(False)
        if self.rewrite:
            # Branch points keep their modules, so that the hooks below run.
            keep = [point.module for point in points]
            merge_conv_groups_(model)
            if self.kernel is not None:
                fuse_batchnorm_relu_conv_(model, self.kernel, skip=keep)
                fuse_batchnorm_relu_(model, self.kernel, skip=keep)
            drop_conv_inputs_(model, skip=keep)
        model.to(device=self.device, memory_format=self.memory_format)
        model.train()
        score = self._score_points(model, points, clone=self._copy_outputs)
        if score is None:
            # A branch output was changed in place after it was read (a host
            # adding the shortcut with ``+=``): hand the host copies from now on.
            _logger.debug("branch output modified in place; scoring again with copies")
            self._copy_outputs = True
            score = self._score_points(model, points, clone=True)
        return score

    def _score_points(self, model: nn.Module, points: List[BranchPoint], clone: bool) -> Optional[float]:
        """Run one forward and backward pass; return None if a stored activation was overwritten."""
        outputs: List[_BranchOutput] = []
        # Fisher terms per branch output; deferred entries fill theirs in the backward pass.
        terms: List[Optional[torch.Tensor]] = []
        handles = _keep_branch_outputs(points, outputs, clone, self._fisher_terms, terms)
        try:
            with torch.enable_grad(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ):
                # No parameter requires a gradient, so the input carries the graph.
                logits = model(self.images.detach().requires_grad_())
            if len(outputs) != len(points):
                raise BlockSwapError(
                    f"{len(points)} residual blocks were found but {len(outputs)} ran in the forward pass; "
                    "cannot score a model that skips blocks"
                )
            if any(entry.version is not None and entry.tensor._version != entry.version for entry in outputs):
                return None
            loss = F.cross_entropy(logits.float(), self.labels)
            del logits
            targets = [entry.tensor for entry in outputs]
            gradients = torch.autograd.grad(loss, targets)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for index, (entry, gradient) in enumerate(zip(outputs, gradients)):
                if entry.version is not None:
                    terms[index] = self._fisher_terms(entry.tensor, gradient)
        if any(term is None for term in terms):
            raise BlockSwapError("a deferred Fisher term was not computed in the backward pass; "
                                 "score this model with rewrite=False")
        batch = self.images.shape[0]
        return float(sum(term.double().pow(2).sum() for term in terms) / (2 * batch))

    def _fisher_terms(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """Per sample and channel sums of activation x gradient (N x C), summed in float32."""
        if self.kernel is not None and activation.dim() == 4 and activation.dtype in (torch.float32, torch.bfloat16):
            return self.kernel.fisher_terms(activation, gradient)
        dims = tuple(range(2, activation.dim()))
        return (activation.float() * gradient.float()).sum(dim=dims)


class _BranchOutput:
    """A branch output seen in the forward pass: the tensor to ask a gradient for, and its version.

    A deferred entry (``version`` None) contains the input of the step that made
    the branch output; that step computes the Fisher term itself.
    """

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: Optional[int]) -> None:
        self.tensor = tensor
        self.version = version


def _keep_branch_outputs(points: List[BranchPoint], outputs: List[_BranchOutput], clone: bool, fisher_terms,
                         terms: List[Optional[torch.Tensor]]) -> list:
    """Hook every branch point so that its activation (or a deferred entry) lands in ``outputs``.

    A branch output made by a fused batch norm + ReLU + convolution step is
    not kept: the step recomputes it in the backward pass and stores its
    Fisher term in ``terms``. With ``clone`` the host gets a copy, so an
    in-place change by the host leaves the kept tensor intact. The gradient
    reaches the kept tensor through the copy.
    """
    handles = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        index = len(outputs)
        terms.append(None)
        if is_batchnorm_relu_conv_output(tensor):
            def store(activation, gradient, index=index):
                terms[index] = fisher_terms(activation, gradient)

            outputs.append(_BranchOutput(defer_fisher(tensor, store), None))
            return tensor
        outputs.append(_BranchOutput(tensor, tensor._version))
        return tensor.clone() if clone else tensor

    for point in points:
        if point.where == "output":
            def hook(module, args, output):
                return keep(output)

            handles.append(point.module.register_forward_hook(hook))
        elif point.where == "input":
            def pre_hook(module, args):
                return (keep(args[0]), *args[1:])

            handles.append(point.module.register_forward_pre_hook(pre_hook))
        else:
            raise ValueError(f"BranchPoint.where must be 'output' or 'input', got {point.where!r}")
    return handles


def spearman(x, y) -> float:
    """Spearman rank correlation of two equally long score lists (ties broken by position)."""
    x = torch.as_tensor(list(x), dtype=torch.float64)
    y = torch.as_tensor(list(y), dtype=torch.float64)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"need two score lists of equal length >= 2, got {x.numel()} and {y.numel()}")
    rank_x = torch.empty_like(x)
    rank_y = torch.empty_like(y)
    rank_x[x.argsort(stable=True)] = torch.arange(x.numel(), dtype=torch.float64)
    rank_y[y.argsort(stable=True)] = torch.arange(y.numel(), dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([rank_x, rank_y]))[0, 1])
