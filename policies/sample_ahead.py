"""SampleAheadPPO: RLlib's PPO, whose env runners sample the next train batch while the learner updates.

RLlib's PPO alternates: the env runners (and the ViT servers they call) sample a batch, then wait while the
learner updates on it, and the learner waits while they sample. On a small machine each phase leaves most of
the cores idle. Here the sampling of batch ``k + 1`` is requested before the update on batch ``k`` starts, so
batch ``k + 1`` is drawn by the policy of one update earlier. PPO stays correct: its probability ratio is
taken against the log-probabilities stored with each step, those of the policy that drew it, and its clip
bounds how far the update moves from them; the advantages use the learner's current value function. The
weights of update ``k`` reach each env runner after the sampling in flight (Ray runs one caller's calls on an
actor in order), so every batch is exactly one update behind.

Without remote env runners (``--num-workers 0``) nothing can sample during the update: that is RLlib's PPO.
"""

from __future__ import annotations

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_AGENT_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

SAMPLE_TAG = "sample_ahead"


def _sample_with_metrics(env_runner):
    """What each env runner returns for a request: its episodes and its metrics since the last request."""
    return env_runner.sample(), env_runner.get_metrics()


class SampleAheadPPO(PPO):
    """PPO whose sampling of the next batch overlaps the learner's update (module docstring)."""

    @override(PPO)
    def setup(self, config: AlgorithmConfig) -> None:
        super().setup(config)
        self._sampling_ahead = False  # whether the env runners have a request for the next batch

    @override(PPO)
    def training_step(self) -> None:
        if self.env_runner_group.num_remote_env_runners() == 0:
            return super().training_step()
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, env_runner_results = self._collect_train_batch()
            if not episodes:
                return
            self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)
            self._request_samples()  # the next batch, drawn while the learner updates on this one

        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                        (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0),
                },
                num_epochs=self.config.num_epochs,
                minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):  # queued behind the sampling in flight
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group,
                                               policies=set(learner_results[0]) - {ALL_MODULES},
                                               inference_only=True)

    def _request_samples(self) -> None:
        self.env_runner_group.foreach_env_runner_async(_sample_with_metrics, tag=SAMPLE_TAG)
        self._sampling_ahead = True

    def _collect_train_batch(self) -> tuple[list, list[dict]]:
        """The episodes and env runner metrics of the requests in flight (made now if there are none: at the
        first iteration), topped up by RLlib's synchronous sampling when they hold fewer agent steps than a
        train batch (an env runner that failed returns nothing; one restarted since had no request)."""
        if not self._sampling_ahead:
            self._request_samples()
        results = self.env_runner_group.fetch_ready_async_reqs(tags=SAMPLE_TAG,
                                                               timeout_seconds=self.config.sample_timeout_s)
        self._sampling_ahead = False
        episodes = [episode for _, (sampled, _) in results for episode in sampled]
        metrics = [runner_metrics for _, (_, runner_metrics) in results]
        agent_steps = sum(int(steps) for m in metrics for steps in m[NUM_AGENT_STEPS_SAMPLED].values())
        missing = self.config.total_train_batch_size - agent_steps
        if missing > 0:
            more, more_metrics = synchronous_parallel_sample(
                worker_set=self.env_runner_group, max_agent_steps=missing,
                sample_timeout_s=self.config.sample_timeout_s, _uses_new_env_runners=True, _return_metrics=True)
            episodes, metrics = episodes + more, metrics + more_metrics
        return episodes, metrics
