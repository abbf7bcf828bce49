"""Batched pruning episodes over one ViT: the compute behind the env, with no Ray in it.

An *episode* is one image's pass through the :class:`StagedViT`. ``reset`` runs stage 0 and returns the
features at the first pruning point; each ``step`` applies a keep mask, runs the next stage and returns
either the next features or, after the last stage, the classification. Many episodes, at any mix of
stages, go through one call: episodes at the same stage share one padded forward pass.

The :class:`~envs.vit_server.ViTServer` actor wraps one engine for all env runners; tests and
``--num-workers 0`` debugging can also use an engine in-process.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from envs.backbone_checkpoint import normalize
from envs.features import ATTENTION_FEATURES, SIMILARITY_FEATURES, token_features
from envs.flops import ViTSpec, backbone_gflops, feature_gflops, merge_gflops, schedule_tokens
from envs.staged_vit import StagedViT
from envs.token_merge import check_reduction, reduce_tokens
from envs.token_ops import pack_keep_mask, tokens_to_keep


@dataclass(frozen=True)
class EngineSpec:
    """What an env needs to know to build its spaces and its reward, without a copy of the model."""

    num_patches: int
    attention_features: tuple[str, ...]
    similarity_features: tuple[str, ...]
    num_images: int
    target_ratio: float


@dataclass
class _Episode:
    """Per-episode state between calls: the live tokens (prefix first) and where they came from."""

    image: int
    tokens: torch.Tensor  # [P + n, D]
    positions: torch.Tensor  # [n] original patch index of each live patch token
    cls_attention: torch.Tensor  # [n] class attention of each live patch token at this pruning point
    size: torch.Tensor  # [n] original patches each live patch token stands for (envs.token_merge)
    point: int = 0  # index of the pruning point the episode waits at
    kept: list[int] = field(default_factory=list)


class EpisodeLost(KeyError):
    """An episode the engine does not know (finished, evicted, or lost in a server restart)."""


class PruningEngine:
    """Runs pruning episodes in batches. ``max_episodes`` bounds the state kept for unfinished ones.

    ``reduction``: what happens to the tokens the agents remove, ``merge`` or ``drop`` (``envs.token_merge``).
    """

    def __init__(self, staged: StagedViT, backbone_config: dict, images: torch.Tensor, labels: torch.Tensor,
                 target_ratio: float, device: str | torch.device = "cpu", max_episodes: int = 65536,
                 reduction: str = "merge"):
        tokens_to_keep(staged.num_patches, target_ratio)  # validates the ratio
        self.reduction = check_reduction(reduction)
        self.staged = staged.to(device).eval()
        self.config = backbone_config
        self.images, self.labels = images, labels
        self.target_ratio = target_ratio
        self.device = torch.device(device)
        self.max_episodes = max_episodes
        self.episodes: OrderedDict[str, _Episode] = OrderedDict()
        self.vit_spec = ViTSpec.from_model(staged.vit)
        self._full_probs = torch.full((len(labels), backbone_config["num_classes"]), float("nan"))
        self.forwards = 0  # stage forward passes run, for batching statistics
        self.nonfinite_features = 0  # feature values that were NaN/inf and were replaced by 0

    def spec(self) -> EngineSpec:
        return EngineSpec(self.staged.num_patches, ATTENTION_FEATURES, SIMILARITY_FEATURES, len(self.labels),
                          self.target_ratio)

    def _observation(self, x_patch: torch.Tensor, cls_attention: torch.Tensor, live: torch.Tensor,
                     positions: torch.Tensor, point: int) -> list[dict[str, np.ndarray]]:
        """Features at pruning point ``point`` for a padded batch, as one numpy dict per episode."""
        attention, similarity = token_features(
            x_patch, cls_attention, live, positions, self.staged.grid_size, point,
            len(self.staged.prune_points), 1.0 - self.target_ratio)
        bad = (~attention.isfinite()).sum() + (~similarity.isfinite()).sum()
        if bad:  # sanitised and counted, never handed to the policies
            self.nonfinite_features += int(bad)
            attention, similarity = attention.nan_to_num(0, 0, 0), similarity.nan_to_num(0, 0, 0)
        rows = self.staged.num_patches
        counts = live.sum(1).tolist()  # one device-to-host copy per tensor, not per episode
        attention, similarity = attention.cpu().numpy(), similarity.cpu().numpy()
        out = []
        for b, n in enumerate(counts):
            n = int(n)
            obs = {"attention": np.zeros((rows, attention.shape[-1]), np.float32),
                   "similarity": np.zeros((rows, similarity.shape[-1]), np.float32),
                   "live": np.zeros(rows, np.float32)}
            obs["attention"][:n] = attention[b, :n]
            obs["similarity"][:n] = similarity[b, :n]
            obs["live"][:n] = 1.0
            out.append(obs)
        return out

    def _ensure_full_probs(self, indices: list[int]) -> None:
        """The unpruned model's class probabilities, computed once per image (the label-free target)."""
        todo = sorted({i for i in indices if torch.isnan(self._full_probs[i, 0])})
        for start in range(0, len(todo), 256):
            chunk = todo[start:start + 256]
            logits = self.staged(normalize(self.images[chunk].to(self.device), self.config))
            self._full_probs[chunk] = logits.float().softmax(-1).cpu()

    @torch.no_grad()
    def reset(self, keys: list[str], indices: list[int]) -> list[dict[str, np.ndarray]]:
        """Start one episode per key on image ``indices[i]``; returns the first observations."""
        self._ensure_full_probs(indices)
        x = self.staged.embed(normalize(self.images[indices].to(self.device), self.config))
        x, cls_attention = self.staged.forward_stage(x, 0)
        self.forwards += 1
        prefix = self.staged.num_prefix_tokens
        positions = torch.arange(self.staged.num_patches, device=self.device).expand(len(keys), -1)
        live = torch.ones(len(keys), self.staged.num_patches, dtype=torch.bool, device=self.device)
        size = torch.ones(self.staged.num_patches, device=self.device)
        for key, image, tokens, attention in zip(keys, indices, x, cls_attention, strict=True):
            self.episodes.pop(key, None)
            self.episodes[key] = _Episode(int(image), tokens, positions[0], attention, size)
        self._evict()
        return self._observation(x[:, prefix:], cls_attention, live, positions, 0)

    @torch.no_grad()
    def step(self, keys: list[str], keep: list[np.ndarray]) -> list[dict]:
        """Apply one keep mask per episode (over its live tokens, in order) and run the next stage.

        At least one patch token always survives (the one with the highest class attention among those
        the agents dropped), so every image still gets a prediction.
        """
        missing = [key for key in keys if key not in self.episodes]
        if missing:
            raise EpisodeLost(f"unknown episodes {missing[:3]}")
        results: dict[str, dict] = {}
        by_point: dict[int, tuple[list[str], list[np.ndarray]]] = {}
        for key, mask in zip(keys, keep, strict=True):
            group_keys, group_masks = by_point.setdefault(self.episodes[key].point, ([], []))
            group_keys.append(key)
            group_masks.append(mask)
        for point, (group_keys, group_masks) in by_point.items():
            results.update(self._advance(point, group_keys, group_masks))
        return [results[key] for key in keys]

    def _advance(self, point: int, keys: list[str], keep: list[np.ndarray]) -> dict[str, dict]:
        """One padded forward of the stage after ``point`` for episodes waiting there."""
        prefix = self.staged.num_prefix_tokens
        episodes = [self.episodes[key] for key in keys]
        width = max(len(episode.positions) for episode in episodes)
        batch = len(keys)
        x = torch.zeros(batch, prefix + width, episodes[0].tokens.shape[-1], device=self.device,
                        dtype=episodes[0].tokens.dtype)
        live = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        size = torch.ones(batch, width, device=self.device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        chosen = torch.zeros(batch, width, dtype=torch.bool)
        for b, (episode, mask) in enumerate(zip(episodes, keep, strict=True)):
            n = len(episode.positions)
            x[b, :prefix + n] = episode.tokens
            live[b, :n] = True
            size[b, :n] = episode.size
            positions[b, :n] = episode.positions
            chosen[b, :n] = torch.as_tensor(np.asarray(mask[:n], dtype=bool))
            if not chosen[b, :n].any():
                chosen[b, int(episode.cls_attention.argmax())] = True
        index, live_after = pack_keep_mask(chosen.to(self.device), live)
        x, size = reduce_tokens(x, size, live, index, live_after, prefix, self.reduction)
        positions = positions.gather(1, index)
        counts = live_after.sum(1).tolist()
        for episode, n in zip(episodes, counts, strict=True):
            episode.kept.append(int(n))
        merge = self.reduction == "merge"
        x, cls_attention = self.staged.forward_stage(x, point + 1, live_after, size if merge else None)
        self.forwards += 1
        last = point + 1 == len(self.staged.prune_points)
        out: dict[str, dict] = {}
        if last:
            probs = self.staged.classify(x, live_after, size if merge else None).float().softmax(-1).cpu()
            for b, (key, episode) in enumerate(zip(keys, episodes, strict=True)):
                out[key] = self._final(episode, probs[b])
                del self.episodes[key]
            return out
        observations = self._observation(x[:, prefix:], cls_attention, live_after, positions, point + 1)
        for b, (key, episode, n) in enumerate(zip(keys, episodes, counts, strict=True)):
            episode.tokens = x[b, :prefix + n].clone()
            episode.positions = positions[b, :n].clone()
            episode.cls_attention = cls_attention[b, :n].clone()
            episode.size = size[b, :n].clone()
            episode.point = point + 1
            out[key] = {"done": False, "obs": observations[b], "kept": n}
        return out

    def _final(self, episode: _Episode, probs: torch.Tensor) -> dict:
        """What the env needs for the reward and the per-image report."""
        full = self._full_probs[episode.image]
        full_class = int(full.argmax())
        label = int(self.labels[episode.image])
        stage_tokens = [self.staged.num_patches, *episode.kept]
        live_per_point = [self.staged.num_patches, *episode.kept[:-1]]
        backbone = backbone_gflops(self.vit_spec, schedule_tokens(self.vit_spec, self.staged.prune_points,
                                                                  stage_tokens))
        if self.reduction == "merge":
            backbone += merge_gflops(self.vit_spec, live_per_point, episode.kept)
        return {"done": True, "kept": episode.kept[-1], "kept_per_stage": episode.kept,
                "prediction": int(probs.argmax()), "unpruned_prediction": full_class, "label": label,
                "agree": int(probs.argmax()) == full_class, "correct": int(probs.argmax()) == label,
                "prob_unpruned_class": float(probs[full_class]),
                "gflops_backbone": backbone,
                "gflops_features": feature_gflops(self.vit_spec, live_per_point)}

    def release(self, keys: list[str]) -> None:
        """Forget episodes that will not be stepped again (env reset mid-episode, runner gone)."""
        for key in keys:
            self.episodes.pop(key, None)

    def _evict(self) -> None:
        while len(self.episodes) > self.max_episodes:
            self.episodes.popitem(last=False)
