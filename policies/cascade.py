"""CascadeViT: a budget per image, by running a second, less pruned forward where the first answer is unsure.

    stages = StagedViT(vit, (1, 3, 5, 7, 9, 11))
    cascade = CascadeViT(PrunedViT(stages, config, "similarity", 0.35), PrunedViT(stages, config, "similarity", 0.1))
    cascade.calibrate(calibration_batches, budget_gflops)     # the doubt above which an image runs twice
    logits = cascade(cascade.normalize(images))

Every image runs ``first``, a cheap pruned forward. The images whose top-two class probabilities are closest
(:func:`doubt`, the margin rule) run ``second`` from the start, and its answer replaces the first's. How
many do is set by one threshold, calibrated on held-out images so that the mean GFLOPs per image, the first
forward on every image and the second on those, meet a budget. The budget is kept on the mean over images,
not per image: on new images the share that runs twice, and so the mean cost, is measured, not assumed.

``benchmarks/cascade_headroom.py`` chose the passes (greedy similarity on six pruning points, removing 0.35
then 0.1, at r = 0.5's cost) and measured which images should run twice; evaluate.py's ``--cascade`` row is
this module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from envs.errors import UsageError
from envs.vit.flops import ImageGflops
from policies.pruned_vit import InferenceModel, PrunedViT, check_gflops


def doubt(logits: torch.Tensor) -> torch.Tensor:
    """``[B]``: how unsure the answers of ``logits [B, C]`` are, in [-1, 0]: the second-largest class
    probability minus the largest (0: a tie between the two)."""
    top_two = logits.float().softmax(-1).topk(2, dim=-1).values
    return top_two[:, 1] - top_two[:, 0]


def rerun_share(first_gflops: float, second_gflops: float, budget_gflops: float) -> float:
    """The share of images that may run the second forward when every image runs the first, for the mean
    GFLOPs per image to be ``budget_gflops``; a ``UsageError`` when the first alone costs the budget or more."""
    budget_gflops = check_gflops(budget_gflops, "budget_gflops")
    if first_gflops >= budget_gflops:
        raise UsageError(f"the first forward costs {first_gflops:.4g} GFLOPs, not less than the budget's "
                         f"{budget_gflops:.4g}: nothing is left for a second")
    return min(1.0, (budget_gflops - first_gflops) / second_gflops)


class CascadeViT(InferenceModel):
    """Two pruned ViTs of one backbone: ``first`` on every image, ``second`` on the images whose
    :func:`doubt` under ``first`` is above ``threshold``.

    Args:
        first: the forward of every image, cheaper than the budget.
        second: the forward of the unsure images (usually less pruned, so dearer).
        threshold: the doubt above which an image runs ``second``; 0 (the default) runs none, ``-inf`` every
            image, and :meth:`calibrate` sets it from a budget.
    """

    def __init__(self, first: PrunedViT, second: PrunedViT, threshold: float = 0.0) -> None:
        super().__init__()
        for name, model in (("first", first), ("second", second)):
            if not isinstance(model, PrunedViT):  # a CascadeViT, say: it has no stages to run on a subset of images
                raise UsageError(f"a cascade's {name} forward must be a PrunedViT, got {type(model).__name__}")
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:  # a doubt computed by the caller
            threshold = threshold.item()
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
            # NaN, compared with every doubt, would run no image twice without a word
            raise UsageError(f"threshold must be a doubt in [-1, 0] (0 runs no image twice, -inf every one), got "
                             f"{threshold!r}")
        if first.staged.vit is not second.staged.vit:
            raise UsageError("a cascade's two forwards must prune one backbone module: build both PrunedViTs on "
                             "one StagedViT (README, Python API), not on two copies loaded from disk")
        self.first, self.second = first, second
        self.threshold = float(threshold)
        self.eval()

    @property
    def device(self) -> torch.device:
        """Where the weights are (:attr:`PrunedViT.device`)."""
        return self.first.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating-point type (:attr:`PrunedViT.dtype`), which :meth:`normalize` returns."""
        return self.first.dtype

    @property
    def backbone_config(self) -> dict[str, Any]:
        """The backbone checkpoint's config, as :class:`PrunedViT` has it."""
        return self.first.backbone_config

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images as :meth:`forward` expects them (:meth:`PrunedViT.normalize`)."""
        return self.first.normalize(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of normalised images ``[B, 3, H, W]``."""
        return self.forward_with_kept(images)[0]

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the two forwards (``torch.compile``'s arguments, :meth:`PrunedViT.forward`); which images run
        the second is chosen eagerly."""
        self.first.compile(*args, **kwargs)
        self.second.compile(*args, **kwargs)

    @torch.no_grad()
    def forward_with_kept(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, num_classes]`` and ``kept [B, S1 + S2]`` long: the patch tokens alive in each stage of
        ``first`` (its ``S1`` stages), then of ``second`` (``S2``), zero where an image did not run it."""
        logits, first_kept = self.first.forward_with_kept(images)
        logits = logits.clone()  # a compiled forward's output may be a buffer its next call overwrites (CUDA graphs)
        rerun = doubt(logits) > self.threshold
        second_kept = first_kept.new_zeros(len(images), self.second.staged.num_stages)
        if rerun.any():  # kept counts live on the CPU, the logits where the images are
            logits[rerun], second_kept[rerun.to(second_kept.device)] = self.second.forward_with_kept(images[rerun])
        return logits, torch.cat([first_kept, second_kept], dim=1)

    def reran(self, kept: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which images of :meth:`forward_with_kept`'s ``kept [B, S1 + S2]`` ran ``second``."""
        return kept[:, self.first.staged.num_stages:].any(dim=1)

    def mean_gflops(self, kept: torch.Tensor) -> ImageGflops:
        """The mean GFLOPs per image of the images with :meth:`forward_with_kept`'s ``kept [B, S1 + S2]``: the
        first forward's on every image, the second's on those that ran it."""
        reran = self.reran(kept)
        first = self.first.mean_gflops(kept[:, :self.first.staged.num_stages])
        if not reran.any():
            return first
        second = self.second.mean_gflops(kept[reran, self.first.staged.num_stages:])
        share = reran.double().mean().item()
        return ImageGflops(*(a + share * b for a, b in zip(first, second, strict=True)))

    @torch.no_grad()  # not inference_mode: the forwards it runs may be compiled after (PrunedViT.forward)
    def calibrate(self, batches: Iterable[torch.Tensor] | torch.Tensor, budget_gflops: float) -> float:
        """Set and return the threshold at which the mean GFLOPs per image over the normalised image ``batches``
        (``[B, 3, H, W]`` each, or one such tensor) are at most ``budget_gflops``: as many of the least sure
        images as the budget pays for run twice. Images of equal doubt all run twice or none does, so where they
        straddle the budget's count, none does.

        The images should be held out from those the cascade is then measured on: the threshold is fitted to
        them.
        """
        share = rerun_share(self.first.gflops().total, self.second.gflops().total, budget_gflops)  # before forwards
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        doubts = [doubt(self.first(images)) for images in batches]
        if not doubts or not sum(len(batch) for batch in doubts):
            raise UsageError("calibrate needs held-out images: the batches hold none")
        doubts = torch.cat(doubts).sort(descending=True).values
        count = int(share * len(doubts))  # images that may run twice; those of a doubt above the next one's do
        self.threshold = float(doubts[count]) if count < len(doubts) else float("-inf")
        return self.threshold

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}"
