"""Scoring threads that use all CPU cores of one machine.

Small grouped convolutions scale poorly over the intra-op threads of one
operator, so a search on CPU scores one candidate per core at the same time,
each with a single intra-op thread. The candidates run in threads of the
calling process: torch releases the GIL inside its operators, the imported
libraries (about 700 MB of torch and timm) are resident once, and builders
that are closures need no pickling. On 2 cores this was faster than one
forked worker process per core (0.38 against 0.52 s per WRN-40-2 candidate
in bf16, ``docs/benchmarks.md``). On accelerators scoring runs one candidate
at a time. This module does not build or score candidates itself;
it runs ``score_one(index)`` for a list of indices.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

from .block_cache import cpu_block_cache
from .errors import BlockSwapError

__all__ = [
    "available_cores", "check_num_workers", "default_num_workers", "frozen_heap", "limit_threads", "score_indices",
]

_logger = logging.getLogger(__name__)

# Freed heap memory goes back to the OS after this many candidates. Trimming
# after every candidate kept the resident size lowest but made each candidate
# fault its activation pages in again: 0.54 instead of 0.38 s per WRN-40-2
# candidate on 2 cores. Tensors of 1 MB and more come from the block cache
# (core/block_cache.py) on CPU, so the trim now concerns smaller ones.
TRIM_EVERY = 50


def available_cores() -> int:
    """Number of CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_workers(device: torch.device, local_world_size: int = 1) -> int:
    """Return the default worker count: the CPU cores divided among the local ranks, or 1 on accelerators."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, available_cores() // max(1, local_world_size))


@contextmanager
def limit_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(num_threads)``, then restore the old count."""
    if num_threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects that exist on entry out of the garbage collector's passes until exit.

    Torch, timm and mmdet leave about 390,000 Python objects behind after
    import. A full collection walks all of them while holding the GIL (0.12 s
    on a 2-core AMD EPYC), so it stalls every scoring thread. Building
    candidates triggers such a collection every 10 to 20 candidates: in a
    40-candidate WRN-40-2 search on 2 threads, freezing the heap first took
    the time per candidate from 0.240 to 0.226 s. Objects created inside are
    collected as usual. A heap that is already frozen (by the caller, or by
    an outer use) is left as it is, because unfreezing on exit would also
    release the caller's frozen objects.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _malloc_trim() -> Callable[[], None]:
    """Return a function that hands freed heap memory back to the OS (glibc), else a no-op.

    Each candidate allocates and frees several hundred MB of activations.
    Without trimming, glibc keeps the fragmented heap, so the resident size
    grows over the first candidates. See ``TRIM_EVERY``.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


def score_indices(
    score_one: Callable[[int], float],
    indices: Sequence[int],
    num_workers: int = 1,
    num_threads: Optional[int] = 1,
    device: torch.device = torch.device("cpu"),
    on_result: Optional[Callable[[int, float], None]] = None,
    block_cache: bool = True,
) -> Dict[int, float]:
    """Call ``score_one`` for every index, ``num_workers`` at a time on CPU.

    On CPU, large tensors come from the block cache for the duration of the
    call (:func:`~blockswap_plugin.core.block_cache.cpu_block_cache`) unless
    ``block_cache`` is False. The objects that exist when the call starts
    are kept out of garbage collection passes until it returns
    (:func:`frozen_heap`).

    Args:
        score_one: Returns the score of one index. It must be safe to call
            from several threads at once, and its result must not depend on
            which thread runs it.
        indices: Indices to score.
        num_workers: Candidates scored at the same time (threads); 1 scores
            them one after another in the calling thread.
        num_threads: Torch intra-op threads for the duration of the call
            (a process-wide setting); None keeps the current one.
        device: Scoring device; anything but CPU scores one at a time.
        on_result: Called in the calling thread with ``(index, score)`` as
            each result arrives.
        block_cache: Use the block cache on CPU. Turn it off where the live
            tensors of the parallel candidates exceed its limit (exact fp32
            scoring), because it would then unmap and map blocks all the time.

    Returns:
        The score of every index.

    Raises:
        RuntimeError: If scoring an index fails; the message names the index
            and the original error is chained.
    """
    indices = list(indices)
    on_result = on_result or (lambda index, score: None)
    release_memory = _malloc_trim()
    # Start from a trimmed heap, so that memory freed before the search is
    # not held on top of the candidates' activations.
    release_memory()
    scores: Dict[int, float] = {}

    def record(index: int, score: float) -> None:
        scores[index] = score
        if len(scores) % TRIM_EVERY == 0:
            release_memory()
        on_result(index, score)

    on_cpu = torch.device(device).type == "cpu"
    one_at_a_time = num_workers <= 1 or len(indices) <= 1 or not on_cpu
    with limit_threads(num_threads), frozen_heap(), \
            (cpu_block_cache() if on_cpu and block_cache else nullcontext()):
        if one_at_a_time:
            for index in indices:
                record(index, _call(score_one, index))
        else:
            _score_in_threads(score_one, indices, min(num_workers, len(indices)), record)
    release_memory()
    return scores


def _score_in_threads(
    score_one: Callable[[int], float], indices: Sequence[int], num_workers: int,
    record: Callable[[int, float], None],
) -> None:
    """Score ``indices`` in ``num_workers`` threads and pass each result to ``record`` in the calling thread."""
    _logger.debug("scoring %d candidates in %d threads", len(indices), num_workers)
    with ThreadPoolExecutor(num_workers, thread_name_prefix="blockswap-score") as pool:
        pending = {pool.submit(_call, score_one, index): index for index in indices}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    record(index, future.result())
        except BaseException:
            # Candidates already running finish; the queued ones are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _call(score_one: Callable[[int], float], index: int) -> float:
    try:
        return float(score_one(index))
    except Exception as error:
        raise RuntimeError(f"scoring candidate {index} failed: {type(error).__name__}: {error}") from error


def check_num_workers(num_workers: Optional[int]) -> None:
    """Reject a worker count below 1.

    Raises:
        BlockSwapError: If ``num_workers`` is given and smaller than 1.
    """
    if num_workers is not None and num_workers < 1:
        raise BlockSwapError(f"the number of workers must be at least 1, got {num_workers}; omit it for one per core")
