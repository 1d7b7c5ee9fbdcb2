"""timm adapter: registers the CIFAR wide ResNets, builds search spaces for timm models, trains students."""
from . import models  # noqa: F401  (registers wrn_* with timm)
from .data import load_minibatch
from .resnet import SwappedBlock
from .spaces import SUPPORTED_FAMILIES, candidate_builder, create_space, model_name
from .task import AttentionTransferTask, stage_modules
