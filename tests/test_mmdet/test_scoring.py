"""Fisher potential under the detector's loss on a real COCO128 minibatch, and the detector search."""
import copy

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from blockswap_plugin.core.fisher import fisher_from_activations
from blockswap_plugin.core.init import init_paper_
from blockswap_plugin.core.sampler import Budget
from blockswap_plugin.mmdet import BlockSwapHook, detector_fisher_potential, search_detector, student_backbone_cfg
from mmdet.registry import MODELS

from .conftest import TEACHER_CONFIG


@pytest.fixture(scope="module")
def detector_and_batch(coco128):
    """RetinaNet R18 from the COCO128 teacher config and one preprocessed training minibatch of 2 images."""
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(TEACHER_CONFIG))
    cfg.train_dataloader.batch_size = 2
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    torch.manual_seed(0)
    detector = MODELS.build(cfg.model)
    data = detector.data_preprocessor(next(iter(loader)), training=True)
    return cfg, detector, data["inputs"], data["data_samples"]


def student(cfg, detector, blocks, seed=0):
    torch.manual_seed(seed)
    model = copy.deepcopy(detector)
    model.backbone = MODELS.build(student_backbone_cfg(cfg.model.backbone, detector.backbone, blocks))
    return model


def test_paper_init_scores_positive(detector_and_batch):
    cfg, detector, inputs, samples = detector_and_batch
    model = student(cfg, detector, ["DConvA4", "ConvB2"] + ["Conv"] * 6)
    model.init_weights()
    init_paper_(model.backbone)
    scores = detector_fisher_potential(model, inputs, samples)
    assert list(scores) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert all(score > 0 for score in scores.values())


def test_zero_init_residual_scores_zero(detector_and_batch):
    cfg, detector, inputs, samples = detector_and_batch
    model = student(cfg, detector, ["DConvA4", "ConvB2"] + ["Conv"] * 6)
    model.init_weights()  # mmdet's zero_init_residual zeroes each block's last norm
    scores = detector_fisher_potential(model, inputs, samples)
    assert scores == {name: 0.0 for name in scores}


def test_score_reads_branch_output_before_shortcut(detector_and_batch):
    """The score of a block equals the formula on its last norm's output, not on output + shortcut."""
    cfg, detector, inputs, samples = detector_and_batch
    model = student(cfg, detector, ["Conv"] * 8)
    model.init_weights()
    init_paper_(model.backbone)
    model.train()
    branch = {}

    def keep(module, args, output):
        branch["output"] = output
        return output.clone()

    handle = model.backbone.layer3[1].norm2.register_forward_hook(keep)
    loss, _ = model.parse_losses(model.loss(inputs, samples))
    (grad,) = torch.autograd.grad(loss, [branch["output"]])
    handle.remove()
    expected = float(fisher_from_activations(branch["output"].detach(), grad).sum())
    assert detector_fisher_potential(model, inputs, samples)["layer3.1"] == pytest.approx(expected, rel=1e-4)


def test_scoring_leaves_running_stats(detector_and_batch):
    cfg, detector, inputs, samples = detector_and_batch
    model = student(cfg, detector, ["Conv"] * 8)
    init_paper_(model.backbone)
    before = model.backbone.layer1[0].norm1.running_mean.clone()
    detector_fisher_potential(model, inputs, samples)
    # Scoring runs BatchNorm in train mode, so statistics move; search_detector discards each candidate.
    assert not torch.equal(before, model.backbone.layer1[0].norm1.running_mean)


@pytest.mark.slow
def test_search_detector_is_reproducible(detector_and_batch):
    cfg, detector, inputs, samples = detector_and_batch
    hook = BlockSwapHook(budget=0.3)
    space = hook._space(detector.backbone, tuple(inputs.shape[1:]))
    base = student_backbone_cfg(cfg.model.backbone, detector.backbone, ["Conv"] * 8)

    def build(blocks):
        return MODELS.build({**base, "genotype": list(blocks)})

    target = 0.3 * space.count_params(["Conv"] * 8)
    rng_before = torch.random.get_rng_state()
    first = search_detector(detector, space, build, inputs, samples, 2, [Budget("params", target)], seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    second = search_detector(detector, space, build, inputs, samples, 2, [Budget("params", target)], seed=1)
    assert [c.blocks for c in first.candidates] == [c.blocks for c in second.candidates]
    assert [c.score for c in first.candidates] == [c.score for c in second.candidates]
    for candidate in first.candidates:
        assert 0.975 * target < candidate.params < 1.025 * target
        assert candidate.params == sum(p.numel() for p in build(candidate.blocks).parameters())
    assert first.best.score == max(c.score for c in first.candidates)
