"""BlockSwap for mmdetection 3.x: a backbone type, a training hook and distillation.

Importing this package registers, in mmdet's registries:

* ``BlockSwapResNet`` and ``BlockSwapResNeXt`` (``MODELS``): mmdet's ResNet
  and ResNeXt built with a given genotype.
* ``BlockSwapHook`` (``HOOKS``): searches the backbone of the run's detector
  at the start of training, puts the winner in place and distils it from the
  teacher detector.
* ``AnyDeviceDistributedDataParallel`` (``MODEL_WRAPPERS``): mmengine's DDP
  wrapper made usable for multi-process training on the CPU.
* ``AnyDeviceRunner`` (``RUNNERS``): mmengine's Runner whose ``pytorch``
  launcher also starts on machines without a GPU (gloo).

Use it from a config::

    custom_imports = dict(imports=['blockswap_plugin.mmdet'], allow_failed_imports=False)
    custom_hooks = [dict(type='BlockSwapHook', budget=0.3, teacher_checkpoint='teacher.pth')]

This package needs mmdet, mmengine and mmcv; it does not import timm.
"""
from .backbone import BlockSwapResNet, BlockSwapResNeXt, as_genotype, student_backbone_cfg
from .blocks import SUPPORTED_BACKBONES, SwapBranchBlock, backbone_model_name, block_names, check_supported, swap_block
from .ddp import AnyDeviceDistributedDataParallel
from .distill import DetectorDistiller, attention_map, attention_transfer_loss
from .hook import BlockSwapHook
from .runner import AnyDeviceRunner
from .scoring import detector_fisher_potential, search_detector
from .student_config import student_config, write_student_config

__all__ = [
    "AnyDeviceDistributedDataParallel",
    "AnyDeviceRunner",
    "BlockSwapHook",
    "BlockSwapResNet",
    "BlockSwapResNeXt",
    "DetectorDistiller",
    "SUPPORTED_BACKBONES",
    "SwapBranchBlock",
    "as_genotype",
    "attention_map",
    "attention_transfer_loss",
    "backbone_model_name",
    "block_names",
    "check_supported",
    "detector_fisher_potential",
    "search_detector",
    "student_backbone_cfg",
    "student_config",
    "swap_block",
    "write_student_config",
]
