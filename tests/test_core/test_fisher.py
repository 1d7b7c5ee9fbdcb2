"""Fisher potential against an independent computation, and its side-effect contract."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import blockswap_plugin
from blockswap_plugin.core.init import init_paper_
from blockswap_plugin.models.wide_resnet import PreActBlock


def reference_fisher(model, images, labels, branch_ends):
    """Fisher potential from forward hooks on the given branch-end modules and autograd.grad.

    Written apart from the library: it hooks the last module of each residual
    branch instead of the library's marker or locator, and applies the formula
    with einsum. The hook keeps one clone of the output and passes on another,
    so the host's in-place shortcut addition cannot overwrite the kept one.
    """
    kept = []

    def keep(module, args, output):
        activation = output.clone()
        kept.append(activation)
        return activation.clone()

    handles = [module.register_forward_hook(keep) for module in branch_ends]
    model.train()
    try:
        loss = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, kept)
    finally:
        for handle in handles:
            handle.remove()
    total = 0.0
    for a, g in zip(kept, grads):
        per_sample_channel = torch.einsum("nchw,nchw->nc", a.detach().double(), g.double())
        total += float((per_sample_channel ** 2).sum() / (2 * a.shape[0]))
    return total


def wrn_branch_ends(model):
    ends = []
    for module in model.modules():
        if isinstance(module, PreActBlock):
            ends.append(module.conv2 if module.conv2 is not None else module.conv1)
    return ends


def timm_resnet_branch_ends(model):
    ends = []
    for module in model.modules():
        if isinstance(module, timm.models.resnet.Bottleneck):
            ends.append(module.bn3)
        elif isinstance(module, timm.models.resnet.BasicBlock):
            ends.append(module.bn2)
    return ends


def test_fisher_matches_reference_on_wrn_40_2(cifar_batch):
    images, labels = cifar_batch
    torch.manual_seed(0)
    model = timm.create_model("wrn_40_2", num_classes=10, genotype=["DConvA4", "ConvB2", "G8B2"] * 6)
    reference_model = copy.deepcopy(model)
    expected = reference_fisher(reference_model, images, labels, wrn_branch_ends(reference_model))
    got = blockswap_plugin.fisher_potential(model, images, labels)
    assert got > 0
    assert got == pytest.approx(expected, rel=1e-5)


def test_fisher_matches_reference_on_timm_resnet(cifar_batch):
    images, labels = cifar_batch
    torch.manual_seed(0)
    model = init_paper_(timm.create_model("resnet18", num_classes=10))
    reference_model = copy.deepcopy(model)
    expected = reference_fisher(reference_model, images[:32], labels[:32], timm_resnet_branch_ends(reference_model))
    got = blockswap_plugin.fisher_potential(model, images[:32], labels[:32])
    assert got > 0
    assert got == pytest.approx(expected, rel=1e-5)


def test_per_block_scores_sum_to_total(cifar_batch):
    images, labels = cifar_batch
    model = timm.create_model("wrn_16_2", num_classes=10)
    per_block = blockswap_plugin.fisher_potential_per_block(model, images[:32], labels[:32])
    assert list(per_block) == model.block_names()
    total = blockswap_plugin.fisher_potential(model, images[:32], labels[:32])
    assert sum(per_block.values()) == pytest.approx(total, rel=1e-6)


def test_fisher_leaves_model_unchanged(cifar_batch):
    images, labels = cifar_batch
    model = timm.create_model("wrn_16_2", num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    blockswap_plugin.fisher_potential(model, images[:32], labels[:32])
    assert not model.training
    assert all(not m.training for m in model.modules())
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_zeroed_last_norms_give_zero_score(cifar_batch):
    images, labels = cifar_batch
    model = timm.create_model("wrn_16_2", num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PreActBlock):
                # Zero the branch's last conv so every branch output is zero.
                last = module.conv2 if module.conv2 is not None else module.conv1
                for p in last.parameters():
                    p.zero_()
    assert blockswap_plugin.fisher_potential(model, images[:32], labels[:32]) == 0.0


def test_timm_zero_init_last_trap(cifar_batch):
    images, labels = cifar_batch
    model = timm.create_model("resnet18", num_classes=10)  # zero_init_last=True by default
    assert blockswap_plugin.fisher_potential(model, images[:16], labels[:16]) == 0.0
    assert blockswap_plugin.fisher_potential(init_paper_(model), images[:16], labels[:16]) > 0.0


def test_no_blocks_is_a_clear_error():
    with pytest.raises(blockswap_plugin.BlockSwapError, match="no residual blocks found"):
        blockswap_plugin.fisher_potential(torch.nn.Linear(4, 2), torch.randn(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["wrn_16_2", "resnet18"])
def test_recompute_gives_identical_scores(cifar_batch, name):
    images, labels = cifar_batch
    torch.manual_seed(0)
    model = init_paper_(timm.create_model(name, num_classes=10))
    before = copy.deepcopy(model.state_dict())
    kept = blockswap_plugin.fisher_potential_per_block(model, images[:32], labels[:32])
    recomputed = blockswap_plugin.fisher_potential_per_block(model, images[:32], labels[:32], recompute=True)
    assert sum(kept.values()) > 0
    assert recomputed == kept
    # The blocks' own forward methods are back and the state is untouched.
    assert not any("forward" in vars(module) for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
