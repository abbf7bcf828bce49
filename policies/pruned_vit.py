"""PrunedViT: a token-pruned Vision Transformer that loads in one line and is called like a timm model.

    model = PrunedViT.from_checkpoint("reference/marl_policy")          # the trained agents, exact budget
    logits = model(model.normalize(images))                             # uint8 [B, 3, H, W] -> [B, classes]

It composes the project's one pruned computation (``exact_forward`` of ``envs.vit.pruned_forward``) with what
chooses the tokens: the agents (``policies.decisions``), a heuristic (``policies.heuristics``), ToMe
(``envs.vit.tome``) or nothing (the unpruned model), and costs it with ``envs.vit.flops``. evaluate.py builds
every row of its table as a PrunedViT (a cascade row as two of them, ``policies.cascade``), so what a user runs
is what was evaluated. A checkpoint's policy is read from its export (``policies.export``: safetensors and
JSON, never a pickle) when it has one.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from cli import MAX_SEED
from envs.errors import UsageError
from envs.problem import POLICIES, PruningProblem, check_protected_share, check_target_ratio
from envs.vit.backbone_checkpoint import CheckpointError, load_backbone, normalize
from envs.vit.data import fit_image
from envs.vit.flops import (
    ImageGflops,
    TokenScores,
    ViTSpec,
    exact_budget_gflops,
    exact_budget_schedule,
    image_gflops,
    tome_gflops,
    unpruned_gflops,
)
from envs.vit.pruned_forward import exact_forward
from envs.vit.staged_vit import DEFAULT_PRUNE_POINTS, PrunePointsError, StagedViT
from envs.vit.token_merge import REDUCTIONS
from envs.vit.tome import tome_forward, tome_schedule
from policies.checkpoints import (
    CheckpointInfo,
    Modules,
    PolicyCheckpointError,
    check_policies,
    load_policies,
)
from policies.decisions import DEFAULT_PROTECTED_SHARE, policy_selector
from policies.heuristics import HEURISTIC_RULES, HEURISTICS, heuristic_selector
from policies.token_scorer import TokenScoring

SELECTIONS: tuple[str, ...] = (*HEURISTICS, "tome")
"""The selections named by a string: the heuristics of ``policies.heuristics`` and ToMe."""


def policy_backbone(problem: PruningProblem, checkpoint: str | os.PathLike | None,
                    backbone: str | os.PathLike | None = None) -> tuple[StagedViT, dict[str, Any], Path]:
    """The backbone a policy checkpoint's problem names (or ``backbone``) split at its pruning points, in eval
    mode, with its config and path; a backbone too shallow for the pruning points is a
    :class:`~policies.checkpoints.PolicyCheckpointError` naming both (for a problem of no checkpoint,
    ``checkpoint=None``, a ``PrunePointsError`` naming the backbone, whose points the caller gave). Where the
    backbone the checkpoint recorded does not load (moved, most often), ``load_backbone``'s error goes on to say
    whose backbone it is and how to pass another, since the user named neither."""
    backbone_path = Path(backbone).expanduser() if backbone else problem.backbone_path
    try:
        vit, config = load_backbone(backbone_path)
    except CheckpointError as error:
        if backbone or checkpoint is None:
            raise
        raise PolicyCheckpointError(f"{error}: checkpoint {checkpoint} was trained on it; pass where it is now "
                                    f"(--backbone; backbone= in Python)") from None
    try:
        return StagedViT(vit, problem.prune_points).eval(), config, backbone_path
    except UsageError as error:
        if checkpoint is None and isinstance(error, PrunePointsError):  # the caller's points: it names their flag
            raise PrunePointsError(f"backbone {backbone_path}: {error}") from None
        where = "" if checkpoint is None else f"checkpoint {checkpoint}, "
        raise PolicyCheckpointError(f"{where}backbone {backbone_path}: {error}") from None


def greedy_similarity_gflops(staged: StagedViT, budget: float, reduction: str) -> float:
    """GFLOPs per image of greedy similarity removing ``budget`` at ``staged``'s pruning points: the cost ToMe's
    merges match by default and a cascade's share of images run twice is calibrated to, so that each is compared
    with the exact-budget rows at the cost of one of them."""
    return exact_budget_gflops(ViTSpec.from_model(staged.vit), staged.prune_points, budget, reduction,
                               "similarity").total


def checked_backbone(problem: PruningProblem, policies: Mapping[str | os.PathLike, tuple[Modules, CheckpointInfo]],
                     backbone: str | os.PathLike | None = None) -> tuple[StagedViT, dict[str, Any], Path]:
    """:func:`policy_backbone` for the checkpoints ``policies`` (modules and info by path, the first the one that
    ``problem`` comes from; none for the heuristics alone), with each checkpoint's modules checked against it
    (``check_policies``) and a warning for each checkpoint whose agents learned on other weights than these
    (``CheckpointInfo.warn_if_backbone_changed``), whether ``backbone`` names another or the recorded one was
    trained further. ``PrunedViT.from_checkpoint`` and evaluate.py both load policies' backbone through it, so
    that they refuse and warn alike."""
    staged, config, backbone_path = policy_backbone(problem, next(iter(policies), None), backbone)
    for path, (modules, info) in policies.items():
        check_policies(modules, staged.num_patches, path)
        info.warn_if_backbone_changed(path, backbone_path)
    return staged, config, backbone_path


def _opened(path: str | os.PathLike) -> Image.Image:
    """The image file ``path``, read, or a ``UsageError`` naming it; so is an image of more pixels than PIL opens
    (``Image.MAX_IMAGE_PIXELS`` twice over), whose ``DecompressionBombError`` is no ``OSError``."""
    try:
        with Image.open(Path(path).expanduser()) as image:
            image.load()
            return image
    except (OSError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path}: {error}") from None


UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}
"""PIL modes whose levels have no known scale: ``convert("RGB")`` clips them to [0, 255], so an image in [0, 1]
(``Image.fromarray`` of a float array) turns black, one in [0, 65535] white."""


def eight_bit(image: Image.Image, name: object) -> Image.Image:
    """``image`` unless its mode is one of :data:`UNSCALED_MODES`, which is a ``UsageError`` naming it (``name``)
    and how to make it 8-bit: the model would answer for a black or white image without a word."""
    if image.mode not in UNSCALED_MODES:
        return image
    low, high = image.getextrema()
    raise UsageError(f"image {name} is {UNSCALED_MODES[image.mode]} (PIL mode {image.mode}, values in "
                     f"[{low:g}, {high:g}]), whose scale is unknown: make it 8-bit first, e.g. "
                     "Image.fromarray((np.asarray(image) * 255).round().astype(np.uint8)) for values in [0, 1], "
                     "image.convert('L') for values in [0, 255]")


def _loaded(image: Image.Image, position: int) -> Image.Image:
    """``image`` (the ``position``-th of a list) with its pixels read, or a ``UsageError`` saying why not. PIL reads
    a file's pixels when first used: one opened in a ``with`` block that has ended fails on a bare
    ``AssertionError``, and a truncated file on an ``OSError``."""
    try:
        image.load()
    except AssertionError:
        raise UsageError(f"cannot read image {position} of the list: its file was closed before its pixels were read "
                         f"(read it while its file is open: image.load() inside the with block of Image.open; or "
                         f"pass the file's path)") from None
    except OSError as error:
        raise UsageError(f"cannot read image {position} of the list: {error}") from None
    return image


def check_image_batch(images: object, size: Sequence[int]) -> None:
    """A ``UsageError`` unless ``images`` is a torch tensor ``[B, 3, H, W]`` at ``size`` ``(H, W)``: what a user
    holds instead (a numpy array, one image, channels last, another size) would fail deep inside the model."""
    if isinstance(images, list | tuple) and images and all(isinstance(image, torch.Tensor) for image in images):
        raise UsageError(f"images must be a torch tensor [B, 3, H, W], got a {type(images).__name__} of "
                         f"{len(images)} tensors (torch.stack(images) makes images [3, H, W] a batch)")
    if not isinstance(images, torch.Tensor):
        raise UsageError(f"images must be a torch tensor [B, 3, H, W], got {type(images).__name__} "
                         "(model.preprocess([...]) reads PIL images and files; torch.from_numpy(array) converts a "
                         "numpy array)")
    expected = (3, *size)
    if images.dim() == 4 and tuple(images.shape[1:]) == expected:
        return
    shape = tuple(images.shape)
    hint = ("; channels last? images.permute(0, 3, 1, 2) puts them first" if images.dim() == 4 and shape[-1] == 3
            else "; one image? images.unsqueeze(0) makes it a batch" if images.dim() == 3
            else "; grey or with alpha? model.preprocess([...]) makes PIL images RGB" if images.dim() == 4
            and shape[1] in (1, 2, 4)
            else f"; model.preprocess([...]) fits PIL images to the backbone's input size, {size[0]}x{size[1]}"
            if images.dim() == 4 and shape[1] == 3 else "")
    raise UsageError(f"images must be [B, {', '.join(map(str, expected))}], got {list(shape)}{hint}")


def check_pixel_range(images: torch.Tensor) -> None:
    """A ``UsageError`` unless ``images`` are uint8 or floating point in [0, 1]: another integer type's scale is
    unknown, and images already normalised (in [-1, 1], say), negative or NaN would be normalised again and give
    wrong answers without a word. Costs one read of the extremes (a device sync), once per batch."""
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise UsageError(f"images must be uint8 in [0, 255] or floating point in [0, 1], got {images.dtype} "
                         "(images.to(torch.uint8) converts integers in [0, 255])")
    if not images.numel():
        return
    low, high = (float(value) for value in torch.aminmax(images.detach()))
    if not (-1e-3 <= low and high <= 1.0 + 1e-3):  # NaN fails both
        raise UsageError(f"floating-point images must be in [0, 1], got values in [{low:.4g}, {high:.4g}] (pass "
                         "uint8 images in [0, 255]; images already normalised go to the model itself)")


def check_gflops(value: object, name: str) -> float:
    """``value`` as a float if it is a cost in GFLOPs, a finite positive number; else a ``UsageError`` (a NaN cost
    would run ToMe unpruned, or every image of a cascade twice, without a word)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{name} must be a positive number of GFLOPs, got {value!r}")
    return float(value)


