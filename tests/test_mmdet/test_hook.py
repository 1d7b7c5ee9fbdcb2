"""BlockSwapHook in mmengine's real Runner: optimizer over the student, distillation, unsupported backbones."""
import math

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

from blockswap_plugin.core.errors import BlockSwapError
from blockswap_plugin.mmdet import BlockSwapHook, BlockSwapResNet, attention_map, attention_transfer_loss

from .conftest import BLOCKSWAP_CONFIG


def short_config(tmp_path, teacher_checkpoint=None, **hook):
    cfg = Config.fromfile(str(BLOCKSWAP_CONFIG))
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg.max_iters = 2
    cfg.train_dataloader.batch_size = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 2
    cfg.train_cfg.val_begin = 1000  # no validation in these short runs
    cfg.custom_hooks[0].update(num_samples=2, teacher_checkpoint=teacher_checkpoint and str(teacher_checkpoint), **hook)
    return cfg


def find_hook(runner):
    return next(h for h in runner.hooks if isinstance(h, BlockSwapHook))


def test_attention_map_exact():
    x = torch.zeros(1, 2, 1, 2)
    x[0, 0, 0] = torch.tensor([3.0, 0.0])
    x[0, 1, 0] = torch.tensor([1.0, 2.0])
    # channel means of x^2: [(9 + 1) / 2, (0 + 4) / 2] = [5, 2], L2-normalised by sqrt(29)
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    assert torch.allclose(attention_map(x), expected)
    y = torch.ones(1, 2, 1, 2)  # attention map [1, 1] / sqrt(2)
    expected_loss = ((expected - torch.full((1, 2), 2 ** -0.5)) ** 2).mean()
    assert attention_transfer_loss([x], [y], beta=1.0).item() == pytest.approx(expected_loss.item())
    assert attention_transfer_loss([x, y], [x, y], beta=1.0).item() == 0.0


def test_distillation_trains_student_only(tmp_path, teacher_checkpoint):
    runner = Runner.from_cfg(short_config(tmp_path, teacher_checkpoint))
    runner.train()
    hook = find_hook(runner)
    student = runner.model

    # The optimizer contains exactly the student's trainable parameters.
    optimised = {id(p) for group in runner.optim_wrapper.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in student.parameters() if p.requires_grad}
    assert isinstance(student.backbone, BlockSwapResNet)
    assert all(p.requires_grad for p in student.backbone.parameters())

    # The frozen teacher kept its checkpoint weights exactly.
    saved = _load_checkpoint(str(teacher_checkpoint), map_location="cpu")["state_dict"]
    teacher = hook.distiller.teacher.state_dict()
    assert set(teacher) == set(saved)
    assert all(torch.equal(teacher[k].cpu(), saved[k]) for k in saved)
    assert not any(p.requires_grad for p in hook.distiller.teacher.parameters())
    assert not hook.distiller.teacher.training

    # The attention transfer loss was logged and is part of the total loss.
    scalars = runner.message_hub.log_scalars
    assert "train/loss_at" in scalars
    assert scalars["train/loss_at"].current() > 0
    assert "train/loss_neck_mse" not in scalars


@pytest.mark.slow
def test_neck_distillation_logged(tmp_path, teacher_checkpoint):
    cfg = short_config(tmp_path, teacher_checkpoint, distill=dict(at_weight=1000.0, neck_weight=1.0))
    cfg.train_cfg.max_iters = 1
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.message_hub.log_scalars["train/loss_neck_mse"].current() > 0


@pytest.mark.slow
def test_given_genotype_skips_search(tmp_path, coco128):
    blocks = ["DConvA4"] * 8
    runner = Runner.from_cfg(short_config(tmp_path, None, genotype=blocks))
    runner.train()
    assert runner.model.backbone.genotype.blocks == tuple(blocks)
    assert not (tmp_path / "blockswap_search.json").exists()
    assert find_hook(runner).distiller is None


@pytest.mark.slow
def test_test_with_hook_config_rebuilds_student(tmp_path, coco128):
    blocks = ["G8B2"] * 8
    runner = Runner.from_cfg(short_config(tmp_path, None, genotype=blocks))
    runner.train()
    cfg = short_config(tmp_path / "test")
    cfg.load_from = str(tmp_path / "iter_2.pth")
    cfg.test_dataloader.dataset.indices = 4
    tester = Runner.from_cfg(cfg)
    tester.test()
    assert tester.model.backbone.genotype.blocks == tuple(blocks)
    saved = _load_checkpoint(str(tmp_path / "iter_2.pth"), map_location="cpu")["state_dict"]
    loaded = tester.model.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_swin_backbone_fails_at_start(tmp_path, coco128):
    cfg = short_config(tmp_path)
    cfg.model.backbone = dict(type="SwinTransformer", embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                              out_indices=(0, 1, 2, 3))
    cfg.model.neck.in_channels = [32, 64, 128, 256]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(BlockSwapError, match="supported backbones are mmdet's ResNet, ResNetV1d, ResNeXt"):
        runner.train()
    assert runner.iter == 0


def test_unreachable_budget_names_range(tmp_path, coco128):
    runner = Runner.from_cfg(short_config(tmp_path, budget=0.01))
    with pytest.raises(BlockSwapError, match=r"cannot be met by mmdet.ResNet-18: genotypes reach [\d,]+ to [\d,]+"):
        runner.train()


def test_missing_teacher_checkpoint_error(tmp_path, coco128):
    runner = Runner.from_cfg(short_config(tmp_path, tmp_path / "missing.pth"))
    with pytest.raises(BlockSwapError, match="teacher checkpoint not found"):
        runner.train()


def test_invalid_hook_arguments():
    with pytest.raises(BlockSwapError, match="budget must be a positive number"):
        BlockSwapHook(budget=-1)
    with pytest.raises(BlockSwapError, match=r"unknown distill keys \['kd'\]"):
        BlockSwapHook(budget=0.3, distill=dict(kd=1.0))
