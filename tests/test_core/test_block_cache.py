"""The CPU block cache: reuse, limits, foreign pointers, threads, and unchanged search scores."""
import threading
from pathlib import Path

import pytest
import timm
import torch

import blockswap_plugin.timm  # noqa: F401  (registers wrn_*)
from blockswap_plugin.core.block_cache import block_cache_stats, cpu_block_cache
from blockswap_plugin.core.env import env_flag
from blockswap_plugin.core.errors import BlockSwapError
from blockswap_plugin.core.fused import fused_kernel
from blockswap_plugin.core.sampler import Budget, sample_genotypes
from blockswap_plugin.core.search import score_candidate
from blockswap_plugin.core.scoring import FisherScorer
from blockswap_plugin.core.workers import limit_threads
from blockswap_plugin.timm.spaces import create_space

MB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not env_flag("BLOCKSWAP_FUSED") or not env_flag("BLOCKSWAP_BLOCK_CACHE"):
        pytest.skip("the compiled helpers or the block cache are turned off")
    assert fused_kernel() is not None, "the compiled helpers did not build; run blockswap kernel to see why"


def test_freed_block_is_reused():
    with cpu_block_cache(64 * MB) as active:
        assert active
        before = block_cache_stats()
        first = torch.full((4 * MB,), 3.0)  # 16 MB
        address = first.data_ptr()
        del first
        assert block_cache_stats()["cached_bytes"] - before["cached_bytes"] == 16 * MB
        second = torch.arange(4 * MB, dtype=torch.float32)
        # The same size class comes back from the cache, with its new contents.
        assert second.data_ptr() == address
        assert block_cache_stats()["hits"] == before["hits"] + 1
        assert float(second[-1]) == 4 * MB - 1
        assert float(second.sum()) == pytest.approx((4 * MB - 1) * 4 * MB / 2)
        small = torch.ones(1000)  # below 1 MB: torch's own allocator
        assert block_cache_stats()["live_bytes"] == before["live_bytes"] + 16 * MB
        del second, small
    after = block_cache_stats()
    assert after["enabled"] == 0
    assert after["cached_bytes"] == 0


def _huge_page_kb(address: int) -> int:
    """Return the kB of transparent huge pages in the mapping of this process that contains ``address``."""
    inside = False
    for line in open("/proc/self/smaps", encoding="ascii", errors="replace"):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            start, end = (int(part, 16) for part in first.split("-"))
            inside = start <= address < end
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("huge", ["1", "0"])
def test_huge_pages_follow_switch(monkeypatch, huge):
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[madvise]" not in mode.read_text():
        pytest.skip("the kernel does not grant transparent huge pages on request (setting is not 'madvise')")
    monkeypatch.setenv("BLOCKSWAP_HUGE_PAGES", huge)
    with cpu_block_cache(64 * MB):
        block = torch.ones(8 * MB)  # 32 MB, every page written
        kb = _huge_page_kb(block.data_ptr())
        del block
    if huge == "1":
        assert kb > 0
    else:
        assert kb == 0


def test_cache_stays_under_limit():
    with cpu_block_cache(40 * MB):
        tensors = [torch.empty(size * MB // 4) for size in (8, 12, 16, 20, 24)]  # 80 MB in all
        del tensors
        stats = block_cache_stats()
        assert stats["cached_bytes"] <= 40 * MB
        assert stats["unmapped"] >= 2


def test_tensors_outlive_cache():
    before = torch.ones(2 * MB)  # made by torch's allocator, freed while the cache is on
    with cpu_block_cache(32 * MB):
        live = block_cache_stats()["live_bytes"]
        kept = torch.full((2 * MB,), 7.0)
        del before
    # The cache is off: its block is unmapped when the tensor goes, and new
    # tensors come from torch's allocator again.
    assert float(kept.mean()) == 7.0
    del kept
    assert block_cache_stats()["live_bytes"] == live
    plain = torch.ones(2 * MB) * 2
    assert float(plain.sum()) == 4 * MB


def test_concurrent_threads_allocate():
    errors = []

    def work(seed):
        try:
            generator = torch.Generator().manual_seed(seed)
            for _ in range(40):
                x = torch.randn(512, 1024, generator=generator)  # 2 MB
                y = (x * 2).sum(0)
                assert torch.allclose(y, x.sum(0) * 2)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with cpu_block_cache(16 * MB):
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors


def test_invalid_limit_rejected(monkeypatch):
    with pytest.raises(BlockSwapError, match="0 or more"):
        with cpu_block_cache(-1):
            pass
    monkeypatch.setenv("BLOCKSWAP_BLOCK_CACHE_MB", "lots")
    with pytest.raises(BlockSwapError, match="BLOCKSWAP_BLOCK_CACHE_MB"):
        with cpu_block_cache():
            pass


def test_scores_independent_of_cache(cifar_batch):
    images, labels = cifar_batch
    model = timm.create_model("wrn_16_2", num_classes=10)
    space, build = create_space(model, (3, 32, 32))
    genotypes = sample_genotypes(space, 2, [Budget("params", 100_000)], 0)
    scorer = FisherScorer(images, labels, "auto")
    with limit_threads(1):
        for index, blocks in enumerate(genotypes):
            plain = score_candidate(build, blocks, images, labels, index, scorer=scorer)
            with cpu_block_cache():
                cached = [score_candidate(build, blocks, images, labels, index, scorer=scorer) for _ in range(2)]
            assert cached == [plain, plain]
