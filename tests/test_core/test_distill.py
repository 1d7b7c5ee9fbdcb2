"""Attention transfer and KD losses against an independent computation."""
import pytest
import torch

from blockswap_plugin.core.distill import attention_map, attention_transfer_loss, kd_loss


def test_attention_map_matches_manual():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    manual = (x ** 2).mean(1).reshape(2, 4)
    manual = manual / manual.norm(dim=1, keepdim=True)
    assert torch.allclose(attention_map(x), manual)
    assert torch.allclose(attention_map(x).norm(dim=1), torch.ones(2))


def test_attention_transfer_loss_exact():
    torch.manual_seed(0)
    student = [torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)]
    teacher = [torch.randn(4, 32, 8, 8), torch.randn(4, 64, 4, 4)]
    expected = 0.0
    for s, t in zip(student, teacher):
        a = torch.nn.functional.normalize((s ** 2).mean(1).view(4, -1), dim=1)
        b = torch.nn.functional.normalize((t ** 2).mean(1).view(4, -1), dim=1)
        expected += ((a - b) ** 2).mean()
    assert torch.allclose(attention_transfer_loss(student, teacher, beta=1000.0), 1000.0 * expected)
    assert attention_transfer_loss(student, student, beta=1000.0).item() == 0.0


def test_attention_transfer_rejects_mismatch():
    with pytest.raises(ValueError, match="stages"):
        attention_transfer_loss([torch.randn(1, 2, 4, 4)], [], beta=1.0)
    with pytest.raises(ValueError, match="differ in size"):
        attention_transfer_loss([torch.randn(1, 2, 4, 4)], [torch.randn(1, 2, 8, 8)], beta=1.0)


def test_kd_loss_matches_definition():
    torch.manual_seed(1)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    p_t = torch.softmax(t / 4, dim=1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / 4, dim=1))).sum(1).mean() * 16
    assert torch.allclose(kd_loss(s, t, temperature=4.0), expected, atol=1e-6)
    assert kd_loss(t, t).abs().item() < 1e-6