class InferenceModel(nn.Module):
    """A model that stays in eval mode: its forward takes no gradients, and dropout and stochastic depth would
    change its answers from call to call. ``model.train()`` (a training loop's habit) warns and changes nothing.
    Subclasses hold their backbone's ``backbone_config``."""

    backbone_config: dict[str, Any]

    def preprocess(self, images: Sequence[Image.Image | str | os.PathLike]) -> torch.Tensor:
        """One's own images (PIL images or image files, of any size and mode) as the data sets decode theirs for
        the backbone (``envs.vit.data.fit_image``: RGB, upright by its EXIF tag, the short side resized to the input
        size, centre-cropped): uint8 ``[B, 3, S, S]`` on the CPU, for :meth:`normalize`. Resizing to S x S instead
        would distort them. 32-bit grey images (PIL modes I and F, :func:`eight_bit`) are refused: their scale is
        unknown."""
        if isinstance(images, Image.Image | str | os.PathLike):
            raise UsageError("preprocess takes a list of images (or files): model.preprocess([image])")
        images = list(images)
        if not images:
            raise UsageError("preprocess takes one image or more, got none")
        for image in images:
            if not isinstance(image, Image.Image | str | os.PathLike):
                raise UsageError(f"preprocess reads PIL images or image files, got {type(image).__name__} (a batch "
                                 f"tensor [B, 3, H, W] at the input size goes to model.normalize)")
        size = self.backbone_config["input_size"]
        return torch.stack([fit_image(eight_bit(_loaded(image, position), f"{position} of the list")
                                      if isinstance(image, Image.Image) else eight_bit(_opened(image), image), size)
                            for position, image in enumerate(images)])

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class of each logit, in order, as the backbone recorded them (None where it names none): an
        ImageFolder's classes are numbered in timm's order, a natural sort of the folder names ignoring case
        (``class2`` before ``class10``), which is not torchvision ``ImageFolder``'s."""
        names = self.backbone_config.get("class_names")
        return tuple(names) if names else None

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            warnings.warn(f"{type(self).__name__} is an inference model: it stays in eval mode (dropout and "
                          f"stochastic depth off)", stacklevel=2)
        return super().train(False)


