"""The candidate rewrites of fast CPU scoring against eager torch computed independently."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import blockswap_plugin.timm  # noqa: F401  (registers wrn_*)
from blockswap_plugin.core import fused
from blockswap_plugin.core.env import env_flag
from blockswap_plugin.core.fused import (
    BatchNormReLU,
    BatchNormReLUConv,
    InputGradConv2d,
    defer_fisher,
    drop_conv_inputs_,
    fuse_batchnorm_relu_,
    fuse_batchnorm_relu_conv_,
    fused_kernel,
    is_batchnorm_relu_conv_output,
    merge_conv_groups_,
    merged_group_count,
)
from blockswap_plugin.core.init import init_paper_
from blockswap_plugin.core.sampler import Budget, sample_genotypes
from blockswap_plugin.core.scoring import FisherScorer, bf16_supported
from blockswap_plugin.core.search import candidate_seed
from blockswap_plugin.models.wide_resnet import PreActBlock
from blockswap_plugin.timm.spaces import create_space


@pytest.fixture(scope="module")
def kernel():
    if not env_flag("BLOCKSWAP_FUSED"):
        pytest.skip("BLOCKSWAP_FUSED turns the fused kernel off")
    built = fused_kernel()
    # tools/install.sh builds the kernel; a machine with a compiler must have it.
    assert built is not None, "the fused kernel did not build; run blockswap kernel to see why"
    return built


def reference_bn_relu(x, weight, bias, eps, grad):
    """Batch norm in training mode and ReLU in float64 eager torch: output and input gradient."""
    x = x.detach().double().requires_grad_()
    y = F.relu(F.batch_norm(x, None, None, weight.double(), bias.double(), True, 0.0, eps))
    (dx,) = torch.autograd.grad(y, x, grad.double())
    return y.detach(), dx


@pytest.mark.parametrize("shape", [(16, 32, 8, 8), (8, 128, 4, 4), (3, 5, 3, 3)])
def test_kernel_matches_float64_reference(kernel, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1.5
    weight = torch.rand(shape[1]) + 0.5
    bias = torch.randn(shape[1]) * 0.3
    grad = torch.randn(shape)
    y_ref, dx_ref = reference_bn_relu(x, weight, bias, 1e-5, grad)

    module = BatchNormReLU(nn.BatchNorm2d(shape[1]), kernel)
    with torch.no_grad():
        module.bn.weight.copy_(weight)
        module.bn.bias.copy_(bias)
    module.bn.requires_grad_(False)
    x_in = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = module(x_in)
    (dx,) = torch.autograd.grad(y, x_in, grad)
    assert torch.allclose(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dx.double(), dx_ref, rtol=1e-4, atol=1e-5)


# Channel counts below and between multiples of 32 run through the kernel's
# repeated-row periods. With 7 x 7 positions, rows are left after the last whole period.
@pytest.mark.parametrize("channels", [1, 2, 8, 12, 16, 24, 40, 100])
def test_kernel_narrow_channels_match_reference(kernel, channels):
    torch.manual_seed(channels)
    shape = (5, channels, 7, 7)
    x = torch.randn(shape) * 2 - 0.5
    weight = torch.rand(channels) + 0.5
    bias = torch.randn(channels) * 0.3
    grad = torch.randn(shape)
    y_ref, dx_ref = reference_bn_relu(x, weight, bias, 1e-5, grad)
    x_in = x.contiguous(memory_format=torch.channels_last)
    y, mean, invstd = kernel.forward(x_in, weight, bias, 1e-5)
    dx = kernel.backward(grad.contiguous(memory_format=torch.channels_last), x_in, mean, invstd, weight, bias)
    assert torch.allclose(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dx.double(), dx_ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(kernel.apply(x_in, mean, invstd, weight, bias), y)
    a = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    expected = torch.einsum("nchw,nchw->nc", a.double(), grad.double())
    assert torch.allclose(kernel.fisher_terms(a, grad.contiguous(memory_format=torch.channels_last)).double(),
                          expected, rtol=1e-5, atol=1e-4)


def test_kernel_rejects_empty_input(kernel):
    empty = torch.zeros(0, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="must not be empty"):
        kernel.forward(empty, weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="must not be empty"):
        kernel.fisher_terms(empty, empty)


@pytest.mark.parametrize("channels", [8, 24, 64])
def test_kernel_same_bits_for_any_thread_count(kernel, channels):
    torch.manual_seed(3)
    shape = (16, channels, 12, 12)
    x = (torch.randn(shape) * 2).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels) * 0.2
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, mean, invstd = kernel.forward(x, weight, bias, 1e-5)
            results.append((y, mean, invstd, kernel.backward(grad, x, mean, invstd, weight, bias),
                            kernel.fisher_terms(x, grad)))
    finally:
        torch.set_num_threads(old)
    for one_thread, two_threads in zip(*results):
        assert torch.equal(one_thread, two_threads)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="CPU without native bf16")
def test_kernel_in_bf16_matches_eager_bf16(kernel):
    torch.manual_seed(1)
    shape = (32, 64, 8, 8)
    x = (torch.randn(shape) * 2).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last)
    bn = nn.BatchNorm2d(64).requires_grad_(False)
    eager_x = x.clone().requires_grad_()
    eager = F.relu(F.batch_norm(eager_x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    (eager_dx,) = torch.autograd.grad(eager, eager_x, grad)
    fused_x = x.clone().requires_grad_()
    fused = BatchNormReLU(bn, kernel)(fused_x)
    (fused_dx,) = torch.autograd.grad(fused, fused_x, grad)
    assert fused.dtype == fused_dx.dtype == torch.bfloat16
    # Both round to bf16 at different points; compare as relative norms.
    assert (fused.float() - eager.float()).norm() / eager.float().norm() < 1e-2
    assert (fused_dx.float() - eager_dx.float()).norm() / eager_dx.float().norm() < 3e-2


def test_fuse_replaces_only_registered_pairs(kernel):
    block = PreActBlock(32, 32, 1, "Conv")
    assert fuse_batchnorm_relu_(block, kernel) == 2
    assert isinstance(block.bn1, BatchNormReLU) and isinstance(block.act1, nn.Identity)
    # An unregistered module with the same attribute names is left alone.
    other = nn.Module()
    other.bn1, other.act1 = nn.BatchNorm2d(4), nn.ReLU()
    assert fuse_batchnorm_relu_(other, kernel) == 0
    assert isinstance(other.bn1, nn.BatchNorm2d)


@pytest.mark.parametrize(
    "family, channels, groups, stride, expected",
    [("amx", 32, 8, 1, 2), ("amx", 32, 16, 1, 2), ("amx", 64, 16, 1, 4), ("amx", 16, 8, 1, 1),
     ("amx", 32, 32, 1, 32), ("amx", 32, 32, 2, 1), ("amx", 64, 32, 2, 2), ("amx", 128, 4, 1, 4),
     ("amx", 24, 12, 1, 1),
     ("other", 32, 8, 1, 8), ("other", 32, 16, 1, 8), ("other", 64, 16, 1, 16), ("other", 16, 8, 1, 4),
     ("other", 32, 32, 1, 32), ("other", 32, 32, 2, 4), ("other", 64, 32, 2, 8), ("other", 24, 12, 1, 6)],
)
def test_merged_groups_compute_the_same_convolution(monkeypatch, family, channels, groups, stride, expected):
    torch.manual_seed(2)
    conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=False)
    assert merged_group_count(conv, family) == expected
    monkeypatch.setattr(fused, "_CPU_FAMILY", family)
    assert merged_group_count(conv) == expected
    x = torch.randn(2, channels, 9, 9)
    before = conv(x)
    merge_conv_groups_(conv)
    assert conv.groups == expected
    assert conv.weight.shape == (channels, channels // expected, 3, 3)
    assert torch.allclose(conv(x), before, rtol=1e-5, atol=1e-5)


def test_input_grad_conv_matches_eager():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, groups=2, bias=False), nn.Conv2d(16, 4, 1, bias=False))
    model.requires_grad_(False)
    x = torch.randn(4, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 4, 5, 5)

    def run(module):
        saved = []

        def pack(tensor):
            saved.append(tensor.numel())
            return tensor

        leaf = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(leaf)
        (dx,) = torch.autograd.grad(out, leaf, grad)
        return out, dx, sum(saved)

    out_ref, dx_ref, saved_ref = run(model)
    assert drop_conv_inputs_(model) == 2
    assert all(isinstance(m, InputGradConv2d) for m in model)
    out, dx, saved = run(model)
    assert torch.allclose(out, out_ref)
    assert torch.allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    # Eager keeps both inputs and weights; the wrapper keeps the weights only.
    assert saved == sum(m.conv.weight.numel() for m in model) < saved_ref


def test_rewritten_candidates_score_like_the_exact_reference(cifar_batch):
    images, labels = cifar_batch
    space, build = create_space(timm.create_model("wrn_16_2", num_classes=10), (3, 32, 32))
    genotypes = sample_genotypes(space, 3, [Budget("params", 120_000)], seed=4)
    rewritten = FisherScorer(images, labels, "fp32", rewrite=True)
    exact = FisherScorer(images, labels, "exact")
    for index, blocks in enumerate(genotypes):
        scores = []
        for scorer in (rewritten, exact):
            torch.manual_seed(candidate_seed(0, index))
            scores.append(scorer.score(init_paper_(build(blocks))))
        # Same function in fp32; only the order of float sums differs. Measured:
        # within 3e-4, closer than the eager channels-last path (4e-3).
        assert scores[0] == pytest.approx(scores[1], rel=1e-3), blocks


def test_rewrites_leave_skipped_modules(kernel):
    block = PreActBlock(16, 16, 1, "Conv")
    assert fuse_batchnorm_relu_(block, kernel, skip=[block.bn1]) == 1
    assert isinstance(block.bn1, nn.BatchNorm2d)
    assert isinstance(block.bn2, BatchNormReLU)
    assert drop_conv_inputs_(block, skip=[block.conv1]) == 1
    assert type(block.conv1) is nn.Conv2d
    assert isinstance(block.conv2, InputGradConv2d)


def test_kernel_command_reports_ready(kernel, capsys):
    from blockswap_plugin.cli import main

    assert main(["kernel"]) == 0
    assert "kernel: ready" in capsys.readouterr().out


def test_apply_repeats_forward_output(kernel):
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(8, 24, 6, 6) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.rand(24) + 0.5, torch.randn(24) * 0.2
        y, mean, invstd = kernel.forward(x, weight, bias, 1e-5)
        assert torch.equal(kernel.apply(x, mean, invstd, weight, bias), y)


def test_fisher_terms_match_einsum(kernel):
    torch.manual_seed(2)
    a = torch.randn(6, 40, 5, 7).contiguous(memory_format=torch.channels_last)
    g = torch.randn(6, 40, 5, 7).contiguous(memory_format=torch.channels_last)
    expected = torch.einsum("nchw,nchw->nc", a.double(), g.double())
    assert torch.allclose(kernel.fisher_terms(a, g).double(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="shapes differ"):
        kernel.fisher_terms(a, g[:, :10])


def test_fused_triple_matches_eager(kernel):
    torch.manual_seed(3)
    bn, conv = nn.BatchNorm2d(16), nn.Conv2d(16, 32, 1, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    bn.requires_grad_(False)
    conv.requires_grad_(False)
    x = (torch.randn(8, 16, 8, 8) * 2).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 32, 8, 8)

    eager_in = x.double().requires_grad_()
    eager_out = F.conv2d(F.relu(F.batch_norm(eager_in, None, None, bn.weight.double(), bn.bias.double(), True,
                                             0.0, bn.eps)), conv.weight.double())
    (eager_grad,) = torch.autograd.grad(eager_out, eager_in, grad.double())

    step = BatchNormReLUConv(bn, conv, kernel)
    fused_in = x.clone().requires_grad_()
    out = step(fused_in)
    assert is_batchnorm_relu_conv_output(out)
    seen = {}
    # The Fisher function gets the recomputed output and the gradient in the backward pass.
    target = defer_fisher(out, lambda activation, gradient: seen.update(a=activation.clone(), g=gradient.clone()))
    assert target is fused_in
    (fused_grad,) = torch.autograd.grad(out, fused_in, grad)
    assert torch.allclose(out.double(), eager_out.detach(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(fused_grad.double(), eager_grad, rtol=1e-4, atol=1e-4)
    assert torch.equal(seen["a"], out.detach())
    assert torch.equal(seen["g"], grad)


def test_triples_fused_where_registered(kernel):
    block = PreActBlock(32, 32, 1, "G4B2")
    assert fuse_batchnorm_relu_conv_(block, kernel) == 1
    branch = block.conv1
    assert isinstance(branch.bn2, BatchNormReLUConv)
    assert isinstance(branch.act2, nn.Identity) and isinstance(branch.expand, nn.Identity)
    # The convolution inside the fused step is not wrapped again.
    drop_conv_inputs_(block)
    assert type(branch.bn2.conv) is nn.Conv2d
    plain = PreActBlock(32, 32, 1, "Conv")
    assert fuse_batchnorm_relu_conv_(plain, kernel) == 0


def test_merged_group_count_rejects_unknown_family():
    conv = nn.Conv2d(32, 32, 3, 1, 1, groups=16, bias=False)
    with pytest.raises(ValueError, match="unknown CPU family 'sse'"):
        merged_group_count(conv, "sse")
