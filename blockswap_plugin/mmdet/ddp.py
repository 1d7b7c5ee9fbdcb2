"""A DDP model wrapper for mmengine's runner that also works when the model is on the CPU.

mmengine 0.10.7's ``Runner.wrap_model`` always passes
``device_ids=[LOCAL_RANK]`` to ``DistributedDataParallel``, and torch rejects
``device_ids`` for a module on the CPU, so multi-process CPU training (gloo)
fails before any hook runs. Select this wrapper in a config with
``model_wrapper_cfg = dict(type='mmdet.AnyDeviceDistributedDataParallel')``; on a
GPU it behaves exactly as ``MMDistributedDataParallel``.
"""
from __future__ import annotations

import torch.nn as nn
from mmengine.model import MMDistributedDataParallel

from mmdet.registry import MODEL_WRAPPERS

__all__ = ["AnyDeviceDistributedDataParallel"]


@MODEL_WRAPPERS.register_module()
class AnyDeviceDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that drops ``device_ids`` and ``output_device`` for a CPU module.

    Args:
        module (nn.Module): The model to wrap.
        detect_anomalous_params (bool): As in ``MMDistributedDataParallel``.
            Defaults to False.
        **kwargs: Arguments of ``torch.nn.parallel.DistributedDataParallel``.
    """

    def __init__(self, module: nn.Module, detect_anomalous_params: bool = False, **kwargs) -> None:
        param = next(module.parameters(), None)
        if param is not None and param.device.type == "cpu":
            kwargs.pop("device_ids", None)
            kwargs.pop("output_device", None)
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params, **kwargs)
