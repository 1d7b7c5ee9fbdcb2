"""Distillation losses used to train BlockSwap students: attention transfer and Hinton KD.

Attention transfer (Zagoruyko and Komodakis, ICLR 2017), as BlockSwap uses it::

    at(x) = normalize(flatten(mean_c(x ** 2)))
    loss  = beta * sum_stages mean((at(student) - at(teacher)) ** 2)

taken at the output of every stage on the residual stream. Torch only; the
timm training task lives in :mod:`blockswap_plugin.timm.task`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention_map", "attention_transfer_loss", "kd_loss"]


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Return the L2-normalised spatial attention map (N x H*W) of an N x C x H x W feature map."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def attention_transfer_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], beta: float = 1000.0
) -> torch.Tensor:
    """Return ``beta`` times the sum over stages of the mean squared attention-map difference.

    Args:
        student_features: Stage outputs of the student.
        teacher_features: Stage outputs of the teacher, same count and spatial sizes.
        beta: Weight of the term (1000 for 32x32 CIFAR inputs, 750 for ImageNet in BlockSwap).

    Raises:
        ValueError: If the stage counts or spatial sizes differ.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"student has {len(student_features)} stages but the teacher has {len(teacher_features)}; "
            "attention transfer pairs stages one to one"
        )
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for index, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        if student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(
                f"stage {index}: student map {tuple(student.shape[-2:])} and teacher map "
                f"{tuple(teacher.shape[-2:])} differ in size; use a teacher and student of the same layout"
            )
        total = total + (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()
    return beta * total


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Return Hinton's distillation loss: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batch mean."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2
