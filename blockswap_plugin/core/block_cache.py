"""A cache of large CPU memory blocks for the scoring loop.

Each candidate of a CPU search allocates and frees a few hundred tensors of
1 to 16 MB. glibc keeps much of that memory after it is freed: in a
two-thread WRN-40-2 search the process held about 0.7 GB more than its live
tensors. :func:`cpu_block_cache` puts the compiled block cache
(``csrc/block_cache_cpu.cpp``) behind torch's CPU allocator for the duration
of a ``with`` block. Tensors of 1 MB and more then come from a cache of
freed blocks of the same size class, so a candidate reuses the pages of the
one before instead of faulting in new ones. Free blocks are unmapped, least
recently freed first, whenever live plus cached bytes would pass
``limit_bytes``. The blocks mapped at any time thus total the live tensors or
the limit, whichever is more.

The cache needs the compiled helpers (:func:`~blockswap_plugin.core.fused.fused_kernel`);
without them, or with ``BLOCKSWAP_BLOCK_CACHE=0``, the body runs with torch's
own allocator. ``BLOCKSWAP_BLOCK_CACHE_MB`` sets the limit in MB.

Blocks of 2 MB and more start on a 2 MB boundary and ask the kernel for
transparent huge pages (``madvise``), unless ``BLOCKSWAP_HUGE_PAGES=0``. In
200-candidate WRN-40-2 searches on the project's Xeon guest, whose kernel
grants them on request, this cut page faults from about 12,000 to 1,700 per
candidate and the time per candidate by about 5 % (0.217 against 0.228 s),
at the same peak RSS.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from .env import env_flag
from .errors import BlockSwapError
from .fused import fused_kernel

__all__ = [
    "DEFAULT_LIMIT_MB", "block_cache_setting", "block_cache_stats", "check_block_cache_settings", "cpu_block_cache",
    "limit_from_env",
]

_logger = logging.getLogger(__name__)

# Live plus cached bytes kept at most. In an 80-candidate WRN-40-2 search with
# two scoring threads (bf16, 400K budget), 512 MB gave 0.285 s per candidate
# and a peak RSS of 1.31 GB. With 384 MB more blocks had to be mapped again,
# and a candidate took 0.373 s.
DEFAULT_LIMIT_MB = 512

_LOCK = threading.Lock()
_DEPTH = 0


def limit_from_env() -> int:
    """Return the limit in bytes that ``BLOCKSWAP_BLOCK_CACHE_MB`` sets, or the default.

    Raises:
        BlockSwapError: If the variable is not a whole number of MB, 0 or more.
    """
    text = os.environ.get("BLOCKSWAP_BLOCK_CACHE_MB", str(DEFAULT_LIMIT_MB))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise BlockSwapError(
            f"BLOCKSWAP_BLOCK_CACHE_MB must be a whole number of MB, 0 or more, got {text!r}; "
            f"unset it for the default of {DEFAULT_LIMIT_MB}"
        )
    return value << 20


@contextmanager
def cpu_block_cache(limit_bytes: Optional[int] = None) -> Iterator[bool]:
    """Serve CPU tensors of 1 MB and more from the block cache inside the ``with`` block.

    Nested uses share the outer one. On leaving the outermost block, the
    cached blocks are unmapped and torch's allocator serves new tensors again.
    Tensors still alive keep their memory until they are freed.

    Args:
        limit_bytes: Live plus cached bytes above which free blocks are
            unmapped; ``BLOCKSWAP_BLOCK_CACHE_MB`` or :data:`DEFAULT_LIMIT_MB`
            when omitted.

    Yields:
        Whether the cache is in use.

    Raises:
        BlockSwapError: If the limit is negative.
    """
    global _DEPTH
    if limit_bytes is None:
        limit_bytes = limit_from_env()
    elif limit_bytes < 0:
        raise BlockSwapError(f"block cache limit must be 0 or more bytes, got {limit_bytes}")
    kernel = _cache_kernel()
    if kernel is None:
        yield False
        return
    with _LOCK:
        outer = _DEPTH == 0
        _DEPTH += 1
        if outer:
            active = kernel.block_cache_enable(int(limit_bytes), env_flag("BLOCKSWAP_HUGE_PAGES"))
        else:
            active = bool(kernel.block_cache_stats()["enabled"])
    if outer and not active:
        _logger.warning("another CPU allocator has priority over the block cache; using it instead")
    try:
        yield active
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0 and active:
                stats = kernel.block_cache_stats()
                kernel.block_cache_disable()
                _logger.debug("block cache: %d reused, %d mapped, peak %.2f GB", stats["hits"], stats["misses"],
                              stats["peak_bytes"] / 2**30)


def _cache_kernel() -> Optional[object]:
    """Return the compiled helpers that contain the cache, or None where the cache is turned off or not built."""
    return fused_kernel() if env_flag("BLOCKSWAP_BLOCK_CACHE") else None


def check_block_cache_settings() -> int:
    """Check ``BLOCKSWAP_BLOCK_CACHE``, ``BLOCKSWAP_HUGE_PAGES`` and ``BLOCKSWAP_BLOCK_CACHE_MB``; return the limit in bytes.

    Raises:
        BlockSwapError: If any of the three has an invalid value.
    """
    env_flag("BLOCKSWAP_BLOCK_CACHE")
    env_flag("BLOCKSWAP_HUGE_PAGES")
    return limit_from_env()


def block_cache_setting() -> str:
    """Describe whether CPU scoring will use the block cache, and its limit.

    Raises:
        BlockSwapError: If ``BLOCKSWAP_BLOCK_CACHE`` or ``BLOCKSWAP_BLOCK_CACHE_MB`` has an invalid value.
    """
    limit_mb = check_block_cache_settings() >> 20
    if not env_flag("BLOCKSWAP_BLOCK_CACHE"):
        return "block cache: turned off by BLOCKSWAP_BLOCK_CACHE"
    if fused_kernel() is None:
        return "block cache: not available without the compiled helpers"
    pages = "huge pages requested" if env_flag("BLOCKSWAP_HUGE_PAGES") else "huge pages turned off by BLOCKSWAP_HUGE_PAGES"
    return f"block cache: on, limit {limit_mb} MB (BLOCKSWAP_BLOCK_CACHE_MB), {pages}"


def block_cache_stats() -> Optional[Dict[str, int]]:
    """Counters of the block cache (blocks reused and mapped, live, cached and peak bytes), or None without it."""
    kernel = _cache_kernel()
    return None if kernel is None else dict(kernel.block_cache_stats())
