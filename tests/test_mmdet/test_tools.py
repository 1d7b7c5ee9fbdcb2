"""mmdet's own tools on the COCO128 RetinaNet R18 BlockSwap config: train.py, test.py, get_flops.py."""
import json
import re

import pytest
import torch
from mmengine.analysis.print_helper import _format_size
from mmengine.config import Config
from mmengine.registry import init_default_scope

from blockswap_plugin.core.flops import count_params
from mmdet.registry import MODELS

from .conftest import BLOCKSWAP_CONFIG, TEACHER_CONFIG, run_tool

# Few iterations and candidates, no validation during training (val_begin after
# the last iteration). Testing uses 8
# images and keeps every box (score_thr=0), so a barely trained student still
# has detections to evaluate.
SHORT_RUN = ["train_cfg.max_iters=2", "train_cfg.val_begin=1000", "default_hooks.logger.interval=1",
             "custom_hooks.0.num_samples=3"]
FEW_TEST_IMAGES = ["test_dataloader.dataset.indices=8", "model.test_cfg.score_thr=0.0"]


def params_printed(output: str) -> str:
    match = re.search(r"^Params: (\S+)$", output, re.MULTILINE)
    assert match, f"get_flops.py printed no 'Params:' line:\n{output[-3000:]}"
    return match.group(1)


@pytest.fixture(scope="module")
def blockswap_run(tmp_path_factory, teacher_checkpoint):
    """Two iterations of tools/train.py with BlockSwapHook (search of 3 candidates, distillation)."""
    work_dir = tmp_path_factory.mktemp("blockswap_run")
    proc = run_tool(["train.py", BLOCKSWAP_CONFIG, "--work-dir", work_dir, "--cfg-options", *SHORT_RUN,
                     f"custom_hooks.0.teacher_checkpoint={teacher_checkpoint}"])
    return work_dir, proc.stdout + proc.stderr


def test_train_writes_student_files(blockswap_run):
    work_dir, output = blockswap_run
    genotype = json.loads((work_dir / "blockswap_genotype.json").read_text())
    assert genotype["model"] == "mmdet.ResNet-18"
    assert len(genotype["blocks"]) == 8
    search = json.loads((work_dir / "blockswap_search.json").read_text())
    assert search["num_samples"] == 3
    assert search["winner"]["blocks"] == genotype["blocks"]
    assert search["winner"]["fisher_potential"] == max(c["score"] for c in search["candidates"])
    student = Config.fromfile(str(work_dir / "blockswap_student.py"))
    assert student.model.backbone.type == "BlockSwapResNet"
    assert list(student.model.backbone.genotype) == genotype["blocks"]
    assert not any(h.get("type") == "BlockSwapHook" for h in student.get("custom_hooks", []))
    assert "BlockSwap search finished" in output


def test_train_logs_attention_transfer_loss(blockswap_run):
    work_dir, output = blockswap_run
    assert re.search(r"loss_at: \d", output), output[-3000:]


def test_checkpoint_holds_student_only(blockswap_run):
    work_dir, _ = blockswap_run
    checkpoint = torch.load(work_dir / "iter_2.pth", map_location="cpu", weights_only=False)
    init_default_scope("mmdet")
    student = MODELS.build(Config.fromfile(str(work_dir / "blockswap_student.py")).model)
    student.load_state_dict(checkpoint["state_dict"], strict=True)
    genotype = json.loads((work_dir / "blockswap_genotype.json").read_text())
    assert checkpoint["meta"]["blockswap"]["blocks"] == genotype["blocks"]
    assert count_params(student) == genotype["meta"]["detector_params"]
    assert count_params(student) < genotype["meta"]["teacher_detector_params"]


def test_test_tool_prints_bbox_metrics(blockswap_run):
    work_dir, _ = blockswap_run
    proc = run_tool(["test.py", work_dir / "blockswap_student.py", work_dir / "iter_2.pth",
                     "--work-dir", work_dir / "test", "--cfg-options", *FEW_TEST_IMAGES])
    output = proc.stdout + proc.stderr
    assert re.search(r"coco/bbox_mAP: -?\d", output), output[-3000:]


def test_get_flops_student_has_fewer_params(blockswap_run):
    work_dir, _ = blockswap_run
    genotype = json.loads((work_dir / "blockswap_genotype.json").read_text())
    student = params_printed(run_tool(["analysis_tools/get_flops.py", work_dir / "blockswap_student.py",
                                       "--num-images", "1"]).stdout)
    teacher = params_printed(run_tool(["analysis_tools/get_flops.py", TEACHER_CONFIG, "--num-images", "1"]).stdout)
    assert student == _format_size(genotype["meta"]["detector_params"])
    assert teacher == _format_size(genotype["meta"]["teacher_detector_params"])
    assert float(student.rstrip("MK")) < float(teacher.rstrip("MK"))
