"""Local worker processes that score candidates on all CPU cores of one machine.

Small grouped convolutions scale poorly over threads, so a search on CPU runs
one single-threaded worker process per core. Workers are started with
``fork``: the candidate builder, the minibatch and the scorer are inherited,
not pickled, so builders that are closures work. Where ``fork`` is missing
(Windows, or a CUDA device, which cannot be used after a fork) scoring runs
in the calling process instead. This module does not build or score
candidates itself. It runs ``score_one(index)`` for a list of indices.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.multiprocessing as mp

from .errors import BlockSwapError

__all__ = ["available_cores", "check_num_workers", "default_num_workers", "limit_threads", "score_indices"]

_logger = logging.getLogger(__name__)

# Seconds between liveness checks of the workers while waiting for a result.
_POLL_SECONDS = 5.0


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


def _fork_available() -> bool:
    return "fork" in mp.get_all_start_methods()


def _malloc_trim() -> Callable[[], None]:
    """Return a function that hands freed heap memory back to the OS (glibc), else a no-op.

    Each candidate allocates and frees several hundred MB of activations.
    Without trimming, glibc keeps the fragmented heap, so the resident size
    of a worker grows over the first candidates.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


def _exit_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, so no worker outlives a killed search."""
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not name:
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(name).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _worker_main(score_one: Callable[[int], float], tasks, results, num_threads: int) -> None:
    _exit_with_parent()
    torch.set_num_threads(num_threads)
    release_memory = _malloc_trim()
    while True:
        index = tasks.get()
        if index is None:
            return
        try:
            results.put((index, float(score_one(index)), None))
        except BaseException:  # reported to the parent, which raises
            results.put((index, None, traceback.format_exc()))
            return
        release_memory()


def score_indices(
    score_one: Callable[[int], float],
    indices: Sequence[int],
    num_workers: int = 1,
    num_threads: Optional[int] = 1,
    device: torch.device = torch.device("cpu"),
    on_result: Optional[Callable[[int, float], None]] = None,
) -> Dict[int, float]:
    """Call ``score_one`` for every index, in ``num_workers`` forked processes when that helps.

    Args:
        score_one: Returns the score of one index; it must not depend on
            which process runs it.
        indices: Indices to score.
        num_workers: Worker processes; 1 scores in the calling process.
        num_threads: Torch threads per worker (or for the calling process
            when ``num_workers`` is 1); None keeps the current setting.
        device: Scoring device; anything but CPU scores in the calling process.
        on_result: Called in the calling process with ``(index, score)`` as
            each result arrives.

    Returns:
        The score of every index.

    Raises:
        RuntimeError: If a worker fails or dies; the worker's traceback is included.
    """
    indices = list(indices)
    on_result = on_result or (lambda index, score: None)
    in_process = num_workers <= 1 or len(indices) <= 1 or torch.device(device).type != "cpu"
    if not in_process and not _fork_available():
        _logger.warning("fork is not available on this platform; scoring in one process")
        in_process = True
    if in_process:
        scores = {}
        release_memory = _malloc_trim()
        with limit_threads(num_threads):
            for index in indices:
                scores[index] = float(score_one(index))
                release_memory()
                on_result(index, scores[index])
        return scores
    return _score_in_workers(score_one, indices, min(num_workers, len(indices)), num_threads or 1, on_result)


def _score_in_workers(
    score_one: Callable[[int], float],
    indices: Sequence[int],
    num_workers: int,
    num_threads: int,
    on_result: Callable[[int, float], None],
) -> Dict[int, float]:
    context = mp.get_context("fork")
    tasks = context.SimpleQueue()
    results = context.Queue()
    for index in indices:
        tasks.put(index)
    for _ in range(num_workers):
        tasks.put(None)
    workers = [
        context.Process(target=_worker_main, args=(score_one, tasks, results, num_threads), daemon=True)
        for _ in range(num_workers)
    ]
    for worker in workers:
        worker.start()
    _logger.debug("started %d worker processes with %d thread(s) each", num_workers, num_threads)
    scores: Dict[int, float] = {}
    try:
        while len(scores) < len(indices):
            try:
                index, score, error = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                dead = [w.pid for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"worker process(es) {dead} died while scoring (out of memory?); "
                        "run with --workers 1 to see the error in this process"
                    ) from None
                continue
            if error is not None:
                raise RuntimeError(f"scoring candidate {index} failed in a worker process:\n{error}")
            scores[index] = score
            on_result(index, score)
    except BaseException:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        raise
    finally:
        for worker in workers:
            worker.join(timeout=_POLL_SECONDS)
        results.close()
    return scores


def check_num_workers(num_workers: Optional[int]) -> None:
    """Reject a worker count below 1.

    Raises:
        BlockSwapError: If ``num_workers`` is given and smaller than 1.
    """
    if num_workers is not None and num_workers < 1:
        raise BlockSwapError(f"the number of workers must be at least 1, got {num_workers}; omit it for one per core")
