#!/usr/bin/env python
"""Train a teacher, distil a BlockSwap student, or evaluate a checkpoint, with timm's training pieces.

Configs are YAML files (``configs/timm/``); ``--set key=value`` overrides one
entry (dotted keys reach nested sections, values are parsed as YAML)::

    python tools/train_timm.py --config configs/timm/cifar10_demo_teacher.yaml
    python tools/train_timm.py --config configs/timm/cifar10_demo_student_at.yaml --set epochs=2
    torchrun --nproc_per_node 2 tools/train_timm.py --config ... --set device=cpu

Modes (``mode``): ``train`` trains ``model`` (a teacher, or a student when the
``student`` section is set) and saves checkpoints with
:class:`timm.utils.CheckpointSaver`; ``evaluate`` reports top-1 of
``checkpoint`` on the validation split and writes ``<output>/eval.json``.
Students get their genotype from ``student.genotype`` (a JSON file) or from a
search at ``student.budget``; their checkpoints carry the genotype.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import yaml
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from timm.data import create_dataset, create_loader  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.task import ClassificationTask, resume_task_checkpoint  # noqa: E402
from timm.utils import AverageMeter, CheckpointSaver, accuracy, unwrap_model  # noqa: E402

import blockswap_plugin as bp  # noqa: E402
from blockswap_plugin.api import read_checkpoint_genotype  # noqa: E402
from blockswap_plugin.core.genotype import write_json_atomic  # noqa: E402
from blockswap_plugin.timm.data import load_minibatch  # noqa: E402
from blockswap_plugin.timm.task import AttentionTransferTask  # noqa: E402

_logger = logging.getLogger("train_timm")

DEFAULTS: Dict[str, Any] = {
    "mode": "train",
    "model": "wrn_16_2",
    "num_classes": 10,
    "data_dir": "../shared/data/cifar10",
    "train_split": "train.tar",
    "val_split": "test.tar",
    "train_subset": 0,
    "val_subset": 0,
    "input_size": [3, 32, 32],
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
    "augment": "cifar",
    "cutout": 16,
    "batch_size": 128,
    "epochs": 200,
    "opt": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "sched": "cosine",
    "min_lr": 0.0,
    "warmup_epochs": 0,
    "decay_epochs": 30,
    "decay_rate": 0.1,
    "workers": 2,
    "seed": 0,
    "threads": 0,
    "device": "cpu",
    "amp": False,
    "amp_dtype": "bfloat16",
    "channels_last": False,
    "output": "output/timm/run",
    "resume": "",
    "checkpoint": "",
    "log_interval": 50,
    "student": None,
    "teacher": None,
    "distill": {"beta": 1000.0, "kd_weight": 0.0, "temperature": 4.0},
}


class Cutout:
    """Zero one ``size`` x ``size`` square at a random centre of a C x H x W tensor (DeVries and Taylor, 2017)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        cy = int(torch.randint(height, (1,)))
        cx = int(torch.randint(width, (1,)))
        half = self.size // 2
        image = image.clone()
        image[:, max(0, cy - half):cy + half, max(0, cx - half):cx + half] = 0
        return image


def load_config(path: Optional[str], overrides) -> Dict[str, Any]:
    """Merge the defaults, a YAML file and ``key=value`` overrides."""
    config = json.loads(json.dumps(DEFAULTS))
    if path:
        if not Path(path).is_file():
            raise bp.BlockSwapError(f"config file not found: {path}; pass a YAML file from configs/timm/")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise bp.BlockSwapError(f"{path}: unknown config keys {unknown}; valid keys: {sorted(DEFAULTS)}")
        config.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise bp.BlockSwapError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = yaml.safe_load(value)
    return config


def _subset_(dataset, count: int, seed: int) -> None:
    """Keep ``count`` random samples (same for every process) of a timm image dataset."""
    if not count or count >= len(dataset):
        return
    reader = dataset.reader
    generator = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(dataset), generator=generator)[:count].tolist())
    reader.samples = [reader.samples[i] for i in keep]
    if getattr(reader, "targets", None) is not None:
        reader.targets = [reader.targets[i] for i in keep]


def _split_path(config: Dict[str, Any], key: str) -> str:
    path = Path(config["data_dir"]) / config[key]
    if not path.exists():
        raise bp.BlockSwapError(
            f"{key} not found: {path}; set data_dir to a folder that contains {config[key]} (CIFAR-10 class-folder tar)"
        )
    return str(path)


