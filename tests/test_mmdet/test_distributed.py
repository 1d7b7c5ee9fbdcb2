"""Two-process CPU training with BlockSwapHook: torchrun, mmengine's pytorch launcher, gloo."""
import json
import re

import pytest
import torch

from .conftest import BLOCKSWAP_CONFIG, run_tool


@pytest.mark.slow
def test_two_ranks_build_same_student(tmp_path, teacher_checkpoint):
    proc = run_tool(
        ["train.py", BLOCKSWAP_CONFIG, "--work-dir", tmp_path, "--cfg-options",
         "train_cfg.max_iters=2", "default_hooks.logger.interval=1", "custom_hooks.0.num_samples=2",
         "train_dataloader.batch_size=2", "train_cfg.val_begin=1000",
         f"custom_hooks.0.teacher_checkpoint={teacher_checkpoint}"],
        nproc=2, env={"OMP_NUM_THREADS": "1"},
    )
    output = proc.stdout + proc.stderr
    assert re.search(r"BlockSwap: all 2 ranks built the same student \([\d,]+ params\)", output), output[-4000:]
    assert re.search(r"loss_at: \d", output), output[-4000:]

    genotype = json.loads((tmp_path / "blockswap_genotype.json").read_text())
    checkpoint = torch.load(tmp_path / "iter_2.pth", map_location="cpu", weights_only=False)
    assert checkpoint["meta"]["blockswap"]["blocks"] == genotype["blocks"]
    assert not any(key.startswith("module.") for key in checkpoint["state_dict"])
