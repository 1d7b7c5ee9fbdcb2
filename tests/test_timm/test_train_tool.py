"""tools/train_timm.py end to end on real CIFAR-10: teacher, distilled student, resume, evaluate, torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockswap_plugin as bp

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "train_timm.py"
TINY = ["model=wrn_16_1", "train_subset=128", "val_subset=64", "batch_size=32", "workers=0", "epochs=1",
        "log_interval=1000", "threads=1"]


def _run(config, overrides, launcher=None):
    args = [arg for item in TINY + overrides for arg in ("--set", item)]
    command = (launcher or [sys.executable]) + [str(TOOL), "--config", str(REPO / "configs" / "timm" / config), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory, cifar_train):
    output = tmp_path_factory.mktemp("teacher")
    _run("cifar10_demo_teacher.yaml", [f"output={output}"])
    return output / "model_best.pth.tar"


@pytest.fixture()
def genotype_file(tmp_path):
    path = tmp_path / "genotype.json"
    bp.Genotype("wrn_16_1", ["DConvA4", "G8B2", "DConv", "ConvB2", "DConvG2", "A2B2"]).save(path)
    return path


def test_student_resume_evaluate(tmp_path, teacher_checkpoint, genotype_file):
    output = tmp_path / "student"
    common = [f"output={output}", f"student.genotype={genotype_file}", "teacher.model=wrn_16_1",
              f"teacher.checkpoint={teacher_checkpoint}"]
    _run("cifar10_demo_student_at.yaml", common)
    _run("cifar10_demo_student_at.yaml", common + ["epochs=2", f"resume={output / 'last.pth.tar'}"])
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["epoch"] == 1

    checkpoint = torch.load(output / "last.pth.tar", map_location="cpu", weights_only=False)
    assert checkpoint["task_state"]["blockswap_genotype"]["blocks"][1] == "G8B2"
    assert not any(key.startswith("teacher") for key in checkpoint["state_dict"])
    student = bp.load_student(output / "last.pth.tar")
    assert bp.count_params(student) == sum(v.numel() for k, v in checkpoint["state_dict"].items()
                                           if "running" not in k and "num_batches" not in k)

    _run("cifar10_demo_evaluate.yaml", [f"checkpoint={output / 'last.pth.tar'}", f"output={tmp_path / 'eval'}"])
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert metrics["images"] == 64
    assert metrics["top1"] == pytest.approx(summary["top1"])


def test_bf16_channels_last_training(tmp_path, teacher_checkpoint, genotype_file):
    output = tmp_path / "bf16"
    _run("cifar10_demo_student_at.yaml",
         [f"output={output}", f"student.genotype={genotype_file}", "teacher.model=wrn_16_1",
          f"teacher.checkpoint={teacher_checkpoint}", "amp=true", "channels_last=true"])
    checkpoint = torch.load(output / "last.pth.tar", map_location="cpu", weights_only=False)
    # Autocast computes in bf16 but keeps the weights in fp32.
    assert {v.dtype for k, v in checkpoint["state_dict"].items() if "num_batches" not in k} == {torch.float32}
    student = bp.load_student(output / "last.pth.tar")
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_amp_dtype_is_rejected(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(TOOL), "--set", "amp=true", "--set", "amp_dtype=int8",
         "--set", f"output={tmp_path}", *[a for item in TINY for a in ("--set", item)]],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 2
    assert "amp_dtype must be one of ['bfloat16', 'float16'], got 'int8'" in completed.stderr


def test_torchrun_two_processes(tmp_path, teacher_checkpoint, genotype_file):
    output = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    _run("cifar10_demo_student_at.yaml",
         [f"output={output}", f"student.genotype={genotype_file}", "teacher.model=wrn_16_1",
          f"teacher.checkpoint={teacher_checkpoint}"], launcher=launcher)
    student = bp.load_student(output / "last.pth.tar")
    assert student.blockswap_genotype.blocks[0] == "DConvA4"


def test_bad_config_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: wrn_16_1\n")
    completed = subprocess.run([sys.executable, str(TOOL), "--config", str(bad)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "unknown config keys ['modle']" in completed.stderr
