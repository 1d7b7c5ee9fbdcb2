"""timm adapter: registers the CIFAR wide ResNets and builds search spaces for timm models."""
from . import models  # noqa: F401  (registers wrn_* with timm)
from .data import load_minibatch
from .spaces import SUPPORTED_FAMILIES, create_space, model_name
