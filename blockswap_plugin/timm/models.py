"""Register the BlockSwap paper's CIFAR wide ResNets as timm models.

After ``import blockswap_plugin``, ``timm.create_model('wrn_40_2', num_classes=10)``
builds the teacher, and ``genotype=[...]`` builds a BlockSwap student directly.
No pretrained weights exist for these names, so ``pretrained=True`` fails
with timm's own error.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..core.genotype import Genotype
from ..models.wide_resnet import WideResNet

__all__ = ["WideResNet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "stem",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "wrn_40_2.untrained": _cfg(),
    "wrn_16_2.untrained": _cfg(),
    "wrn_40_1.untrained": _cfg(),
    "wrn_16_1.untrained": _cfg(),
})


def _create_wrn(variant: str, depth: int, widen_factor: int, pretrained: bool = False, **kwargs) -> WideResNet:
    model = build_model_with_cfg(
        WideResNet,
        variant,
        pretrained,
        depth=depth,
        widen_factor=widen_factor,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )
    if kwargs.get("genotype") is not None:
        # A student built by name, like those of apply_genotype(): save_student() and the
        # distillation task read the genotype from this attribute.
        model.blockswap_genotype = Genotype(variant, model.genotype)
    return model


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-2 for 32x32 inputs, the BlockSwap paper's CIFAR-10 teacher (2,243,546 params at 10 classes)."""
    return _create_wrn("wrn_40_2", 40, 2, pretrained, **kwargs)


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-2 for 32x32 inputs (691.7K params at 10 classes)."""
    return _create_wrn("wrn_16_2", 16, 2, pretrained, **kwargs)


@register_model
def wrn_40_1(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-1 for 32x32 inputs (563.9K params at 10 classes)."""
    return _create_wrn("wrn_40_1", 40, 1, pretrained, **kwargs)


@register_model
def wrn_16_1(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-1 for 32x32 inputs (175.1K params at 10 classes)."""
    return _create_wrn("wrn_16_1", 16, 1, pretrained, **kwargs)
