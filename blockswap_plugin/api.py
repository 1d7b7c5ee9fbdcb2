"""One-call BlockSwap for timm models, genotype application and student checkpoints.

:func:`blockswap` searches a student inside a parameter budget and returns it;
:func:`search_model` returns the full ranking instead; :func:`apply_genotype`
rebuilds a student from a saved genotype; :func:`save_student` and
:func:`load_student` write and read checkpoints that carry their genotype.
This module does not train: see :mod:`blockswap_plugin.timm.task`.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .core.errors import BlockSwapError
from .core.flops import count_params
from .core.genotype import Genotype
from .core.sampler import Budget, check_budgets
from .core.search import SearchResult, search
from .core.space import SwapSpace
from .timm.spaces import candidate_builder, create_space, model_name

__all__ = [
    "SearchSummary",
    "blockswap",
    "search_model",
    "apply_genotype",
    "save_student",
    "load_student",
]

_logger = logging.getLogger(__name__)

DataLike = Union[Tuple[torch.Tensor, torch.Tensor], Iterable]
GenotypeLike = Union[Genotype, Sequence[str], str, Path, Dict[str, Any]]


@dataclass
class SearchSummary:
    """Search summary that :func:`blockswap` attaches to a student as ``student.blockswap_search``.

    Attributes:
        model: Name of the searched (teacher) model.
        teacher_params: Parameters of the teacher.
        budget_params: Parameter budget the candidates met.
        tolerance: Relative half-width of the budget band.
        num_samples: Number of scored candidates.
        seed: Search seed.
        batch_size: Images in the scoring minibatch.
        params: Parameters of the student.
        macs: MACs of the student at ``input_size``.
        input_size: ``(C, H, W)`` the MACs refer to.
        fisher_potential: Score of the winner.
        seconds: Wall time of the search.
        result: The full :class:`~blockswap_plugin.core.search.SearchResult` (every candidate and its score).
    """

    model: str
    teacher_params: int
    budget_params: float
    tolerance: float
    num_samples: int
    seed: int
    batch_size: int
    params: int
    macs: int
    input_size: Tuple[int, int, int]
    fisher_potential: float
    seconds: float
    result: SearchResult


def _first_batch(data: DataLike) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    else:
        try:
            batch = next(iter(data))
        except TypeError:
            raise BlockSwapError(
                f"data must be an (images, labels) pair of tensors or a DataLoader, got {type(data).__name__}"
            ) from None
        except StopIteration:
            raise BlockSwapError("the data loader is empty; it must yield at least one (images, labels) batch") from None
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise BlockSwapError(f"the data loader must yield (images, labels) batches, got {type(batch).__name__}")
        images, labels = batch[0], batch[1]
    if images.dim() != 4:
        raise BlockSwapError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise BlockSwapError(
            f"labels must be a vector of {images.shape[0]} class indices, got shape {tuple(labels.shape)}"
        )
    return images, labels.long()


def _budget_params(model: nn.Module, budget: Union[int, float]) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BlockSwapError(
            f"budget must be a float in (0, 1) (fraction of the model's parameters) or an int "
            f"(parameter count), got {budget!r}"
        )
    if isinstance(budget, float):
        if not 0.0 < budget < 1.0:
            raise BlockSwapError(
                f"a float budget is a fraction of the model's parameters and must lie in (0, 1), got {budget}; "
                "pass an int for an absolute parameter count"
            )
        return budget * count_params(model)
    if budget < 1:
        raise BlockSwapError(f"an int budget is a parameter count and must be positive, got {budget}")
    return float(budget)


def search_model(
    model: nn.Module,
    data: DataLike,
    budget: Union[int, float],
    num_samples: int = 1000,
    seed: int = 0,
    tolerance: float = 0.025,
    input_size: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> Tuple[SwapSpace, SearchResult]:
    """Search ``model`` and return its space and the full ranking of every scored candidate.

    Candidates are drawn by rejection sampling as in the BlockSwap paper (one
    uniform block type per site, kept when inside the budget band). When that
    accepts fewer than one draw in 500, which happens for budgets near the
    smallest reachable size of bottleneck ResNets, the same distribution
    (uniform over in-budget genotypes) is drawn from count tables instead
    (:func:`~blockswap_plugin.core.sampler.sample_genotypes`).

    Args:
        model: A supported timm model (see :data:`~blockswap_plugin.timm.spaces.SUPPORTED_FAMILIES`).
        data: ``(images, labels)`` or a DataLoader whose first batch is used for scoring.
        budget: Float in (0, 1) for a fraction of ``model``'s parameters, or an int parameter count.
        num_samples: Number of candidates to score.
        seed: Seed of sampling and of each candidate's initialisation.
        tolerance: Relative half-width of the budget band (0.025 is +-2.5 %).
        input_size: ``(C, H, W)`` for MACs; the data's image size by default.
        device: Device to score on; the model's device by default.
        progress: Show a tqdm progress bar.

    Raises:
        BlockSwapError: On unsupported models, invalid budgets or data.
    """
    images, labels = _first_batch(data)
    size = tuple(input_size) if input_size is not None else tuple(images.shape[1:])
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    space, build_candidate = create_space(model, size)
    budgets = [Budget("params", _budget_params(model, budget), tolerance)]
    check_budgets(space, budgets)
    return space, search(space, build_candidate, images, labels, num_samples, budgets, seed, device, progress)


def _resolve_genotype(model: nn.Module, genotype: GenotypeLike) -> Genotype:
    name = model_name(model)
    if isinstance(genotype, Genotype):
        resolved = genotype
    elif isinstance(genotype, (str, Path)):
        resolved = Genotype.load(genotype, model=name)
    elif isinstance(genotype, dict):
        resolved = Genotype.from_dict(genotype, model=name)
    else:
        resolved = Genotype(name, list(genotype))
    if resolved.model and resolved.model != name:
        raise BlockSwapError(
            f"the genotype was made for {resolved.model!r} but the model is {name!r}; "
            f"create the model with timm.create_model({resolved.model!r}, ...) first"
        )
    return resolved


def _reinitialise(student: nn.Module) -> None:
    """Give a timm ResNet student fresh weights with timm's own init.

    Its builder copies the teacher, so every layer is reset and then
    ``init_weights`` draws He-normal convolutions and zeroes the last norms.
    Wide ResNet students are built from scratch with their own init already.
    """
    if not hasattr(student, "init_weights"):
        return
    for module in student.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    student.init_weights()


def apply_genotype(model: nn.Module, genotype: GenotypeLike) -> nn.Module:
    """Build the student of ``model`` described by ``genotype``; ``model`` is left untouched.

    The student has the class of ``model`` and fresh weights (the host's own
    initialisation), keeps ``pretrained_cfg`` and carries the genotype as
    ``student.blockswap_genotype``. The structure depends only on ``model``'s
    architecture and the genotype, so a student state dict loads with
    ``strict=True`` into another student built the same way.

    Args:
        model: The original (unswapped) model the genotype was searched on.
        genotype: A :class:`~blockswap_plugin.core.genotype.Genotype`, a list of
            block type names, a genotype dict or the path of a genotype JSON file.

    Raises:
        BlockSwapError: On an unsupported model, a genotype of the wrong
            length or model, or a block type that does not fit a block.
    """
    resolved = _resolve_genotype(model, genotype)
    site_names, build_candidate = candidate_builder(model)
    if len(resolved) != len(site_names):
        raise BlockSwapError(
            f"genotype has {len(resolved)} blocks but {model_name(model)} has {len(site_names)} swappable "
            "blocks; use a genotype made for this model"
        )
    try:
        student = build_candidate(list(resolved.blocks))
    except ValueError as exc:
        raise BlockSwapError(f"genotype does not fit {model_name(model)}: {exc}") from None
    _reinitialise(student)
    param = next(model.parameters(), None)
    if param is not None:
        student.to(param.device)
    for attribute in ("pretrained_cfg", "default_cfg", "pretrained_cfg_overlay"):
        if hasattr(model, attribute) and not hasattr(student, attribute):
            setattr(student, attribute, getattr(model, attribute))
    student.train(model.training)
    student.blockswap_genotype = Genotype(model_name(model), resolved.blocks, resolved.meta)
    return student


def blockswap(
    model: nn.Module,
    data: DataLike,
    budget: Union[int, float],
    num_samples: int = 1000,
    seed: int = 0,
    tolerance: float = 0.025,
    input_size: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> nn.Module:
    """Compress ``model`` with BlockSwap and return the student; ``model`` is left untouched.

    Samples ``num_samples`` genotypes inside the budget, scores each by Fisher
    potential at the BlockSwap paper's initialisation (BN gamma 1, beta 0,
    whatever the host's own init) on one minibatch, and builds the winner
    with :func:`apply_genotype`. The student is freshly initialised: train it,
    for example with :class:`~blockswap_plugin.timm.task.AttentionTransferTask`.

    Args:
        model: A supported timm model (CIFAR wide ResNets, timm ResNets).
        data: ``(images, labels)`` or a DataLoader; one minibatch with training augmentation.
        budget: Float in (0, 1) for a fraction of ``model``'s parameters, or an int parameter count.
        num_samples: Number of candidates (the BlockSwap paper, Turner et al. 2020, uses 1000).
        seed: Seed of sampling and of each candidate's initialisation.
        tolerance: Relative half-width of the budget band (0.025 is +-2.5 %).
        input_size: ``(C, H, W)`` for MACs; the data's image size by default.
        device: Device to score on; the model's device by default.
        progress: Show a tqdm progress bar.

    Returns:
        The student, with ``student.blockswap_genotype`` (a Genotype) and
        ``student.blockswap_search`` (a :class:`SearchSummary`).

    Example:
        >>> student = blockswap(timm.create_model("resnet18", num_classes=10), (images, labels), 0.25)
    """
    space, result = search_model(model, data, budget, num_samples, seed, tolerance, input_size, device, progress)
    best = result.best
    genotype = result.best_genotype()
    genotype.meta.update({"budget_params": result.budgets[0].target, "tolerance": tolerance, "seed": seed})
    student = apply_genotype(model, genotype)
    student.blockswap_search = SearchSummary(
        model=space.model_name,
        teacher_params=count_params(model),
        budget_params=result.budgets[0].target,
        tolerance=tolerance,
        num_samples=len(result.candidates),
        seed=seed,
        batch_size=result.batch_size,
        params=best.params,
        macs=best.macs,
        input_size=tuple(space.input_size),
        fisher_potential=best.score,
        seconds=result.seconds,
        result=result,
    )
    _logger.info("student of %s: %s, %d params", space.model_name, " ".join(genotype.blocks), best.params)
    return student


def save_student(student: nn.Module, path: Union[str, Path], extra: Optional[Dict[str, Any]] = None) -> None:
    """Save a student's weights with its genotype and class count, atomically (temporary file, then rename).

    Raises:
        BlockSwapError: If ``student`` has no ``blockswap_genotype``.
    """
    genotype = getattr(student, "blockswap_genotype", None)
    if genotype is None:
        raise BlockSwapError("the model has no blockswap_genotype; build students with blockswap() or apply_genotype()")
    state = {
        "state_dict": student.state_dict(),
        "blockswap_genotype": genotype.to_dict(),
        "num_classes": getattr(student, "num_classes", None),
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint_genotype(checkpoint: Dict[str, Any]) -> Optional[Genotype]:
    """Return the genotype stored in a student checkpoint dict, or None for a plain model checkpoint.

    Reads both :func:`save_student` files and training checkpoints written by
    :class:`timm.utils.CheckpointSaver` with a BlockSwap task (``task_state``).
    """
    data = checkpoint.get("blockswap_genotype")
    if data is None:
        data = (checkpoint.get("task_state") or {}).get("blockswap_genotype")
    return None if data is None else Genotype.from_dict(data)


def load_student(
    path: Union[str, Path], model: Optional[nn.Module] = None, **create_kwargs: Any
) -> nn.Module:
    """Rebuild a student from a checkpoint and load its weights with ``strict=True``.

    Args:
        path: A :func:`save_student` file or a training checkpoint of ``tools/train_timm.py``.
        model: The original model to apply the genotype to; created with
            ``timm.create_model(genotype.model, num_classes=..., **create_kwargs)`` when omitted.
        create_kwargs: Extra arguments for ``timm.create_model``.

    Raises:
        BlockSwapError: If the file is missing or carries no genotype.
    """
    import timm

    path = Path(path)
    if not path.is_file():
        raise BlockSwapError(f"checkpoint not found: {path}; pass the path of a student checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    genotype = read_checkpoint_genotype(checkpoint)
    if genotype is None:
        raise BlockSwapError(
            f"{path} carries no BlockSwap genotype; it is not a student checkpoint (load it with timm instead)"
        )
    if model is None:
        kwargs = dict(create_kwargs)
        if checkpoint.get("num_classes") is not None:
            kwargs.setdefault("num_classes", checkpoint["num_classes"])
        model = timm.create_model(genotype.model, **kwargs)
    student = apply_genotype(model, genotype)
    student.load_state_dict(checkpoint["state_dict"], strict=True)
    return student
