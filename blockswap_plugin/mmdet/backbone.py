"""mmdet backbone types that build a ResNet or ResNeXt with a BlockSwap genotype.

``BlockSwapResNet`` and ``BlockSwapResNeXt`` take every argument of mmdet's
``ResNet`` and ``ResNeXt`` plus ``genotype``, so a config names a student
directly, without a search::

    backbone=dict(type='BlockSwapResNet', depth=18, genotype=['DConvA4', ...],
                  frozen_stages=-1, norm_eval=False, init_cfg=None)

The genotype lists one block type per residual block (``layer1.0``,
``layer1.1``, ...); see :mod:`blockswap_plugin.mmdet.blocks` for where each
type goes inside a block.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Sequence, Union

from mmengine.logging import print_log

from mmdet.models.backbones.resnet import ResNet, ResNetV1d
from mmdet.models.backbones.resnext import ResNeXt
from mmdet.registry import MODELS

from ..core.errors import BlockSwapError
from ..core.genotype import Genotype
from .blocks import backbone_model_name, block_names, check_supported, swap_block

__all__ = ["BlockSwapResNet", "BlockSwapResNeXt", "as_genotype", "student_backbone_cfg"]

GenotypeLike = Union[Genotype, Sequence[str], Dict[str, Any], str]


def as_genotype(genotype: GenotypeLike) -> Genotype:
    """Return ``genotype`` as a :class:`Genotype`: a list of names, a genotype dict or a JSON file path.

    Raises:
        BlockSwapError: If the value has another type or names an unknown block type.
    """
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, str):
        return Genotype.load(genotype)
    if isinstance(genotype, dict):
        return Genotype.from_dict(dict(genotype))
    if isinstance(genotype, (list, tuple)):
        return Genotype("", genotype)
    raise BlockSwapError(
        f"genotype must be a list of block type names, a genotype dict or a JSON file path, "
        f"got {type(genotype).__name__}"
    )


class _GenotypeMixin:
    """Replace the blocks of a freshly built mmdet ResNet by those of a genotype."""

    def _apply_genotype(self, genotype: GenotypeLike) -> None:
        check_supported(self)
        genotype = as_genotype(genotype)
        names = block_names(self)
        expected_model = backbone_model_name(self)
        if len(genotype) != len(names):
            raise BlockSwapError(
                f"genotype has {len(genotype)} block types but {expected_model} has {len(names)} "
                f"residual blocks ({names[0]} ... {names[-1]}); give one block type per block"
            )
        if genotype.model and genotype.model != expected_model:
            raise BlockSwapError(
                f"genotype was made for {genotype.model}, but this backbone is {expected_model}; "
                "use a genotype searched on this backbone"
            )

        for index, (name, type_name) in enumerate(zip(names, genotype.blocks)):
            if type_name == "Conv":
                continue
            try:
                block = swap_block(self.get_submodule(name), type_name, self.norm_cfg)
            except BlockSwapError:
                raise
            except ValueError as exc:
                raise BlockSwapError(f"block {index} ({name}) of {expected_model}: {exc}") from None
            self.set_submodule(name, block)
        self.genotype = Genotype(expected_model, genotype.blocks, genotype.meta)

        # New blocks are randomly initialised, so freezing them or keeping
        # their BatchNorm statistics fixed stops them from learning.
        self._freeze_stages()
        swapped = [n for n, t in zip(names, genotype.blocks) if t != "Conv"]
        if swapped and (self.frozen_stages >= 0 or self.norm_eval):
            print_log(
                f"{type(self).__name__}: frozen_stages={self.frozen_stages}, norm_eval={self.norm_eval} "
                f"freeze parameters or BatchNorm statistics of {len(swapped)} new, randomly initialised "
                "blocks; set frozen_stages=-1 and norm_eval=False to train them",
                logger="current",
                level=logging.WARNING,
            )


@MODELS.register_module()
class BlockSwapResNet(_GenotypeMixin, ResNet):
    """mmdet ``ResNet`` (BasicBlock or Bottleneck) whose blocks follow a BlockSwap genotype.

    Args:
        genotype (list[str] | dict | str): One block type per residual block,
            a genotype dict (``{"model": ..., "blocks": [...]}``) or the path
            of a genotype JSON file.
        **kwargs: Arguments of mmdet's ``ResNet``. For a ResNetV1d student
            pass ``deep_stem=True, avg_down=True``.

    Examples:
        >>> backbone = dict(type='BlockSwapResNet', depth=18, genotype=['Conv'] * 8)
    """

    def __init__(self, genotype: GenotypeLike, **kwargs) -> None:
        super().__init__(**kwargs)
        self._apply_genotype(genotype)


@MODELS.register_module()
class BlockSwapResNeXt(_GenotypeMixin, ResNeXt):
    """mmdet ``ResNeXt`` whose blocks follow a BlockSwap genotype.

    Args:
        genotype (list[str] | dict | str): One block type per residual block,
            a genotype dict or the path of a genotype JSON file.
        **kwargs: Arguments of mmdet's ``ResNeXt`` (``groups``, ``base_width``, ...).
    """

    def __init__(self, genotype: GenotypeLike, **kwargs) -> None:
        super().__init__(**kwargs)
        self._apply_genotype(genotype)


def student_backbone_cfg(backbone_cfg: Dict[str, Any], backbone: ResNet, genotype: Sequence[str]) -> Dict[str, Any]:
    """Return the config of a student backbone: the teacher's config with a genotype and training from scratch.

    The student keeps every argument of the teacher's backbone config and gets
    ``frozen_stages=-1`` and ``norm_eval=False`` (its blocks start from random
    weights and must train, BatchNorm statistics included) and
    ``init_cfg=None`` (no pretrained weights fit the new blocks).

    Args:
        backbone_cfg (dict): The teacher's backbone config.
        backbone (ResNet): The teacher's backbone built from that config.
        genotype (Sequence[str]): One block type per residual block.

    Raises:
        BlockSwapError: If the backbone is not supported.
    """
    check_supported(backbone)
    cfg = copy.deepcopy(dict(backbone_cfg))
    if isinstance(backbone, (BlockSwapResNet, BlockSwapResNeXt)):
        raise BlockSwapError(
            f"the backbone is already a BlockSwap student ({type(backbone).__name__}); "
            "search on the teacher's ResNet or ResNeXt config instead"
        )
    if isinstance(backbone, ResNeXt):
        cfg["type"] = "BlockSwapResNeXt"
    else:
        cfg["type"] = "BlockSwapResNet"
        if isinstance(backbone, ResNetV1d):
            cfg.update(deep_stem=True, avg_down=True)
    cfg.pop("pretrained", None)
    cfg.update(genotype=list(genotype), frozen_stages=-1, norm_eval=False, init_cfg=None)
    return cfg
