"""A search split over two torchrun ranks (CPU, gloo) gives the same result as one process."""
import json
import os
import socket
import subprocess
import sys

import pytest

from blockswap_plugin.core.sharding import Shard, current_shard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def search_args(cifar_train, out):
    return [
        "-m", "blockswap_plugin.cli", "search", "wrn_16_2", "--data", str(cifar_train),
        "--budget-params", "150000", "--samples", "4", "--refine-top", "2", "--seed", "4", "--quiet",
        "--out", str(out),
    ]


def run(command, cwd):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_one_and_two_ranks_agree(tmp_path, cifar_train):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, *search_args(cifar_train, one)], repo)
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]
    result = run([*torchrun, *search_args(cifar_train, two)], repo)
    assert "2 rank(s)" in result.stdout

    first, second = json.loads(one.read_text()), json.loads(two.read_text())
    assert first["world_size"] == 1
    assert second["world_size"] == 2
    assert first["winner"] == second["winner"]
    assert [c["blocks"] for c in first["candidates"]] == [c["blocks"] for c in second["candidates"]]
    assert [c["scores"] for c in first["candidates"]] == [c["scores"] for c in second["candidates"]]
    assert [c["score"] for c in first["candidates"]] == [c["score"] for c in second["candidates"]]


def test_shard_splits_by_stride():
    shards = [Shard(rank, 3, 3) for rank in range(3)]
    assert [s.indices(range(8)) for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert current_shard() == Shard()
