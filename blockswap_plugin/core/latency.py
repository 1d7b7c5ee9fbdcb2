"""Forward latency lookup table: measured once per device, cached, summed per genotype.

Every (site, block type) pair of a :class:`~blockswap_plugin.core.space.SwapSpace`
is timed on its own, in eval mode, at the site's input shape and a chosen batch
size. A genotype's predicted latency is a fixed part plus one table entry per
site, so budgets on latency cost no network builds during sampling.

Blocks timed on their own take longer than inside a network (their inputs
are not in cache, each call has its own overhead): on one CPU thread the plain
sum overestimated whole WRN-16-2 candidates by up to 26 %. So the table is
calibrated. The host model and a few candidates, from the cheapest blocks to
the dearest, are timed whole, and a least-squares line ``measured = fixed +
scale * sum of block entries`` over them sets the fixed part and a scale that
multiplies every entry. The plain sums (scale 1, the fixed part being the
host model's latency minus that of its own blocks) are kept where they fit
the timed networks better, and where no candidate builder is given.

Tables are cached as JSON under ``$BLOCKSWAP_CACHE/latency`` (default
``~/.cache/blockswap-plugin/latency``), keyed by the model, its sites, the
input size, the batch size, the device name, the thread count and the torch version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
# Whole candidates timed to calibrate a table, besides the host model.
CALIBRATION_CANDIDATES = 6
# Seed of the random steps in the calibration genotypes, apart from any search seed.
_CALIBRATION_SEED = 20200426
# Bumped when the way tables are measured changes, so cached tables are measured again.
_TABLE_VERSION = 3


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
        fixed_ms: Fixed part of every prediction (calibrated offset, see the module notes).
        rows: One ``{block type: milliseconds}`` dict per site, each block timed on its own.
        teacher_ms: Measured latency of the whole host model.
        key: Cache key of the table.
        meta: Free-form notes (torch version, input size, calibration figures).
        scale: Factor on every row entry (calibrated, 1 without calibration).
    """

    model: str
    batch_size: int
    device: str
    num_threads: int
    fixed_ms: float
    rows: List[Dict[str, float]]
    teacher_ms: float
    key: str = ""
    meta: Dict[str, object] = field(default_factory=dict)
    scale: float = 1.0

    def predict(self, genotype: Sequence[str]) -> float:
        """Predicted forward latency of a genotype in milliseconds."""
        blocks = getattr(genotype, "blocks", genotype)
        return self.fixed_ms + self.scale * sum(self.rows[i][name] for i, name in enumerate(blocks))

    def cost_table(self) -> CostTable:
        """Return the table in the sampler's form (scaled entries), for a ``latency_ms`` budget."""
        return self.fixed_ms, [{name: self.scale * ms for name, ms in row.items()} for row in self.rows]

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def _cache_key(space: SwapSpace, batch_size: int, device: torch.device, num_threads: int,
               calibrated: bool) -> str:
    sites = [(s.in_channels, s.out_channels, s.stride, s.input_shape) for s in space.sites]
    text = json.dumps([
        space.model_name, sites, space.block_types, space.fixed_params, list(space.input_size),
        batch_size, device_name(device), str(torch.device(device)), num_threads, torch.__version__,
        _TABLE_VERSION, CALIBRATION_CANDIDATES if calibrated else 0,
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
    build_candidate: Optional[Callable[[Sequence[str]], nn.Module]] = None,
) -> LatencyTable:
    """Measure the latency table of ``space`` on ``device``.

    Args:
        space: The space; its ``build_block`` builds each block on its own.
        model: The host model the space was made from (for the fixed part).
        batch_size: Batch size of the measurements.
        device: Device to measure on.
        num_threads: Torch threads; the current count by default.
        progress: Show a tqdm progress bar.
        build_candidate: Builds a whole candidate from block names; when
            given, :data:`CALIBRATION_CANDIDATES` candidates are timed to
            calibrate the table (see the module notes).
    """
    if batch_size < 1:
        raise BlockSwapError(f"latency batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    num_threads = num_threads or torch.get_num_threads()
    _logger.info("measuring latency table of %s at batch %d on %s (%d threads)",
                 space.model_name, batch_size, device_name(device), num_threads)

    def timed(module: nn.Module, shape: Sequence[int]) -> float:
        return measure_latency(module, (batch_size, *shape), device, num_threads)

    cache: Dict[Tuple, float] = {}
    rows: List[Dict[str, float]] = []
    calibration = CALIBRATION_CANDIDATES if build_candidate is not None else 0
    total = sum(len(space.choices(i)) for i in range(len(space))) + calibration
    with tqdm(total=total, desc="latency table", unit="block", disable=not progress) as bar:
        for index, site in enumerate(space.sites):
            row = {}
            for name in space.choices(index):
                key = (site.in_channels, site.out_channels, site.stride, site.input_shape, name)
                if key not in cache:
                    cache[key] = timed(space.build_block(site, name), site.input_shape)
                row[name] = round(cache[key], 5)
                bar.update(1)
            rows.append(row)

        teacher_ms = timed(model, space.input_size)
        own_blocks_ms = sum(timed(model.get_submodule(site.name), site.input_shape) for site in space.sites)
        # (sum of block entries, measured whole) for each calibration network.
        points = [(own_blocks_ms, teacher_ms)]
        for blocks in _calibration_genotypes(space, rows, calibration):
            summed = sum(rows[i][name] for i, name in enumerate(blocks))
            points.append((summed, timed(build_candidate(blocks), space.input_size)))
            bar.update(1)

    plain = (teacher_ms - own_blocks_ms, 1.0)
    fixed_ms, scale = _fit_line(points) if calibration else plain
    meta: Dict[str, object] = {"torch": torch.__version__, "input_size": "x".join(map(str, space.input_size))}
    if calibration:
        def worst(line: Tuple[float, float]) -> float:
            return max(abs(line[0] + line[1] * x - y) / y for x, y in points)

        # The plain sums are kept where they fit the timed networks better.
        # NOTE: one line cannot model which block types run slower inside a
        # network. For WRN-40-2 at batch 1 on one CPU thread, calibrated
        # predictions were off by -4 to +34 % on 6 candidates (plain sums by
        # -23 to -1 %); at batch 8 on WRN-16-2 they stayed within 11 %.
        if worst(plain) <= worst((fixed_ms, scale)):
            fixed_ms, scale = plain
        meta["calibration"] = {"networks": len(points), "worst_relative_error": round(worst((fixed_ms, scale)), 4),
                               "plain_worst_relative_error": round(worst(plain), 4),
                               "block_sum_ms": [round(x, 4) for x, _ in points],
                               "measured_ms": [round(y, 4) for _, y in points]}
    table = LatencyTable(
        space.model_name, batch_size, device_name(device), num_threads,
        round(fixed_ms, 5), rows, round(teacher_ms, 5),
        key=_cache_key(space, batch_size, device, num_threads, bool(calibration)), meta=meta, scale=round(scale, 6),
    )
    _logger.info("latency table done: teacher %.3f ms, fixed part %.3f ms, scale %.3f", teacher_ms,
                 table.fixed_ms, table.scale)
    return table


def _calibration_genotypes(space: SwapSpace, rows: List[Dict[str, float]], count: int) -> List[List[str]]:
    """Return ``count`` genotypes whose block sums spread from the cheapest to the dearest.

    Genotype ``k`` takes, at every site, the block type near quantile
    ``k / (count - 1)`` of that site's entries, moved by one rank at random.
    Random genotypes alone have nearly equal sums, which leave the slope of
    the calibration line to noise.
    """
    rng = random.Random(_CALIBRATION_SEED)
    genotypes = []
    for k in range(count):
        quantile = k / (count - 1) if count > 1 else 0.5
        blocks = []
        for index in range(len(space)):
            ranked = sorted(space.choices(index), key=lambda name: (rows[index][name], name))
            position = round(quantile * (len(ranked) - 1)) + rng.choice((-1, 0, 1))
            blocks.append(ranked[min(len(ranked) - 1, max(0, position))])
        genotypes.append(blocks)
    return genotypes


def _fit_line(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares ``y = fixed + scale * x`` through ``(x, y)`` points; with one point, scale 1.

    A scale outside 0.2 to 5 means the timings were too noisy to fit, so the
    line falls back to scale 1 through the first point (the host model).
    """
    first_x, first_y = points[0]
    fallback = (first_y - first_x, 1.0)
    if len(points) < 2:
        return fallback
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread <= 0:
        return fallback
    scale = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    if not 0.2 <= scale <= 5.0:
        _logger.warning("latency calibration gave scale %.3f, outside 0.2 to 5; keeping the plain block sums",
                        scale)
        return fallback
    return mean_y - scale * mean_x, scale


def load_or_build_latency_table(
    space: SwapSpace,
    model: nn.Module,
    batch_size: int = 1,
    device: torch.device = torch.device("cpu"),
    num_threads: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    progress: bool = True,
    build_candidate: Optional[Callable[[Sequence[str]], nn.Module]] = None,
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
        build_candidate: Builds a whole candidate from block names; when
            given, the table is calibrated (calibrated and plain tables are
            cached apart).
    """
    num_threads = num_threads or torch.get_num_threads()
    key = _cache_key(space, batch_size, device, num_threads, build_candidate is not None)
    path = Path(cache_dir or _cache_dir()) / f"{space.model_name}-b{batch_size}-t{num_threads}-{key}.json"
    if path.is_file():
        try:
            table = LatencyTable.load(path)
        except (ValueError, TypeError) as exc:
            _logger.warning("ignoring unreadable latency table %s (%s); measuring again", path, exc)
        else:
            _logger.info("latency table read from %s", path)
            return table
    table = build_latency_table(space, model, batch_size, device, num_threads, progress, build_candidate)
    table.save(path)
    _logger.info("latency table written to %s", path)
    return table
