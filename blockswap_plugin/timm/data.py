"""Load one scoring minibatch with timm's dataset readers.

Anything ``timm.data.create_dataset`` reads works: an image folder with one
folder per class, or a tar file of such folders (the CIFAR-10 copies in
``train.tar``). The minibatch gets the training augmentation, as the Fisher
potential is measured in the BlockSwap paper.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from timm.data import create_dataset, create_transform
from torchvision import transforms

from ..core.errors import BlockSwapError

__all__ = ["load_minibatch", "cifar_train_transform", "open_image_dataset", "count_classes"]

_logger = logging.getLogger(__name__)

_DATA_FIX = "pass an image folder with one subfolder of images per class, or a tar file of such folders"

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar_train_transform(size: int = 32, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Random crop with 4-pixel padding, horizontal flip, normalisation: the CIFAR training augmentation."""
    return transforms.Compose([
        transforms.RandomCrop(size, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def open_image_dataset(path: str, transform=None):
    """Open an image-folder dataset or tar file with timm, with a clear error when it is missing.

    Raises:
        BlockSwapError: If ``path`` does not exist or holds no images.
    """
    root = Path(path)
    if not root.exists():
        raise BlockSwapError(
            f"data path not found: {path}; pass --data pointing at an image folder or a tar file of class "
            "folders, such as a CIFAR-10 train.tar"
        )
    try:
        dataset = create_dataset("", root=str(root), split="train", is_training=True, transform=transform)
    except Exception as exc:  # timm raises several types for unreadable inputs
        if "Found 0 images" in str(exc):
            raise BlockSwapError(f"no images found in {path}; {_DATA_FIX}") from None
        raise BlockSwapError(f"cannot read images from {path} ({exc}); {_DATA_FIX}") from None
    if len(dataset) == 0:
        raise BlockSwapError(f"no images found in {path}; {_DATA_FIX}")
    return dataset


def count_classes(dataset) -> Optional[int]:
    """Return the number of classes a timm image dataset found, or None when its reader has no class map."""
    reader = getattr(dataset, "reader", None)
    # timm's folder reader names its map class_to_idx, its tar reader class_name_to_idx.
    for attribute in ("class_to_idx", "class_name_to_idx"):
        mapping = getattr(reader, attribute, None)
        if mapping:
            return len(mapping)
    return None


def load_minibatch(
    path: str,
    batch_size: int = 128,
    seed: int = 0,
    input_size: Sequence[int] = (3, 32, 32),
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    dataset=None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Draw ``batch_size`` random training images with augmentation.

    Args:
        path: Image folder or tar file of class folders.
        batch_size: Number of images.
        seed: Seed for the choice of images and their augmentation.
        input_size: ``(C, H, W)``; 32x32 uses the CIFAR augmentation, other
            sizes use timm's training transform.
        mean: Normalisation mean; CIFAR-10's for 32x32, ImageNet's otherwise.
        std: Normalisation standard deviation, as for ``mean``.
        dataset: The dataset :func:`open_image_dataset` already opened at
            ``path``, so that the images are not listed again (reading the
            CIFAR-10 tar's index took about 1.5 s here). Its ``transform``
            is replaced by the training augmentation.

    Returns:
        ``(images, labels, num_classes)``.
    """
    if batch_size < 1:
        raise BlockSwapError(f"batch size must be at least 1, got {batch_size}")
    _, height, width = input_size
    if (height, width) == (32, 32):
        transform = cifar_train_transform(32, mean or CIFAR10_MEAN, std or CIFAR10_STD)
    else:
        kwargs = {} if mean is None else {"mean": tuple(mean), "std": tuple(std)}
        transform = create_transform(tuple(input_size), is_training=True, **kwargs)
    if dataset is None:
        dataset = open_image_dataset(path, transform)
    else:
        dataset.transform = transform
    num_classes = count_classes(dataset)
    if num_classes is not None and num_classes < 2:
        # With one class the cross-entropy gradient is zero, so every Fisher potential would be 0.
        raise BlockSwapError(
            f"{path} contains images of {num_classes} class; scoring needs at least 2 classes, "
            "one subfolder (or tar folder) of images per class"
        )
    if batch_size > len(dataset):
        raise BlockSwapError(f"batch size {batch_size} is larger than the {len(dataset)} images in {path}")

    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:batch_size].tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([int(label) for _, label in samples], dtype=torch.long)
    _logger.info("loaded %d images from %s (%d classes)", batch_size, path, num_classes or -1)
    return images, labels, num_classes or int(labels.max()) + 1