def create_loaders(config: Dict[str, Any], distributed: bool, train: bool = True):
    """Build the train and validation loaders with timm's dataset and loader factories."""
    size = tuple(config["input_size"])
    common = dict(mean=tuple(config["mean"]), std=tuple(config["std"]), use_prefetcher=False,
                  num_workers=config["workers"], device=torch.device(config["device"]))
    train_loader = None
    if train:
        train_set = create_dataset("", root=_split_path(config, "train_split"), is_training=True)
        _subset_(train_set, config["train_subset"], config["seed"])
        train_loader = create_loader(train_set, size, config["batch_size"], is_training=True,
                                     distributed=distributed, **common)
        if config["augment"] == "cifar":
            # The BlockSwap CIFAR recipe: 4-pixel padded crop, flip, Cutout; timm has no preset for it.
            ops = [transforms.RandomCrop(size[-1], padding=4), transforms.RandomHorizontalFlip(),
                   transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])]
            if config["cutout"]:
                ops.append(Cutout(config["cutout"]))
            train_set.transform = transforms.Compose(ops)
    val_set = create_dataset("", root=_split_path(config, "val_split"), is_training=False)
    _subset_(val_set, config["val_subset"], config["seed"] + 1)
    val_loader = create_loader(val_set, size, config["batch_size"], is_training=False, crop_pct=1.0, **common)
    if config["augment"] == "cifar":
        val_set.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
    return train_loader, val_loader


def _load_weights(model: torch.nn.Module, path: str) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=True)


def create_teacher(config: Dict[str, Any]) -> Optional[torch.nn.Module]:
    section = config.get("teacher")
    if not section:
        return None
    teacher = timm.create_model(section.get("model", config["model"]), num_classes=config["num_classes"])
    if not section.get("checkpoint"):
        raise bp.BlockSwapError("teacher.checkpoint is missing; train a teacher first and point to its checkpoint")
    _load_weights(teacher, section["checkpoint"])
    _logger.info("teacher %s loaded from %s", section.get("model", config["model"]), section["checkpoint"])
    return teacher


def create_student(config: Dict[str, Any], rank: int, distributed: bool) -> torch.nn.Module:
    """Apply the configured genotype, or search one on rank 0 and share it through a file."""
    section = config["student"]
    base = timm.create_model(config["model"], num_classes=config["num_classes"])
    genotype_path = section.get("genotype")
    if not genotype_path:
        genotype_path = str(Path(config["output"]) / "genotype.json")
        if rank == 0 and not Path(genotype_path).exists():
            images, labels, _ = load_minibatch(_split_path(config, "train_split"), section.get("search_batch", 128),
                                               config["seed"], tuple(config["input_size"]))
            searched = bp.blockswap(base, (images, labels), section["budget"],
                                    num_samples=section.get("num_samples", 1000), seed=config["seed"])
            searched.blockswap_genotype.save(genotype_path)
        if distributed:
            dist.barrier()
    return bp.apply_genotype(base, genotype_path)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device) -> Dict[str, float]:
    """Return top-1 and top-5 accuracy (%) and the mean loss of ``model`` on ``loader``."""
    model.eval()
    top1, top5, losses = AverageMeter(), AverageMeter(), AverageMeter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        acc1, acc5 = accuracy(logits, labels, topk=(1, 5))
        top1.update(acc1.item(), images.shape[0])
        top5.update(acc5.item(), images.shape[0])
        losses.update(torch.nn.functional.cross_entropy(logits, labels).item(), images.shape[0])
    return {"top1": top1.avg, "top5": top5.avg, "loss": losses.avg, "images": top1.count}


def run_evaluate(config: Dict[str, Any]) -> Dict[str, float]:
    device = torch.device(config["device"])
    path = config["checkpoint"]
    if not path or not Path(path).is_file():
        raise bp.BlockSwapError(f"checkpoint not found: {path!r}; set checkpoint to a .pth.tar file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if read_checkpoint_genotype(checkpoint) is not None:
        model = bp.load_student(path, num_classes=config["num_classes"])
    else:
        model = timm.create_model(config["model"], num_classes=config["num_classes"])
        model.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=True)
    _, val_loader = create_loaders(config, distributed=False, train=False)
    metrics = evaluate(model.to(device), val_loader, device)
    metrics["params"] = bp.count_params(model)
    write_json_atomic(Path(config["output"]) / "eval.json", metrics)
    _logger.info("evaluation of %s: top-1 %.2f %% on %d images", path, metrics["top1"], metrics["images"])
    return metrics


def _autocast(config: Dict[str, Any]):
    """Return the autocast context for training: ``amp_dtype`` when ``amp`` is on, else a no-op."""
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if config["amp_dtype"] not in dtypes:
        raise bp.BlockSwapError(f"amp_dtype must be one of {sorted(dtypes)}, got {config['amp_dtype']!r}")
    device_type = torch.device(config["device"]).type
    return torch.autocast(device_type, dtype=dtypes[config["amp_dtype"]], enabled=bool(config["amp"]))


