"""Forward latency lookup table: measured once per device, cached, summed per genotype.

Every (site, block type) pair of a :class:`~blockswap_plugin.core.space.SwapSpace`
is timed on its own, in eval mode, at the site's input shape and a chosen batch
size. A genotype's predicted latency is a fixed part plus one table entry per
site, so budgets on latency cost no network builds during sampling.

Blocks timed on their own run at a different speed than inside a network
(their inputs and weights stay in cache, each call has its own overhead), so
the table is calibrated. The host model and a few candidates, half spread
from the cheapest blocks to the dearest and half drawn at random, are timed
whole, and a line ``measured = fixed + scale * sum of block entries``, fitted
to them by least relative squares, sets the fixed part and a scale that
multiplies every entry. The plain sums (scale 1, the fixed part being the
host model's latency minus that of its own blocks) are kept where they fit
the timed networks better, and where no candidate builder is given.

Every block and network is timed on a few freshly built copies, in rounds,
and keeps its fastest copy (:func:`measure_best_latency`). Modules whose two
fastest copies differ by more than 3 % get more rounds, up to 6 copies.

Tables are cached as JSON under ``$BLOCKSWAP_CACHE/latency`` (default
``~/.cache/blockswap-plugin/latency``), keyed by the model, its sites, the
input size, the batch size, the device name, the thread count and the torch version.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .block_cache import cpu_block_cache
from .cache import cache_root
from .errors import BlockSwapError
from .fused import fused_kernel
from .genotype import write_json_atomic
from .sampler import CostTable
from .space import SwapSpace
from .workers import limit_threads

__all__ = [
    "LatencyTable", "measure_latency", "measure_best_latency", "build_latency_table", "load_or_build_latency_table",
    "device_name",
]

_logger = logging.getLogger(__name__)

# Seconds of repeated runs behind each measurement.
_MIN_RUN_TIME = 0.1
# Freshly built copies of each block and network that a table times (see measure_best_latency).
_COPIES = 3
# More copies, up to _MAX_COPIES, are timed while the two fastest times of a module differ by more than
# _AGREEMENT. On a shared CPU guest one network timed 15.6 to 18.4 ms within seconds, and the fastest
# of 3 copies of one teacher ranged from 15.3 to 18.6 ms between tables built minutes apart.
_MAX_COPIES = 6
_AGREEMENT = 0.03

# Whole candidates timed to calibrate a table, besides the host model.
CALIBRATION_CANDIDATES = 10
# Seed of the random steps in the calibration genotypes, apart from any search seed.
_CALIBRATION_SEED = 20200426
# Bumped when the way tables are measured changes, so cached tables are measured again.
_TABLE_VERSION = 6


def _settled(times: Sequence[float]) -> bool:
    """Return whether the two fastest of ``times`` agree within :data:`_AGREEMENT`."""
    if len(times) < 2:
        return False
    first, second = sorted(times)[:2]
    return second <= first * (1 + _AGREEMENT)


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

    With one CPU thread the latency is the lowest CPU time of the thread over
    the runs, which other processes on a shared machine barely disturb.
    Otherwise it is the fastest wall-clock run (CUDA runs are synchronised).
    On CPU, tensors of 1 MB and more come from the block cache
    (:func:`~blockswap_plugin.core.block_cache.cpu_block_cache`) while the
    runs last, so each run reuses the memory of the run before, as CUDA's
    caching allocator does.

    NOTE: with glibc's allocator alone, a WRN-16-2 candidate at batch 8
    faulted in about 3,000 new pages per run in most built copies and none
    in some, and timed 10.4 to 14.8 ms by copy. With the block cache most
    copies timed 10.0 to 10.1 ms. Without the compiled helpers the cache is
    not there, and timings spread that much.

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
    memory = cpu_block_cache() if device.type == "cpu" else contextlib.nullcontext()
    with limit_threads(num_threads), memory:
        for _ in range(3):
            module(x)
        deadline = time.perf_counter() + min_run_time
        while len(times) < 5 or time.perf_counter() < deadline:
            start = clock()
            module(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - start)
    return min(times) * 1e3


def measure_best_latency(
    make_module: Callable[[], nn.Module],
    input_shape: Sequence[int],
    device: torch.device = torch.device("cpu"),
    num_threads: Optional[int] = None,
    copies: int = _COPIES,
    min_run_time: float = _MIN_RUN_TIME,
) -> float:
    """Return the lowest :func:`measure_latency` over ``copies`` or more modules made by ``make_module``.

    With two or more copies, more are timed, up to 6, while the two fastest
    times differ by more than 3 %.

    Tensors under 1 MB still come from glibc, which in some built copies
    maps and faults in fresh pages on every run. On the project's CPU guest,
    a WRN-16-2 candidate at batch 8 faulted in about 1,000 pages per run in
    2 of 12 copies, and timed 11.4 instead of 10.0 ms in them. Keeping the
    fastest of a few copies leaves such copies out.
    """
    copies = max(1, copies)
    limit = max(copies, _MAX_COPIES) if copies > 1 else 1
    times: List[float] = []
    while len(times) < copies or (len(times) < limit and not _settled(times)):
        times.append(measure_latency(make_module(), input_shape, device, num_threads, min_run_time))
    return min(times)


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
    if device.type == "cpu":
        # CPU timings use the block cache of the compiled helpers. A first build takes about a minute, so
        # it runs before the progress bar starts and its log line does not land on the bar's line.
        fused_kernel()

    def timed(module: nn.Module, shape: Sequence[int]) -> float:
        return measure_latency(module, (batch_size, *shape), device, num_threads)

    def fastest_in_rounds(measurements: List[Callable[[], float]]) -> List[float]:
        # One fresh copy of every module per round, and each keeps its fastest
        # round. A slow spell of the machine then spoils one round of many
        # modules, not every round of one. Rounds after the first _COPIES time
        # only the modules whose two fastest rounds still disagree.
        times: List[List[float]] = [[] for _ in measurements]
        for round_index in range(_MAX_COPIES):
            pending = [index for index in range(len(measurements))
                       if round_index < _COPIES or not _settled(times[index])]
            if not pending:
                break
            if round_index >= _COPIES:
                bar.total += len(pending)
                bar.refresh()
            for index in pending:
                times[index].append(measurements[index]())
                bar.update(1)
        return [min(entry) for entry in times]

    def entry_key(site, name: str) -> Tuple:
        # Sites of the same shape share their entries.
        return site.in_channels, site.out_channels, site.stride, site.input_shape, name

    pairs: Dict[Tuple, Tuple[int, str]] = {}
    for index, site in enumerate(space.sites):
        for name in space.choices(index):
            pairs.setdefault(entry_key(site, name), (index, name))
    calibration = CALIBRATION_CANDIDATES if build_candidate is not None else 0
    total = (len(pairs) + calibration + 1) * _COPIES
    with tqdm(total=total, desc="latency table", unit="module", disable=not progress) as bar:
        block_ms = fastest_in_rounds([
            lambda site=space.sites[index], name=name: timed(space.build_block(site, name), site.input_shape)
            for index, name in pairs.values()
        ])
        best = dict(zip(pairs, block_ms))
        rows = [{name: round(best[entry_key(site, name)], 5) for name in space.choices(index)}
                for index, site in enumerate(space.sites)]

        own_blocks_ms = sum(timed(model.get_submodule(site.name), site.input_shape) for site in space.sites)
        genotypes = _calibration_genotypes(space, rows, calibration)
        whole_ms = fastest_in_rounds(
            [lambda: timed(copy.deepcopy(model), space.input_size)]
            + [lambda blocks=blocks: timed(build_candidate(blocks), space.input_size) for blocks in genotypes]
        )
        teacher_ms = whole_ms[0]
        # (sum of block entries, measured whole) for each calibration network.
        points = [(own_blocks_ms, teacher_ms)]
        for blocks, measured in zip(genotypes, whole_ms[1:]):
            points.append((sum(rows[i][name] for i, name in enumerate(blocks)), measured))

    plain = (teacher_ms - own_blocks_ms, 1.0)
    fixed_ms, scale = _fit_line(points) if calibration else plain
    meta: Dict[str, object] = {"torch": torch.__version__, "input_size": "x".join(map(str, space.input_size))}
    if calibration:
        def worst(line: Tuple[float, float]) -> float:
            return max(abs(line[0] + line[1] * x - y) / y for x, y in points)

        # The plain sums are kept where they fit the timed networks better.
        # NOTE: one line cannot model which block types run slower inside a
        # network. At batch 8 on WRN-16-2 on one CPU thread, predictions of
        # random candidates were within 3 % of their measured latency.
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
    """Return ``count`` calibration genotypes: half spread over the block sums, half drawn at random.

    Spread genotype ``k`` of ``n`` takes, at every site, the block type near
    quantile ``k / (n - 1)`` of that site's entries, moved by one rank at
    random. Random genotypes alone have nearly equal sums, which leave the
    slope of the calibration line to noise. The random half has the sums
    that a search meets most, where the line should fit best.
    """
    rng = random.Random(_CALIBRATION_SEED)
    spread = (count + 1) // 2
    genotypes = []
    for k in range(spread):
        quantile = k / (spread - 1) if spread > 1 else 0.5
        blocks = []
        for index in range(len(space)):
            ranked = sorted(space.choices(index), key=lambda name: (rows[index][name], name))
            position = round(quantile * (len(ranked) - 1)) + rng.choice((-1, 0, 1))
            blocks.append(ranked[min(len(ranked) - 1, max(0, position))])
        genotypes.append(blocks)
    for _ in range(count - spread):
        genotypes.append([rng.choice(space.choices(index)) for index in range(len(space))])
    return genotypes


def _fit_line(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Fit ``y = fixed + scale * x`` through ``(x, y)`` points by least relative squares.

    Each point is weighted by ``1 / y**2``, so the line minimises relative
    errors (the errors that budgets care about), and a slow network does not
    pull the line away from the fast ones. With one point, or a scale outside
    0.2 to 5 (timings too noisy to fit), the line falls back to scale 1
    through the first point (the host model).
    """
    first_x, first_y = points[0]
    fallback = (first_y - first_x, 1.0)
    if len(points) < 2:
        return fallback
    weights = [1.0 / (y * y) for _, y in points]
    total = sum(weights)
    mean_x = sum(w * x for w, (x, _) in zip(weights, points)) / total
    mean_y = sum(w * y for w, (_, y) in zip(weights, points)) / total
    spread = sum(w * (x - mean_x) ** 2 for w, (x, _) in zip(weights, points))
    if spread <= 1e-12 * total * max(1.0, mean_x * mean_x):
        return fallback
    scale = sum(w * (x - mean_x) * (y - mean_y) for w, (x, y) in zip(weights, points)) / spread
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
