"""Forward latency lookup table: measured once per device, cached, summed per genotype.

Every (site, block type) pair of a :class:`~blockswap_plugin.core.space.SwapSpace`
is timed on its own, in eval mode, at the site's input shape and a chosen batch
size. The part of the network outside the sites (stem, head) is the measured
latency of the whole host model minus the latencies of its own blocks. A
genotype's predicted latency is that fixed part plus one table entry per site,
so budgets on latency cost no network builds during sampling.

Tables are cached as JSON under ``$BLOCKSWAP_CACHE/latency`` (default
``~/.cache/blockswap-plugin/latency``), keyed by the model, its sites, the
input size, the batch size, the device name, the thread count and the torch version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .cache import cache_root
from .errors import BlockSwapError
from .genotype import write_json_atomic
from .sampler import CostTable
from .space import SwapSpace
from .workers import limit_threads

__all__ = ["LatencyTable", "measure_latency", "build_latency_table", "load_or_build_latency_table", "device_name"]

_logger = logging.getLogger(__name__)

# Seconds of repeated runs behind each measurement.
_MIN_RUN_TIME = 0.1


def device_name(device: torch.device) -> str:
    """Human-readable name of the device: the CPU model or the GPU name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@torch.no_grad()
def measure_latency(
    module: nn.Module,
    input_shape: Sequence[int],
    device: torch.device = torch.device("cpu"),
    num_threads: Optional[int] = None,
    min_run_time: float = _MIN_RUN_TIME,
) -> float:
    """Return the forward latency of ``module`` in milliseconds, in eval mode.

    With one CPU thread the latency is the median CPU time of the thread per
    run, which other processes on a shared machine barely disturb. Otherwise
    it is the fastest wall-clock run (CUDA runs are synchronised).

    Args:
        module: Module to time; it is put in eval mode and moved to ``device``.
        input_shape: Input shape including the batch dimension.
        device: Device to run on.
        num_threads: Torch threads during the measurement; the current count by default.
        min_run_time: Seconds of repeated runs; longer is steadier.
    """
    device = torch.device(device)
    module = module.eval().to(device)
    x = torch.randn(*input_shape, device=device)
    num_threads = num_threads or torch.get_num_threads()
    thread_clock = device.type == "cpu" and num_threads == 1
    clock = time.thread_time if thread_clock else time.perf_counter
    times: List[float] = []
    with limit_threads(num_threads):
        for _ in range(3):
            module(x)
        deadline = time.perf_counter() + min_run_time
        while len(times) < 5 or time.perf_counter() < deadline:
            start = clock()
            module(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - start)
    seconds = statistics.median(times) if thread_clock else min(times)
    return seconds * 1e3


@dataclass
class LatencyTable:
    """Measured latency of every (site, block type) pair of a space, in milliseconds.

    Attributes:
        model: Name of the model.
        batch_size: Batch size of the measurements.
        device: Device name (CPU model or GPU name).
        num_threads: Torch threads during the measurements.
        fixed_ms: Latency outside the sites (host model minus its own blocks).
        rows: One ``{block type: milliseconds}`` dict per site.
        teacher_ms: Measured latency of the whole host model.
        key: Cache key of the table.
    """

    model: str
    batch_size: int
    device: str
    num_threads: int
    fixed_ms: float
    rows: List[Dict[str, float]]
    teacher_ms: float
    key: str = ""
    meta: Dict[str, str] = field(default_factory=dict)

    def predict(self, genotype: Sequence[str]) -> float:
        """Predicted forward latency of a genotype in milliseconds."""
        blocks = getattr(genotype, "blocks", genotype)
        return self.fixed_ms + sum(self.rows[i][name] for i, name in enumerate(blocks))

    def cost_table(self) -> CostTable:
        """Return the table in the sampler's form, for a ``latency_ms`` budget."""
        return self.fixed_ms, self.rows

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def _cache_key(space: SwapSpace, batch_size: int, device: torch.device, num_threads: int) -> str:
    sites = [(s.in_channels, s.out_channels, s.stride, s.input_shape) for s in space.sites]
    text = json.dumps([
        space.model_name, sites, space.block_types, space.fixed_params, list(space.input_size),
        batch_size, device_name(device), str(torch.device(device)), num_threads, torch.__version__,
    ])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    return cache_root() / "latency"