def run_train(config: Dict[str, Any], rank: int, world_size: int) -> Dict[str, float]:
    distributed = world_size > 1
    device = torch.device(config["device"])
    torch.manual_seed(config["seed"])
    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)

    if config.get("student"):
        model = create_student(config, rank, distributed)
        teacher = create_teacher(config)
        distill = config["distill"] or {}
        task = AttentionTransferTask(model, teacher, beta=distill.get("beta", 1000.0),
                                     kd_weight=distill.get("kd_weight", 0.0),
                                     temperature=distill.get("temperature", 4.0), device=device)
    else:
        model = timm.create_model(config["model"], num_classes=config["num_classes"])
        task = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), device=device)
    task.to(device)
    if config["channels_last"]:
        # Channels-last helps oneDNN convolutions on CPU (and tensor cores on GPU).
        task.to(memory_format=torch.channels_last)
    autocast = _autocast(config)
    optimizer = create_optimizer_v2(model, opt=config["opt"], lr=config["lr"], momentum=config["momentum"],
                                    weight_decay=config["weight_decay"])
    train_loader, val_loader = create_loaders(config, distributed)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=config["sched"], num_epochs=config["epochs"], min_lr=config["min_lr"],
        warmup_epochs=config["warmup_epochs"], decay_epochs=config["decay_epochs"],
        decay_rate=config["decay_rate"], updates_per_epoch=len(train_loader),
    )
    start_epoch = 0
    if config["resume"]:
        start_epoch = resume_task_checkpoint(task, config["resume"], optimizer=optimizer) or 0
        _logger.info("resumed from %s at epoch %d", config["resume"], start_epoch)
        # The learning rate follows the epoch, so the scheduler has to start where training stopped.
        scheduler.step(start_epoch)
    if distributed:
        task.prepare_distributed()
    saver = None
    if rank == 0:
        saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model=config["model"]),
                                checkpoint_dir=str(output), recovery_dir=str(output), max_history=1, task=task)
    _logger.info("training %s for %d epochs on %d images (%d processes)", config["model"], num_epochs,
                 len(train_loader.dataset), world_size)

    metrics: Dict[str, float] = {}
    for epoch in range(start_epoch, num_epochs):
        if distributed and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        task.train()
        losses = AverageMeter()
        started = time.perf_counter()
        for step, (images, labels) in enumerate(train_loader):
            images = images.to(device)
            if config["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                result = task(images, labels.to(device))
            optimizer.zero_grad()
            result["loss"].backward()
            optimizer.step()
            scheduler.step_update(epoch * len(train_loader) + step + 1)
            losses.update(result["loss"].item(), images.shape[0])
            if rank == 0 and step % config["log_interval"] == 0:
                extra = {k: round(float(v.detach()), 4) for k, v in result.items() if k.endswith("_loss")}
                _logger.info("epoch %d step %d/%d loss %.4f %s", epoch, step, len(train_loader), losses.avg, extra)
        scheduler.step(epoch + 1)
        if rank == 0:
            # Only rank 0 validates, so it runs the unwrapped model: DDP would wait for the other ranks.
            metrics = evaluate(unwrap_model(task.get_eval_model()), val_loader, device)
            metrics.update({"epoch": epoch, "train_loss": losses.avg, "epoch_seconds": time.perf_counter() - started})
            _logger.info("epoch %d: train loss %.4f, val top-1 %.2f %%, %.0f s", epoch, losses.avg,
                         metrics["top1"], metrics["epoch_seconds"])
            saver.save_checkpoint(epoch, metric=metrics["top1"])
        if distributed:
            dist.barrier()
    if rank == 0:
        write_json_atomic(output / "train_summary.json", metrics)
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config file (configs/timm/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config entry; dotted keys reach sections (distill.beta=750)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config, args.set)
    except bp.BlockSwapError as exc:
        print(f"train_timm: error: {exc}", file=sys.stderr)
        return 2

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    if world_size > 1:
        dist.init_process_group("gloo" if config["device"] == "cpu" else "nccl")

    try:
        if config["mode"] == "evaluate":
            run_evaluate(config)
        elif config["mode"] == "train":
            run_train(config, rank, world_size)
        else:
            raise bp.BlockSwapError(f"mode must be 'train' or 'evaluate', got {config['mode']!r}")
    except bp.BlockSwapError as exc:
        _logger.error("%s", exc)
        print(f"train_timm: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
