"""CPU inference latency per image of an mmdet detector config.

mmdet's ``tools/analysis_tools/benchmark.py`` needs CUDA, so this module
times ``model.test_step`` on single images of the config's test dataloader
(preprocessing, forward and post-processing with NMS; image loading
excluded) on the CPU::

    python -m blockswap_plugin.mmdet.latency CONFIG [--checkpoint CKPT] [--images 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List, Optional

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmengine.runner.checkpoint import load_checkpoint

__all__ = ["measure_latency", "main"]


def measure_latency(
    config: str, checkpoint: Optional[str] = None, num_images: int = 30, warmup: int = 3, threads: Optional[int] = None
) -> Dict[str, float]:
    """Return the median and mean milliseconds per image of ``model.test_step`` on the CPU.

    Args:
        config (str): Path of an mmdet config.
        checkpoint (str, optional): Weights to load; random weights when None
            (post-processing time then depends on how many boxes pass the
            score threshold). Defaults to None.
        num_images (int): Images timed, after the warm-up. Defaults to 30.
        warmup (int): Images run first and not timed. Defaults to 3.
        threads (int, optional): ``torch.set_num_threads`` value; torch's
            default when None. Defaults to None.
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    cfg.test_dataloader.batch_size = 1
    loader = Runner.build_dataloader(cfg.test_dataloader)

    from mmdet.registry import MODELS

    model = MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location="cpu", strict=True)
    model.eval()

    times: List[float] = []
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index == warmup + num_images:
                break
            start = time.perf_counter()
            model.test_step(batch)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "images": len(times),
        "threads": torch.get_num_threads(),
    }


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="CPU inference latency per image of an mmdet detector config")
    parser.add_argument("config", help="mmdet config file")
    parser.add_argument("--checkpoint", help="checkpoint to load (random weights when omitted)")
    parser.add_argument("--images", type=int, default=30, help="number of timed images (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed images run first (default 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args(argv)
    result = measure_latency(args.config, args.checkpoint, args.images, args.warmup, args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
