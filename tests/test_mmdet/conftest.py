"""Helpers for the mmdet tests: mmdet's own tools, configs and a saved teacher checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmcv.ops", reason="the mmdet tests need mmcv with its ops; install with tools/install.sh")
pytest.importorskip("mmdet", reason="the mmdet tests need mmdet 3.x; install with tools/install.sh")

import mmdet  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "mmdet"
TOOLS = Path(mmdet.__file__).parent / ".mim" / "tools"
TEACHER_CONFIG = CONFIGS / "retinanet_r18_fpn_coco128.py"
BLOCKSWAP_CONFIG = CONFIGS / "retinanet_r18_fpn_blockswap_coco128.py"
# torch >= 2.6 loads with weights_only=True, which rejects the mmengine objects
# (message hub) in checkpoints that mmengine 0.10 saves during training.
TORCH_LOAD_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def run_tool(args, timeout=600, nproc=None, env=None):
    """Run one of mmdet's tools (``train.py``, ``test.py``, ``analysis_tools/get_flops.py``) from the repository root.

    Returns the completed process; fails the test with the output tail when the tool fails.
    """
    run_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", **TORCH_LOAD_ENV, **(env or {})}
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), run_env.get("PYTHONPATH")]))
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_port=29517", str(TOOLS / args[0]), *map(str, args[1:]), "--launcher", "pytorch"]
    else:
        command = [sys.executable, str(TOOLS / args[0]), *map(str, args[1:])]
    proc = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)} failed with code {proc.returncode}:\n{output[-6000:]}"
    return proc


def save_teacher_checkpoint(config: Path, path: Path, seed: int = 0) -> Path:
    """Build the teacher detector of ``config``, initialise it as mmdet does, and save it as an mmengine checkpoint."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    torch.manual_seed(seed)
    model = MODELS.build(Config.fromfile(str(config)).model)
    model.init_weights()
    save_checkpoint({"state_dict": weights_to_cpu(model.state_dict()), "meta": {}}, str(path))
    return path


@pytest.fixture(autouse=True)
def trusted_checkpoint_loading(monkeypatch):
    """Let in-process runners load the checkpoints that these tests write (see TORCH_LOAD_ENV)."""
    for key, value in TORCH_LOAD_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory, coco128):
    """A randomly initialised RetinaNet R18 teacher from the COCO128 teacher config, saved as a checkpoint."""
    return save_teacher_checkpoint(TEACHER_CONFIG, tmp_path_factory.mktemp("teacher") / "teacher.pth")
