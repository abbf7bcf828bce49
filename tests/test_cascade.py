"""CascadeViT (policies/cascade.py): a budget per image by a second forward on the least sure images.

Its answers must be the first forward's, or the second's where an image ran twice; its cost the first's plus
the second's on the share that ran it; and calibration must spend the budget on held-out images without
exceeding it.
"""

from __future__ import annotations

import math

import pytest
import torch

from envs.vit.backbone_checkpoint import load_backbone
from envs.vit.staged_vit import StagedViT
from policies.cascade import CascadeViT, doubt, rerun_share
from policies.pruned_vit import PrunedViT
from tests.tiny_policies import PRUNE_POINTS


@pytest.fixture(scope="module")
def passes(tiny_staged) -> tuple[PrunedViT, PrunedViT]:
    """Greedy similarity removing 0.6, then 0.2, on the tiny backbone."""
    staged, config = tiny_staged
    return PrunedViT(staged, config, "similarity", 0.6), PrunedViT(staged, config, "similarity", 0.2)


@pytest.fixture(scope="module")
def images(passes) -> torch.Tensor:
    """Normalised random images ``[40, 3, 32, 32]``."""
    pixels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return passes[0].normalize(pixels)


def test_doubt_is_the_margin_between_the_top_two_probabilities():
    logits = torch.tensor([[2.0, 2.0, -1.0], [0.0, math.log(3.0), -30.0], [50.0, 0.0, 0.0]])
    torch.testing.assert_close(doubt(logits), torch.tensor([0.0, -0.5, -1.0]), atol=1e-6, rtol=0)


def test_threshold_zero_is_the_first_forward_and_minus_infinity_the_second(passes, images):
    first, second = passes
    logits, kept = CascadeViT(first, second).forward_with_kept(images)
    torch.testing.assert_close(logits, first(images), rtol=0, atol=0)
    assert not kept[:, first.staged.num_stages:].any()
    assert CascadeViT(first, second).mean_gflops(kept).total == pytest.approx(first.gflops().total)

    everything = CascadeViT(first, second, float("-inf"))
    logits, kept = everything.forward_with_kept(images)
    torch.testing.assert_close(logits, second(images), rtol=1e-5, atol=1e-5)
    assert everything.reran(kept).all()
    assert everything.mean_gflops(kept).total == pytest.approx(first.gflops().total + second.gflops().total)


def test_the_least_sure_images_run_twice_and_pay_for_it(passes, images):
    first, second = passes
    doubts = doubt(first(images))
    threshold = doubts.median().item()
    cascade = CascadeViT(first, second, threshold)
    logits, kept = cascade.forward_with_kept(images)
    reran = cascade.reran(kept)
    assert torch.equal(reran, doubts > threshold) and 0 < reran.sum() < len(images)
    torch.testing.assert_close(logits[~reran], first(images[~reran]), rtol=0, atol=0)
    torch.testing.assert_close(logits[reran], second(images[reran]), rtol=1e-5, atol=1e-5)
    share = reran.double().mean().item()
    assert cascade.mean_gflops(kept).total == pytest.approx(first.gflops().total + share * second.gflops().total)


def test_calibration_spends_the_budget_without_exceeding_it(passes, images):
    """12.8 images' worth of second forwards: 12 run twice (13 would exceed the budget)."""
    first, second = passes
    budget = first.gflops().total + 0.32 * second.gflops().total
    cascade = CascadeViT(first, second)
    cascade.calibrate(images.split(16), budget)
    _, kept = cascade.forward_with_kept(images)
    assert cascade.reran(kept).sum().item() == 12  # random images: no ties in doubt
    spent = cascade.mean_gflops(kept).total
    assert budget - second.gflops().total / len(images) < spent <= budget
    assert cascade.calibrate(images, budget) == cascade.calibrate(images.split(16), budget)  # one tensor: one batch


def test_images_of_equal_doubt_at_the_cut_all_run_twice_or_none_does(passes, images):
    """Every image twice: the budget pays for 13 of the 40 second forwards, so the 13th least sure image's copy
    would have to stay out; neither runs twice, and 12 images do."""
    first, second = passes
    twice = torch.cat([images[:20], images[:20]])
    budget = first.gflops().total + 0.33 * second.gflops().total
    cascade = CascadeViT(first, second)
    cascade.calibrate([twice], budget)
    _, kept = cascade.forward_with_kept(twice)
    reran = cascade.reran(kept)
    assert torch.equal(reran[:20], reran[20:]) and reran.sum().item() == 12


def test_a_budget_that_the_first_forward_uses_up_is_refused(passes):
    first, second = passes
    with pytest.raises(ValueError, match="nothing is left for a second"):
        rerun_share(first.gflops().total, second.gflops().total, first.gflops().total)
    assert rerun_share(1.0, 2.0, 10.0) == 1.0
    with pytest.raises(ValueError, match="calibrate needs held-out images"):
        CascadeViT(first, second).calibrate([], 10.0)


def test_the_two_forwards_prune_one_backbone(passes, tiny_backbone):
    vit, config = load_backbone(tiny_backbone)
    other = PrunedViT(StagedViT(vit, PRUNE_POINTS), config, "similarity", 0.2)
    with pytest.raises(ValueError, match="must prune one backbone module: build both PrunedViTs on one StagedViT"):
        CascadeViT(passes[0], other)


@pytest.mark.parametrize("threshold", [float("nan"), "0.1", None, True])
def test_a_threshold_that_is_no_doubt_is_refused(passes, threshold):
    """NaN would run no image twice without a word; a string failed only when the cascade was printed."""
    with pytest.raises(ValueError, match=r"threshold must be a doubt in \[-1, 0\]"):
        CascadeViT(*passes, threshold)
    assert CascadeViT(*passes, torch.tensor(-0.5)).threshold == -0.5  # a doubt computed with torch


def test_forwards_that_are_no_pruned_vits_are_refused(passes):
    """A cascade as a forward (or anything else) ended in an AttributeError on ``.staged``."""
    cascade = CascadeViT(*passes)
    with pytest.raises(ValueError, match="a cascade's first forward must be a PrunedViT, got CascadeViT"):
        CascadeViT(cascade, passes[1])
    with pytest.raises(ValueError, match="a cascade's second forward must be a PrunedViT, got str"):
        CascadeViT(passes[0], "similarity")


def test_a_cascade_says_its_device_and_dtype_as_a_pruned_vit_does(tiny_staged):
    """CascadeViT had PrunedViT's ``device`` but not its ``dtype``: ``images.to(cascade.dtype)`` was an
    AttributeError."""
    staged, config = tiny_staged
    cascade = CascadeViT(PrunedViT(staged, config, "similarity", 0.6), PrunedViT(staged, config, "similarity", 0.2))
    assert (cascade.device, cascade.dtype) == (torch.device("cpu"), torch.float32)
    pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert cascade.normalize(pixels).dtype == cascade.dtype
