"""Batched pruning episodes over one ViT: the compute behind the env, with no Ray in it.

An *episode* is one image's pass through the :class:`StagedViT`. ``reset`` runs stage 0 and returns the
observations at the first pruning point; each ``step`` applies a keep mask and runs the next stage
(:func:`~envs.vit.pruned_forward.prune_step`, the same step evaluation uses) and returns either the next
observations or, after the last stage, the classification. Many episodes, at any mix of pruning points, go
through one call: episodes waiting at the same point share one padded step.

The :class:`~envs.vit_server.ViTServer` actor wraps one engine for all env runners; an env given an engine
itself (``env_config["server"]``, as the tests do) calls it in-process, without Ray.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from envs.vit.backbone_checkpoint import normalize
from envs.vit.data import StreamedImages
from envs.vit.features import AGENT_FEATURES, observe
from envs.vit.flops import ViTSpec, image_gflops
from envs.vit.pruned_forward import (
    TokenState,
    classify,
    concat_states,
    exact_forward_from,
    initial_state,
    prune_step,
)
from envs.vit.scoring import percent_equal
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import pad_tokens
from policies.decisions import policy_selector
from policies.heuristics import heuristic_selector


@dataclass(frozen=True)
class EngineSpec:
    """What an env needs to know to build its spaces, without a copy of the model."""

    num_patches: int
    num_images: int
    baseline: str  # the heuristic whose outcome final results carry (the reward baseline), or "none"
    num_features: dict[str, int] = field(default_factory=lambda: {k: len(v) for k, v in AGENT_FEATURES.items()})


@dataclass
class _Episode:
    """One image between calls: its removal ratio, its token state (a batch of one, cut to its live tokens) and
    kept counts."""

    image: int
    ratio: float
    state: TokenState
    kept: list[int] = field(default_factory=list)


MAX_UNFINISHED_EPISODES = 65536
"""The unfinished episodes an engine keeps; beyond them the oldest are forgotten (their runners are gone)."""
VALIDATION_BATCH = 256


class EpisodeLost(KeyError):
    """An episode the engine does not know (finished, evicted, or lost in a server restart)."""


class PruningEngine:
    """Runs pruning episodes in batches, keeping the state of at most :data:`MAX_UNFINISHED_EPISODES` unfinished
    ones.

    ``reduction``: what happens to the tokens the agents remove, ``merge`` or ``drop`` (``envs.vit.token_merge``).
    ``baseline``: a heuristic (``policies.heuristics``) whose pruned prediction of each image is reported with
    the agents' (the env's per-image reward baseline), or ``"none"``.
    ``target_ratio``: the removal ratio of validation and of episodes started without one.
    """

    def __init__(self, staged: StagedViT, backbone_config: dict, images: torch.Tensor | StreamedImages,
                 labels: torch.Tensor, target_ratio: float, reduction: str, device: str | torch.device = "cpu",
                 baseline: str = "none") -> None:
        self.staged = staged.to(device).eval()
        self.backbone_config = backbone_config
        self.images, self.labels = images, labels
        self.target_ratio, self.reduction = target_ratio, reduction
        self.device = torch.device(device)
        self.episodes: OrderedDict[str, _Episode] = OrderedDict()
        self.vit_spec = ViTSpec.from_model(staged.vit)
        # What the rewards read of the unpruned model and of the baseline, per image, computed on its first visit:
        # the unpruned class (-1 until then) and, per removal ratio, the baseline's class and its probability of
        # the unpruned class; not whole probability rows, which take 4 KB an image at 1,000 classes.
        self._unpruned_class = torch.full((len(labels),), -1, dtype=torch.long)
        self.baseline = baseline
        self._baseline = None if baseline == "none" else heuristic_selector(baseline)
        self._baseline_answers: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # per removal ratio
        self.forwards = 0  # stage forward passes run, for batching statistics
        self.nonfinite_features = 0  # feature values that were NaN/inf and were replaced by 0

    def spec(self) -> EngineSpec:
        return EngineSpec(self.staged.num_patches, len(self.labels), self.baseline)

    def _observations(self, state: TokenState, ratios: list[float]) -> list[dict[str, np.ndarray]]:
        """Both agents' features under each image's removal ratio and the live mask, zero-padded to ``N`` rows, as
        one numpy dict per image."""
        observation = observe(self.staged, state, torch.tensor(ratios, device=state.live.device))
        self.nonfinite_features += int(observation.nonfinite)
        rows = self.staged.num_patches
        attention, similarity, live = (pad_tokens(t, rows).float().cpu().numpy() for t in
                                       (observation.attention, observation.similarity, state.live))
        return [{"attention": attention[b], "similarity": similarity[b], "live": live[b]} for b in range(len(live))]

    def _ensure_answers(self, indices: list[int], state: TokenState, ratios: list[float]) -> None:
        """The unpruned model's class (the label-free target) and, with a baseline, the baseline heuristic's class
        and probability of that class at the exact budget of removal ratio ``ratios[i]``, of the images
        ``indices[i]`` whose :func:`initial_state` is row ``i`` of ``state``; each computed once per image (and
        ratio)."""
        self._ensure_unpruned(indices, state)
        if self._baseline is None:
            return
        for ratio in set(ratios):
            rows = [row for row, wanted in enumerate(ratios) if wanted == ratio]
            classes, probs = self._baseline_answers.setdefault(
                ratio, (torch.full_like(self._unpruned_class, -1), torch.full((len(self.labels),), float("nan"))))
            todo = [rows[position] for position in self._first_visits(classes, [indices[row] for row in rows])]
            if todo:
                images = [indices[row] for row in todo]
                logits = exact_forward_from(self.staged, state.rows(todo), self._baseline, ratio, self.reduction)
                baseline = logits.float().softmax(-1).cpu()
                classes[images] = baseline.argmax(-1)
                probs[images] = baseline.gather(1, self._unpruned_class[images][:, None])[:, 0]

    def _ensure_unpruned(self, indices: list[int], state: TokenState) -> None:
        """The unpruned model's class of the images ``indices[i]`` whose :func:`initial_state` (which has run the
        first stage already) is row ``i`` of ``state``, for those not yet visited."""
        todo = self._first_visits(self._unpruned_class, indices)
        if todo:
            logits = self.staged.forward_from(state.tokens[todo], 1)
            self._unpruned_class[[indices[row] for row in todo]] = logits.float().softmax(-1).argmax(-1).cpu()

    @staticmethod
    def _first_visits(classes: torch.Tensor, indices: list[int]) -> list[int]:
        """The positions in ``indices`` of the images whose class in the cache ``classes`` is not computed yet
        (-1), one position per image named more than once."""
        return list({index: row for row, index in enumerate(indices) if classes[index] < 0}.values())

    def _inputs(self, indices: list[int]) -> torch.Tensor:
        """Normalised images ``[n, C, H, W]`` on the engine's device (read from the files when streamed)."""
        return normalize(self.images[indices].to(self.device), self.backbone_config)

    @torch.no_grad()
    def reset(self, keys: list[str], indices: list[int], upcoming: list[int] = (),
              ratios: list[float] | None = None) -> list[dict[str, np.ndarray]]:
        """Start one episode per key on image ``indices[i]`` at removal ratio ``ratios[i]`` (default: the
        engine's ``target_ratio``); returns the first observations. An image named more than once (rollouts of
        one image) runs its first stage once. ``upcoming``: images asked for next, read ahead when the split
        streams from its files."""
        ratios = [self.target_ratio] * len(keys) if ratios is None else [float(r) for r in ratios]
        images, row_of = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        inputs = self._inputs(images.tolist())
        if upcoming and hasattr(self.images, "prefetch"):
            self.images.prefetch(upcoming)
        state = initial_state(self.staged, inputs).rows(row_of.tolist())  # one row per episode
        self._ensure_answers(list(indices), state, ratios)
        self.forwards += 1
        for b, (key, image, ratio) in enumerate(zip(keys, indices, ratios, strict=True)):
            self.episodes.pop(key, None)
            self.episodes[key] = _Episode(int(image), ratio, state.rows([b], width=state.live.shape[1]))  # all live
        self._evict()
        return self._observations(state, ratios)

    def lost(self, keys: list[str]) -> EpisodeLost | None:
        """The error for stepping ``keys`` where this engine holds no episode of some (evicted, or started before
        a restart), naming the first; None where it holds them all."""
        missing = [key for key in keys if key not in self.episodes]
        return EpisodeLost(f"unknown episodes {missing[:3]}") if missing else None

    @torch.no_grad()
    def step(self, keys: list[str], keep: list[np.ndarray]) -> list[dict]:
        """Apply one keep mask per episode (over its live tokens, in order) and run the next stage.

        At least one patch token always survives (``envs.vit.pruned_forward.effective_keep``), so every
        image still gets a prediction.
        """
        if (lost := self.lost(keys)) is not None:
            raise lost
        results: dict[str, dict] = {}
        by_point: dict[int, tuple[list[str], list[np.ndarray]]] = {}
        for key, mask in zip(keys, keep, strict=True):
            group_keys, group_masks = by_point.setdefault(self.episodes[key].state.stage, ([], []))
            group_keys.append(key)
            group_masks.append(mask)
        for group_keys, group_masks in by_point.values():
            results.update(self._advance(group_keys, group_masks))
        return [results[key] for key in keys]

    def _advance(self, keys: list[str], masks: list[np.ndarray]) -> dict[str, dict]:
        """One padded step for episodes waiting at the same pruning point."""
        episodes = [self.episodes[key] for key in keys]
        state = concat_states([episode.state for episode in episodes])
        width = state.live.shape[1]
        keep = torch.from_numpy(np.stack([np.asarray(mask[:width], dtype=bool) for mask in masks]))
        state = prune_step(self.staged, state, keep.to(self.device), self.reduction)
        self.forwards += 1
        counts = state.live.sum(dim=1).tolist()
        for episode, n in zip(episodes, counts, strict=True):
            episode.kept.append(int(n))
        if state.stage == len(self.staged.prune_points):
            probs = classify(self.staged, state, self.reduction).float().softmax(-1).cpu()
            out = {key: self._final(episode, row) for key, episode, row in zip(keys, episodes, probs, strict=True)}
            for key in keys:
                del self.episodes[key]
            return out
        observations = self._observations(state, [episode.ratio for episode in episodes])
        out = {}
        for b, (key, episode, n) in enumerate(zip(keys, episodes, counts, strict=True)):
            episode.state = state.rows([b], width=n)  # no read per episode: counts were read once
            out[key] = {"done": False, "obs": observations[b], "kept": n}
        return out

    def _final(self, episode: _Episode, probs: torch.Tensor) -> dict:
        """What the env needs for the reward and the per-image report."""
        full_class = int(self._unpruned_class[episode.image])
        label, prediction = int(self.labels[episode.image]), int(probs.argmax())
        gflops = image_gflops(self.vit_spec, self.staged.prune_points, [self.staged.num_patches, *episode.kept],
                              self.reduction, "agents")
        out = {"done": True, "kept": episode.kept[-1], "kept_per_stage": episode.kept,
                "prediction": prediction, "unpruned_prediction": full_class, "label": label,
                "agree": prediction == full_class, "correct": prediction == label,
                "prob_unpruned_class": float(probs[full_class]),
                "gflops_backbone": gflops.backbone, "gflops_features": gflops.features}
        if self._baseline is not None:
            classes, unpruned_class_probs = self._baseline_answers[episode.ratio]
            out.update(baseline_agree=int(classes[episode.image]) == full_class,
                       baseline_prob_unpruned_class=float(unpruned_class_probs[episode.image]))
        return out

    @torch.no_grad()
    def validate(self, modules: dict, protected_share: float) -> dict[str, float]:
        """How the agents' deterministic policy, which evaluation reports as ``MARL exact``, does on every image
        the engine holds: accuracy and agreement with the unpruned model, in percent."""
        select = policy_selector(modules, self.staged, self.target_ratio, protected_share)
        predictions = []
        for start in range(0, len(self.labels), VALIDATION_BATCH):  # each image read once
            batch = list(range(start, min(start + VALIDATION_BATCH, len(self.labels))))
            state = initial_state(self.staged, self._inputs(batch))
            self._ensure_unpruned(batch, state)
            logits = exact_forward_from(self.staged, state, select, self.target_ratio, self.reduction)
            predictions.append(logits.argmax(1).cpu())
        predictions = torch.cat(predictions)
        return {"exact_accuracy": percent_equal(predictions, self.labels),
                "exact_agreement": percent_equal(predictions, self._unpruned_class)}

    def release(self, keys: list[str]) -> None:
        """Forget episodes that will not be stepped again (env reset mid-episode, runner gone)."""
        for key in keys:
            self.episodes.pop(key, None)

    def _evict(self) -> None:
        while len(self.episodes) > MAX_UNFINISHED_EPISODES:
            self.episodes.popitem(last=False)
