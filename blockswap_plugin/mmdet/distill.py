"""Distillation of a student detector from a frozen teacher detector, added to the student's loss dict.

Attention transfer (Zagoruyko and Komodakis, ICLR 2017) is the term BlockSwap
uses. The attention map of a feature map ``x`` (N x C x H x W) is the
flattened channel mean of ``x ** 2``, L2-normalised per image. The loss is
``beta * sum over stages of mean((at_student - at_teacher) ** 2)``, taken here
on every output of the backbone (the stages in ``out_indices``). An optional
second term is the mean squared error between student and teacher neck
outputs. The losses enter the student's loss dict as ``loss_at`` and
``loss_neck_mse``, so mmengine adds them to the total loss and logs them.

The teacher is kept outside the student's module tree, so it is neither saved
in checkpoints, wrapped by DDP, nor handed to the optimizer.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.distill import attention_map, attention_transfer_loss
from ..core.errors import BlockSwapError

__all__ = ["attention_map", "attention_transfer_loss", "DetectorDistiller", "DISTILL_DEFAULTS"]

DISTILL_DEFAULTS: Dict[str, float] = {"at_weight": 1000.0, "neck_weight": 0.0}


class DetectorDistiller:
    """Add distillation losses from a frozen teacher to an mmdet detector's ``loss`` output.

    Forward hooks keep the student backbone's input and outputs (and neck
    outputs when ``neck_weight > 0``) during training. When the detector is
    called with ``mode='loss'``, a hook on the detector runs the teacher on
    the same preprocessed images and adds ``loss_at`` and ``loss_neck_mse``.

    Args:
        student (nn.Module): The student detector (unwrapped, not DDP).
        teacher (nn.Module): The teacher detector with trained weights. It is
            put in eval mode, its parameters stop requiring gradients, and it
            moves to the student's device.
        at_weight (float): Attention transfer weight beta. Defaults to 1000,
            the value BlockSwap uses on CIFAR-10.
        neck_weight (float): Weight of the neck feature MSE; 0 turns it off.
            Defaults to 0.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, at_weight: float = 1000.0, neck_weight: float = 0.0) -> None:
        if at_weight < 0 or neck_weight < 0:
            raise BlockSwapError(f"distillation weights must be >= 0, got at_weight={at_weight}, neck_weight={neck_weight}")
        device = next(student.parameters()).device
        self.teacher = teacher.to(device).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.at_weight = float(at_weight)
        self.neck_weight = float(neck_weight)
        self._inputs: Optional[torch.Tensor] = None
        self._backbone_out: Optional[Sequence[torch.Tensor]] = None
        self._neck_out: Optional[Sequence[torch.Tensor]] = None
        self._handles = [
            student.backbone.register_forward_hook(self._keep_backbone),
            student.register_forward_hook(self._add_losses, with_kwargs=True),
        ]
        if self.neck_weight > 0:
            if not getattr(student, "with_neck", False):
                raise BlockSwapError("neck_weight > 0 needs a detector with a neck; set neck_weight=0")
            self._handles.append(student.neck.register_forward_hook(self._keep_neck))

    def _keep_backbone(self, module, args, output) -> None:
        if module.training:
            self._inputs = args[0]
            self._backbone_out = output

    def _keep_neck(self, module, args, output) -> None:
        if module.training:
            self._neck_out = output

    def _add_losses(self, module, args, kwargs, output):
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "tensor")
        inputs, student_backbone, student_neck = self._inputs, self._backbone_out, self._neck_out
        self._inputs = self._backbone_out = self._neck_out = None
        if mode != "loss" or not isinstance(output, dict) or inputs is None:
            return None

        with torch.no_grad():
            teacher_backbone = self.teacher.backbone(inputs)
            teacher_neck = self.teacher.neck(teacher_backbone) if self.neck_weight > 0 else None
        if self.at_weight > 0:
            output["loss_at"] = attention_transfer_loss(student_backbone, teacher_backbone, beta=self.at_weight)
        if self.neck_weight > 0:
            pairs = list(zip(student_neck, teacher_neck))
            output["loss_neck_mse"] = self.neck_weight * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
        return output

    def remove(self) -> None:
        """Remove the hooks from the student."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
