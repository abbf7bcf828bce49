"""Per-image results of finished episodes, logged through RLlib's MetricsLogger.

They appear in the training results under ``env_runners``: agreement with the unpruned model, top-1
correctness, kept-token ratio after the last pruning point, and GFLOPs (backbone + features) per image.
(Validation, in the exact-budget mode evaluation reports, is ``training.trial.validate_on_server``.)
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

from envs.pruning_env import image_of_agent

WINDOW = 1000  # images


class PruningMetrics(RLlibCallback):
    """Averages the env's final per-image infos over the last ``WINDOW`` images."""

    @override(RLlibCallback)
    def on_episode_end(self, *, episode: MultiAgentEpisode, metrics_logger: MetricsLogger, **kwargs: object) -> None:
        counted = set()
        for agent_id, info in episode.get_infos(-1).items():
            image = image_of_agent(agent_id)
            if "agree" not in info or image in counted:  # both agents of an image carry the same info
                continue
            counted.add(image)
            values = {"agree": float(info["agree"]), "correct": float(info["correct"]),
                      "keep_ratio": info["keep_ratio"],
                      "gflops": info["gflops_backbone"] + info["gflops_features"]}
            for key, value in values.items():
                metrics_logger.log_value(key, value, reduce="mean", window=WINDOW)
