"""timm training task that distils a BlockSwap student by attention transfer, with optional Hinton KD.

:class:`AttentionTransferTask` is a :class:`timm.task.TrainingTask`, so a
timm-style loop (``result = task(input, target); result["loss"].backward()``)
drives it, and :class:`timm.utils.CheckpointSaver` saves it. Stage outputs are
read with forward hooks on the modules named in the model's ``feature_info``
(``layer1``..``layer4`` for timm ResNets, ``stages.0``..``stages.2`` for the
CIFAR wide ResNets). The teacher is frozen, stays in eval mode and is not part
of the checkpoint; the student's genotype is saved as task state.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.utils import unwrap_model

from ..core.distill import attention_transfer_loss, kd_loss
from ..core.errors import BlockSwapError

__all__ = ["AttentionTransferTask", "stage_modules"]

_logger = logging.getLogger(__name__)


def stage_modules(model: nn.Module) -> List[str]:
    """Return the module paths of the model's stages (residual stream outputs), from ``feature_info``.

    Raises:
        BlockSwapError: If the model has no ``feature_info`` with stage entries.
    """
    names = []
    for info in getattr(model, "feature_info", None) or []:
        name = info.get("module") if isinstance(info, dict) else None
        if not name:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        # Stem entries (``act1``) are single layers; stages are sequences of blocks.
        if isinstance(module, nn.Sequential) and len(module) > 0:
            names.append(name)
    if not names:
        raise BlockSwapError(
            f"{type(model).__name__} has no stages in feature_info; attention transfer supports timm ResNets "
            "and the CIFAR wide ResNets"
        )
    return names


class _StageRecorder:
    """Forward hooks that keep the latest output of each stage module."""

    def __init__(self, model: nn.Module) -> None:
        self.names = stage_modules(model)
        self.outputs: Dict[str, torch.Tensor] = {}
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.names
        ]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output

        return hook

    def take(self) -> List[torch.Tensor]:
        missing = [name for name in self.names if name not in self.outputs]
        if missing:
            raise BlockSwapError(f"stages {missing} did not run in the forward pass")
        outputs = [self.outputs[name] for name in self.names]
        self.outputs.clear()
        return outputs


class AttentionTransferTask(TrainingTask):
    """Cross-entropy plus attention transfer from a frozen teacher, plus optional Hinton KD.

    ``loss = CE + beta * sum_stages mean((at(s) - at(t))^2) + kd_weight * KD``.
    With ``teacher=None`` the task is plain cross-entropy training that still
    saves the student's genotype (the baseline without distillation).

    Args:
        student_model: The student to train.
        teacher_model: Trained teacher with the same stage layout, or None.
        beta: Attention transfer weight (1000 for 32x32 inputs, 750 for ImageNet in BlockSwap).
        kd_weight: Weight of the Hinton KD term; 0 disables it (BlockSwap's setting).
        temperature: KD softmax temperature.
        criterion: Classification loss; ``nn.CrossEntropyLoss()`` by default.
        device: Device for task tensors.
        dtype: Dtype for task tensors.
        verbose: Log the configuration.

    Example:
        >>> task = AttentionTransferTask(student, teacher, beta=1000.0)
        >>> result = task(images, labels)
        >>> result["loss"].backward()
    """

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: Optional[nn.Module] = None,
        beta: float = 1000.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        criterion: Optional[nn.Module] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if beta < 0 or kd_weight < 0:
            raise BlockSwapError(f"beta and kd_weight must be non-negative, got beta={beta}, kd_weight={kd_weight}")
        if temperature <= 0:
            raise BlockSwapError(f"KD temperature must be positive, got {temperature}")
        self.trainable_module = student_model
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.beta = float(beta)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.teacher = teacher_model
        self._student_stages = _StageRecorder(student_model) if teacher_model is not None and beta > 0 else None
        self._teacher_stages = None
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            if beta > 0:
                self._teacher_stages = _StageRecorder(teacher_model)
                if len(self._teacher_stages.names) != len(self._student_stages.names):
                    raise BlockSwapError(
                        f"teacher stages {self._teacher_stages.names} do not pair with student stages "
                        f"{self._student_stages.names}; use a teacher of the same family"
                    )
        if verbose:
            _logger.info(
                "AttentionTransferTask: teacher=%s, beta=%g, kd_weight=%g, temperature=%g, stages=%s",
                type(teacher_model).__name__ if teacher_model is not None else None,
                self.beta, self.kd_weight, self.temperature,
                self._student_stages.names if self._student_stages else [],
            )

    def train(self, mode: bool = True) -> "AttentionTransferTask":
        """Set the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "AttentionTransferTask":
        """Wrap the student in DistributedDataParallel; the frozen teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict:
        """Return the student's genotype and class count, saved beside its state dict."""
        student = unwrap_model(self.trainable_module)
        genotype = getattr(student, "blockswap_genotype", None)
        if genotype is None:
            return {}
        return {"blockswap_genotype": genotype.to_dict(), "num_classes": getattr(student, "num_classes", None)}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return ``loss``, ``output`` (student logits), ``task_loss``, ``at_loss`` and ``kd_loss``."""
        logits = self.trainable_module(input)
        task_loss = self.criterion(logits, target)
        zero = task_loss.new_zeros(())
        at_loss = zero
        distill_kd = zero
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input)
            if self._student_stages is not None:
                at_loss = attention_transfer_loss(
                    self._student_stages.take(), self._teacher_stages.take(), self.beta
                )
            if self.kd_weight > 0:
                distill_kd = kd_loss(logits, teacher_logits, self.temperature)
        loss = task_loss + at_loss + self.kd_weight * distill_kd
        return {"loss": loss, "output": logits, "task_loss": task_loss, "at_loss": at_loss, "kd_loss": distill_kd}
