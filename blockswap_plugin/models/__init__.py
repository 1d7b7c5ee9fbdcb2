"""Networks of the BlockSwap paper, in plain torch."""
from .wide_resnet import PreActBlock, WideResNet
