"""AttentionTransferTask on real CIFAR-10 images with real timm models."""
import timm
import torch

import blockswap_plugin as bp
from blockswap_plugin.timm.task import AttentionTransferTask, stage_modules


def test_stage_modules_per_family():
    assert stage_modules(timm.create_model("resnet18", num_classes=10)) == ["layer1", "layer2", "layer3", "layer4"]
    assert stage_modules(timm.create_model("wrn_16_1", num_classes=10)) == ["stages.0", "stages.1", "stages.2"]


def test_at_loss_decreases_teacher_unchanged(cifar_batch):
    torch.manual_seed(0)
    images, labels = cifar_batch[0][:32], cifar_batch[1][:32]
    teacher = timm.create_model("wrn_16_2", num_classes=10)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = bp.apply_genotype(teacher, ["DConvA4", "G8B4"] * 3)
    task = AttentionTransferTask(student, teacher, beta=1000.0)
    task.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    at_losses = []
    for _ in range(6):
        result = task(images, labels)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        at_losses.append(result["at_loss"].item())
    assert at_losses[-1] < 0.5 * at_losses[0]
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())


def test_task_state_carries_genotype_not_teacher():
    teacher = timm.create_model("resnet18", num_classes=10)
    student = bp.apply_genotype(teacher, ["DConv"] * 8)
    task = AttentionTransferTask(student, teacher, beta=1000.0, kd_weight=0.5, verbose=False)
    state = task.get_checkpoint_state()
    assert set(state["state_dict"]) == set(student.state_dict())
    assert state["task_state"]["blockswap_genotype"]["blocks"] == ["DConv"] * 8
    result = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert result["kd_loss"].item() > 0
    assert torch.allclose(result["loss"], result["task_loss"] + result["at_loss"] + 0.5 * result["kd_loss"])


def test_task_without_teacher_is_cross_entropy():
    student = bp.apply_genotype(timm.create_model("wrn_16_1", num_classes=10), ["DConv"] * 6)
    task = AttentionTransferTask(student, None, verbose=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    result = task(x, y)
    assert torch.equal(result["loss"], torch.nn.functional.cross_entropy(result["output"], y))
    assert result["at_loss"].item() == 0.0