def build_latency_table(
    space: SwapSpace,
    model: nn.Module,
    batch_size: int = 1,
    device: torch.device = torch.device("cpu"),
    num_threads: Optional[int] = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure the latency table of ``space`` on ``device``.

    Args:
        space: The space; its ``build_block`` builds each block on its own.
        model: The host model the space was made from (for the fixed part).
        batch_size: Batch size of the measurements.
        device: Device to measure on.
        num_threads: Torch threads; the current count by default.
        progress: Show a tqdm progress bar.
    """
    if batch_size < 1:
        raise BlockSwapError(f"latency batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    num_threads = num_threads or torch.get_num_threads()
    _logger.info("measuring latency table of %s at batch %d on %s (%d threads)",
                 space.model_name, batch_size, device_name(device), num_threads)

    cache: Dict[Tuple, float] = {}
    rows: List[Dict[str, float]] = []
    total = sum(len(space.choices(i)) for i in range(len(space)))
    with tqdm(total=total, desc="latency table", unit="block", disable=not progress) as bar:
        for index, site in enumerate(space.sites):
            row = {}
            for name in space.choices(index):
                key = (site.in_channels, site.out_channels, site.stride, site.input_shape, name)
                if key not in cache:
                    block = space.build_block(site, name)
                    cache[key] = measure_latency(block, (batch_size, *site.input_shape), device, num_threads)
                row[name] = round(cache[key], 5)
                bar.update(1)
            rows.append(row)

    teacher_ms = measure_latency(model, (batch_size, *space.input_size), device, num_threads)
    own_blocks_ms = sum(
        measure_latency(model.get_submodule(site.name), (batch_size, *site.input_shape), device, num_threads)
        for site in space.sites
    )
    table = LatencyTable(
        space.model_name, batch_size, device_name(device), num_threads,
        round(teacher_ms - own_blocks_ms, 5), rows, round(teacher_ms, 5),
        key=_cache_key(space, batch_size, device, num_threads),
        meta={"torch": torch.__version__, "input_size": "x".join(map(str, space.input_size))},
    )
    _logger.info("latency table done: teacher %.3f ms, fixed part %.3f ms", teacher_ms, table.fixed_ms)
    return table


def load_or_build_latency_table(
    space: SwapSpace,
    model: nn.Module,
    batch_size: int = 1,
    device: torch.device = torch.device("cpu"),
    num_threads: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    progress: bool = True,
) -> LatencyTable:
    """Return the cached latency table for this space and device, measuring it on the first call.

    Args:
        space: The space.
        model: The host model the space was made from.
        batch_size: Batch size of the measurements.
        device: Device to measure on.
        num_threads: Torch threads; the current count by default.
        cache_dir: Folder of cached tables; ``$BLOCKSWAP_CACHE/latency`` by default.
        progress: Show a tqdm progress bar while measuring.
    """
    num_threads = num_threads or torch.get_num_threads()
    key = _cache_key(space, batch_size, device, num_threads)
    path = Path(cache_dir or _cache_dir()) / f"{space.model_name}-b{batch_size}-t{num_threads}-{key}.json"
    if path.is_file():
        try:
            table = LatencyTable.load(path)
        except (ValueError, TypeError) as exc:
            _logger.warning("ignoring unreadable latency table %s (%s); measuring again", path, exc)
        else:
            _logger.info("latency table read from %s", path)
            return table
    table = build_latency_table(space, model, batch_size, device, num_threads, progress)
    table.save(path)
    _logger.info("latency table written to %s", path)
    return table
