"""The BlockSwap paper's weight initialisation, used for every scored candidate.

Fisher potential is measured at random initialisation, so the initialisation
is part of the method. Host libraries initialise differently: timm and mmdet
zero the last BatchNorm of each residual block, which makes every branch output
zero and every Fisher potential zero. Scoring therefore always re-initialises.
"""
import math

import torch
import torch.nn as nn

__all__ = ["init_paper_"]


@torch.no_grad()
def init_paper_(model: nn.Module) -> nn.Module:
    """Initialise ``model`` in place as the BlockSwap authors' WRN code does.

    Convolutions get He-normal weights scaled by fan-out
    (``std = sqrt(2 / (k_h * k_w * out_channels))``), batch and group norms get
    weight 1 and bias 0, linear layers are redrawn with torch's default initialisation and get bias 0.
    Draws come from torch's global generator, so seed it first for a
    reproducible result.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
            if module.bias is not None:
                module.bias.zero_()
    return model
