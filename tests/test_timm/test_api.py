"""One-call blockswap() and apply_genotype() on real timm models and real CIFAR-10 images."""
import pytest
import timm
import torch

import blockswap_plugin as bp
from blockswap_plugin.api import SearchSummary


def _check_student(model, student, budget_fraction=0.25, tolerance=0.025):
    target = budget_fraction * bp.count_params(model)
    params = bp.count_params(student)
    assert target * (1 - tolerance) < params < target * (1 + tolerance)
    assert type(student) is type(model)
    assert isinstance(student.blockswap_genotype, bp.Genotype)
    assert isinstance(student.blockswap_search, SearchSummary)
    assert student.blockswap_search.params == params
    student.eval()
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert student(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    rebuilt = bp.apply_genotype(model, student.blockswap_genotype)
    assert bp.count_params(rebuilt) == params
    rebuilt.load_state_dict(student.state_dict(), strict=True)


def test_blockswap_resnet18_small(cifar_batch):
    model = timm.create_model("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = bp.blockswap(model, cifar_batch, 0.25, num_samples=3, seed=0, progress=False)
    _check_student(model, student)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scores = [c.score for c in student.blockswap_search.result.candidates]
    assert student.blockswap_search.fisher_potential == max(scores)
    assert len(set(scores)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "wrn_40_2"])
def test_blockswap_acceptance(name, cifar_batch):
    model = timm.create_model(name, num_classes=10)
    student = bp.blockswap(model, cifar_batch, 0.25, num_samples=20, seed=0, progress=False)
    _check_student(model, student)
    assert len(student.blockswap_search.result.candidates) == 20


def test_blockswap_int_budget_and_loader(cifar_batch):
    images, labels = cifar_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:16], labels[:16]), batch_size=16)
    model = timm.create_model("wrn_16_1", num_classes=10)
    student = bp.blockswap(model, loader, 100_000, num_samples=2, seed=1, progress=False)
    assert 97_500 < bp.count_params(student) < 102_500
    assert student.blockswap_search.batch_size == 16


@pytest.mark.parametrize("budget", [0.0, 1.5, -3, True, "0.25"])
def test_blockswap_rejects_bad_budget(budget, cifar_batch):
    model = timm.create_model("wrn_16_1", num_classes=10)
    with pytest.raises(bp.BlockSwapError, match="budget"):
        bp.blockswap(model, cifar_batch, budget, num_samples=2)


def test_blockswap_unreachable_budget_names_range(cifar_batch):
    model = timm.create_model("resnet50", num_classes=10)
    with pytest.raises(bp.BlockSwapError, match="genotypes reach"):
        bp.blockswap(model, cifar_batch, 0.05, num_samples=2)


def test_rare_budget_uses_count_tables(cifar_batch):
    from blockswap_plugin.core.sampler import Budget, sample_genotypes
    from blockswap_plugin.timm.spaces import create_space

    model = timm.create_model("resnet50", num_classes=10)
    space, _ = create_space(model, (3, 32, 32))
    budget = Budget("params", 0.25 * bp.count_params(model))
    # The paper's rejection sampling accepts about one draw in 40,000 here.
    with pytest.raises(bp.BlockSwapError, match="rare under uniform sampling"):
        sample_genotypes(space, 50, [budget], seed=0, method="rejection", max_draws=100_000)
    genotypes = sample_genotypes(space, 50, [budget], seed=0)
    assert len(genotypes) == 50
    assert all(budget.accepts(space.count_params(g)) for g in genotypes)
    assert len({tuple(g) for g in genotypes}) > 40


def test_apply_genotype_checks_input():
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(bp.BlockSwapError, match="8 swappable"):
        bp.apply_genotype(model, ["Conv"] * 3)
    with pytest.raises(bp.BlockSwapError, match="made for 'resnet50'"):
        bp.apply_genotype(model, bp.Genotype("resnet50", ["Conv"] * 8))
    with pytest.raises(bp.BlockSwapError, match="unknown block type"):
        bp.apply_genotype(model, ["Conv"] * 7 + ["Nope"])


def test_apply_genotype_deterministic_structure(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    genotype = bp.Genotype("resnet18", ["DConvA4", "G8B4"] * 4)
    path = tmp_path / "genotype.json"
    genotype.save(path)
    first = bp.apply_genotype(model, genotype)
    second = bp.apply_genotype(model, str(path))
    assert second.blockswap_genotype == genotype
    second.load_state_dict(first.state_dict(), strict=True)
    first.eval()
    second.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(first(x), second(x))


def test_student_checkpoint_round_trip(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    student = bp.apply_genotype(model, ["DConvG8", "ConvB2"] * 4)
    student.train()
    student(torch.randn(4, 3, 32, 32))  # moves BN running statistics away from their defaults
    student.eval()
    path = tmp_path / "student.pth"
    bp.save_student(student, path)
    loaded = bp.load_student(path).eval()
    assert loaded.blockswap_genotype == student.blockswap_genotype
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), student(x))
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_student_rejects_plain_checkpoint(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(bp.BlockSwapError, match="no BlockSwap genotype"):
        bp.load_student(path)
    with pytest.raises(bp.BlockSwapError, match="not found"):
        bp.load_student(tmp_path / "missing.pth")


def test_wrn_student_keeps_paper_init():
    model = timm.create_model("wrn_16_1", num_classes=10)
    student = bp.apply_genotype(model, ["DConv"] * 6)
    shortcut = student.stages[2][0].shortcut
    # WideResNet's own init: He-normal scaled by fan-out, std = sqrt(2 / 64) for this 1x1 32 -> 64 conv.
    # torch's default init would give std = 1 / sqrt(3 * 32), about 0.10.
    assert shortcut.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight))
               for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_resnet_student_gets_timm_init():
    model = timm.create_model("resnet18", num_classes=10)
    student = bp.apply_genotype(model, ["DConvA2"] * 8)
    assert all(block.branch.bn2.weight.abs().sum().item() == 0.0 for block in student.layer1)
    assert student.bn1.weight.abs().sum().item() > 0


def test_wrn_genotype_from_file_path(tmp_path):
    blocks = ["DConvA4", "G8B2", "Conv", "ConvB2", "DConvG4", "DConv"]
    genotype = bp.Genotype("wrn_16_2", blocks)
    path = tmp_path / "genotype.json"
    genotype.save(path)
    from_list = timm.create_model("wrn_16_2", genotype=blocks)
    from_str = timm.create_model("wrn_16_2", genotype=str(path))
    from_path = timm.create_model("wrn_16_2", genotype=path)
    assert from_str.genotype == from_list.genotype
    assert from_path.genotype == from_list.genotype
    assert bp.count_params(from_str) == bp.count_params(from_list)


def test_wrn_genotype_missing_file_named():
    # A string is never read as a sequence of one-letter block names.
    with pytest.raises(bp.BlockSwapError, match="genotype file not found: no_such.json"):
        timm.create_model("wrn_16_2", genotype="no_such.json")


def test_wrn_student_by_name_round_trip(tmp_path):
    blocks = ["G8B2", "DConvA4", "Conv", "ConvB4", "DConvG8", "A2B2"]
    student = timm.create_model("wrn_16_2", num_classes=10, genotype=blocks)
    assert student.blockswap_genotype == bp.Genotype("wrn_16_2", blocks)
    assert getattr(timm.create_model("wrn_16_2"), "blockswap_genotype", None) is None
    path = tmp_path / "student.pth"
    bp.save_student(student.eval(), path)
    loaded = bp.load_student(path).eval()
    assert loaded.genotype == student.genotype
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), student(x))