class PrunedViT(InferenceModel):
    """A ViT whose patch tokens are pruned at the pruning points of ``staged`` (docs/DESIGN.md).

    Args:
        staged: the backbone split into stages at its pruning points.
        backbone_config: the backbone checkpoint's ``config.json`` (``envs.vit.backbone_checkpoint``): its
            ``mean`` and ``std`` are how :meth:`normalize` prepares images.
        selection: what chooses the surviving tokens: ``None``, the unpruned model; a name of
            :data:`SELECTIONS`; or the policy modules by policy name (``attention``, ``similarity``; one
            alone is that agent's ablation).
        budget: ``target_ratio``, the fraction of live patch tokens removed at each pruning point; required
            by every selection but ``None``, which takes none.
        reduction: what removed tokens become: ``merge`` (into the most similar kept token) or ``drop``. ToMe
            always merges, by its own matching: for it, ``reduction`` sets only the cost its merges match by default.
        seed: seed of the ``random`` heuristic, so that a new model repeats its choices.
        protected_share: with both policy modules, the share of each pruning point's kept tokens the attention
            agent chooses (``policies.decisions``; a checkpoint's own comes with :meth:`from_checkpoint`).
        tome_gflops: the cost ToMe's merges per block match; default: greedy similarity's at ``budget``.
    """

    def __init__(self, staged: StagedViT, backbone_config: Mapping[str, Any],
                 selection: str | Mapping[str, TokenScoring] | None = None, budget: float | None = None,
                 reduction: str = "merge", *, seed: int = 0,
                 protected_share: float = DEFAULT_PROTECTED_SHARE, tome_gflops: float | None = None) -> None:
        super().__init__()
        is_policy = isinstance(selection, Mapping)
        if is_policy and not (selection and set(selection) <= set(POLICIES)):
            raise UsageError(f"policy modules must be named from {POLICIES}, got {sorted(selection)}")
        if not is_policy and selection is not None and selection not in SELECTIONS:
            raise UsageError(f"unknown selection {selection!r}; choose from {SELECTIONS} or pass policy modules")
        if reduction not in REDUCTIONS:
            raise UsageError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if selection is None and budget is not None:
            raise UsageError("the unpruned model takes no budget")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            # else torch's error at the first forward of the random heuristic, and of no other selection
            raise UsageError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
        if tome_gflops is not None and selection != "tome":
            raise UsageError("tome_gflops sets ToMe's cost; the other selections' follows from the budget")
        self.staged = staged
        self.backbone_config = dict(backbone_config)
        self.selection = None if selection is None else "policy" if is_policy else selection
        self.policies = nn.ModuleDict(selection if is_policy else {})
        self.budget = None if selection is None else check_target_ratio(budget, "budget")
        self.reduction = reduction
        self.seed = int(seed)
        self.protected_share = check_protected_share(protected_share)
        self._generator: torch.Generator | None = None  # the random heuristic's, made on the images' device
        self.tome_merges = self._tome_merges(tome_gflops) if selection == "tome" else None
        self.eval()  # dropout and stochastic depth off: this is an inference model

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, budget: float | None = None,
                        backbone: str | os.PathLike | None = None, reduction: str | None = None) -> PrunedViT:
        """The policies of a training checkpoint on their backbone, at their target ratio.

        Reads the checkpoint's export when it has one (no pickle is opened), else RLlib's files, with a warning.

        Args:
            path: a checkpoint directory written by train.py (e.g. ``reference/marl_policy``).
            budget: another target ratio than the one the policies were trained at (their observations
                include it, so they adapt their scores).
            backbone: another backbone checkpoint directory with the same patch grid (a warning where its weights
                are not those the agents learned on); default: the policy's.
            reduction: ``merge`` or ``drop``; default: the policy's.
        """
        modules, info = load_policies(path)
        problem = info.problem
        staged, config, _ = checked_backbone(problem, {path: (modules, info)}, backbone)
        return cls(staged, config, modules, problem.target_ratio if budget is None else budget,
                   reduction or problem.reduction, protected_share=problem.protected_share)

    @classmethod
    def from_heuristic(cls, backbone: str | os.PathLike, name: str, budget: float, *,
                       prune_points: Sequence[int] = DEFAULT_PRUNE_POINTS, reduction: str = "merge",
                       tome_gflops: float | None = None, seed: int = 0) -> PrunedViT:
        """A backbone checkpoint directory (backbone.py's) pruned by a heuristic at ``budget``, or by ToMe
        merging in every block (:data:`SELECTIONS`) at ``tome_gflops``, by default the GFLOPs greedy similarity
        has at ``budget``. evaluate.py's ToMe row takes the cost of the dearest row at its budget: a policy's
        ``gflops().total`` where one is evaluated. ``seed``: the ``random`` heuristic's (evaluate.py's --seed)."""
        vit, config = load_backbone(backbone)
        return cls(StagedViT(vit, prune_points), config, name, budget, reduction, seed=seed, tome_gflops=tome_gflops)

    @property
    def device(self) -> torch.device:
        """Where the weights are (``.to(device)`` moves the backbone and the policies alike)."""
        return next(self.staged.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating-point type (``.to(torch.bfloat16)`` changes it), which :meth:`normalize` returns
        and :meth:`forward` takes outside ``torch.autocast``."""
        return next(self.staged.parameters()).dtype

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images as :meth:`forward` expects them, by the backbone's mean and std.

        ``images``: ``[B, 3, H, W]`` at the backbone's ``input_size``, uint8 in [0, 255] (as
        ``envs.vit.data.load_split`` decodes them) or floating point in [0, 1]; anything else is a
        ``UsageError`` saying what was passed. Returned in the weights' :attr:`dtype`.
        """
        check_image_batch(images, self.staged.vit.patch_embed.img_size)
        check_pixel_range(images)
        return normalize(images if images.dtype == torch.uint8 else images * 255.0, self.backbone_config).to(self.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of normalised images ``[B, 3, H, W]`` (:meth:`normalize`), without
        gradients (choosing tokens is not differentiable).

        Where the images are, nothing is read back to the host, and an exact budget's shapes follow from the
        batch size alone: ``torch.compile`` (``model.compile()``) makes each selection but ``random`` one graph
        (the random heuristic's generator breaks it at each pruning point), and on a GPU its
        ``mode="reduce-overhead"`` replays it as a CUDA graph. ``no_grad`` rather than ``inference_mode``: a
        forward that enters ``inference_mode`` fails to compile (torch 2.14) once it has run eagerly.
        """
        check_image_batch(images, self.staged.vit.patch_embed.img_size)
        if not images.is_floating_point():
            raise UsageError(f"the model takes normalised images, got {images.dtype}: model(model.normalize(images))")
        if images.dtype != self.dtype and not torch.is_autocast_enabled(images.device.type):
            raise UsageError(f"the images are {images.dtype}, the model's weights {self.dtype}: pass "
                             f"images.to({self.dtype}) (model.normalize returns them so), or run under torch.autocast")
        staged = self.staged
        if self.selection is None:
            return staged.vit(images)
        if self.selection == "tome":
            return tome_forward(staged, images, self.tome_merges)
        if self.selection == "policy":
            select = policy_selector(self.policies, staged, self.budget, self.protected_share)
        else:
            select = heuristic_selector(self.selection, self._random_generator(images.device)
                                        if self.selection == "random" else None)
        # The selectors keep exactly the budget by construction: checking it would wait for the device.
        return exact_forward(staged, images, select, self.budget, self.reduction,
                             attention_score=self._scores() in ("attention", "agents"), check_counts=False)

    def forward_with_kept(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s logits (through a compiled forward if the model was compiled) and ``kept [B,
        num_stages]`` long, the patch tokens each image has alive in each stage (the first stage has all of
        them): :meth:`schedule`, the same for every image. ``kept`` is on the CPU wherever the images are: the
        counts are known on the host, and a copy to a GPU would wait for it.
        """
        return self(images), self._scheduled_kept(len(images))

    def _scheduled_kept(self, batch: int) -> torch.Tensor:
        """``kept [batch, num_stages]`` on the CPU of a selection that keeps :meth:`schedule` on every image."""
        return torch.tensor(self.schedule(), device="cpu").expand(batch, -1)

    def _random_generator(self, device: torch.device) -> torch.Generator:
        """The random heuristic's generator, seeded when first used on ``device``; later batches continue it."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return self._generator

    def schedule(self) -> list[int]:
        """Patch tokens alive in each stage, the same for every image."""
        staged = self.staged
        if self.selection is None:
            return [staged.num_patches] * staged.num_stages
        if self.selection == "tome":
            return [staged.num_patches - sum(self.tome_merges[:start]) for start in (0, *staged.prune_points)]
        return exact_budget_schedule(staged.num_patches, len(staged.prune_points), self.budget)

    def gflops(self, kept_per_stage: Sequence[int] | None = None) -> ImageGflops:
        """GFLOPs (GMACs) of one image (``envs.vit.flops``): backbone, token scores and policy networks.

        ``kept_per_stage``: the image's ``num_stages`` patch-token counts (a row of
        :meth:`forward_with_kept`'s ``kept``); default: :meth:`schedule`. ToMe and the unpruned model cost
        the same for every image.
        """
        spec = ViTSpec.from_model(self.staged.vit)
        if self.selection is None:
            return ImageGflops(unpruned_gflops(spec), 0.0, 0.0)
        if self.selection == "tome":
            return tome_gflops(spec, self.tome_merges)
        kept = self.schedule() if kept_per_stage is None else list(kept_per_stage)
        if len(kept) != self.staged.num_stages:  # else a ValueError from envs.vit.flops, as if a bug
            raise UsageError(f"kept_per_stage must hold {self.staged.num_stages} patch-token counts, one per stage "
                             f"of pruning points {self.staged.prune_points}, got {len(kept)} (a row of this model's "
                             f"forward_with_kept kept; a cascade's goes to its own mean_gflops)")
        macs = sum(module.macs_per_token() for module in self.policies.values())
        return image_gflops(spec, self.staged.prune_points, kept, self.reduction, self._scores(), macs)

    def _scores(self) -> TokenScores:
        """What the selection computes to rank tokens: what is counted is what :meth:`forward_with_kept`
        computes."""
        return "agents" if self.selection == "policy" else HEURISTIC_RULES[self.selection].scores

    def mean_gflops(self, kept: torch.Tensor) -> ImageGflops:
        """The mean of :meth:`gflops` over images with the token counts ``kept [B, num_stages]``, B >= 1."""
        if kept.dim() != 2:
            raise UsageError(f"kept must be [B, {self.staged.num_stages}] (forward_with_kept's), got "
                             f"{list(kept.shape)}")
        if not len(kept):
            raise UsageError("mean_gflops needs the token counts of one image or more; kept holds none")
        schedules, counts = torch.unique(kept, dim=0, return_counts=True)
        parts = sum(torch.tensor(self.gflops(schedule), dtype=torch.float64) * count
                    for schedule, count in zip(schedules.tolist(), counts.tolist(), strict=True)) / len(kept)
        return ImageGflops(*parts.tolist())

    def _tome_merges(self, target: float | None) -> list[int]:
        """ToMe's merges per block at the GFLOPs ``target``, by default greedy similarity's at this budget, so
        ToMe is compared at the cost of the other methods."""
        if target is None:
            target = greedy_similarity_gflops(self.staged, self.budget, self.reduction)
        return tome_schedule(ViTSpec.from_model(self.staged.vit), check_gflops(target, "tome_gflops"))

    def extra_repr(self) -> str:
        return (f"selection={self.selection or 'none'}, budget={self.budget}, reduction={self.reduction}, "
                f"prune_points={self.staged.prune_points}")
