"""TokenPolicyModule and ExactCount: shapes, dead-token masking, the distribution's maths against enumeration
of every set, permutation equivariance, the analytic policy GFLOPs, and one short PPO run on a dummy two-agent
env (train, save, reload one module from the checkpoint).
"""

from __future__ import annotations

import itertools
import logging

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.env.multi_agent_env import MultiAgentEnv
from ray.rllib.evaluation.postprocessing import Postprocessing
from torch.utils.flop_counter import FlopCounterMode

from policies.distribution import ExactCount, ExactCountEntropyStatistic
from policies.rl_module import TokenPolicyModule, agent_spaces
from policies.token_scorer import DEAD_SCORE
from training.learner import LossMaskedAdvantages, PruningPPOLearner

N, NUM_FEATURES, HIDDEN = 16, 7, 32
LIVE_COUNTS = [16, 9, 3, 1]


def build(n: int = N, f: int = NUM_FEATURES, **model_config) -> TokenPolicyModule:
    obs_space, act_space = agent_spaces(n, f)
    spec = RLModuleSpec(module_class=TokenPolicyModule, observation_space=obs_space, action_space=act_space,
                        model_config={"hidden": HIDDEN, **model_config})
    return spec.build()


def make_obs(live_counts: list[int], n: int = N, f: int = NUM_FEATURES, seed: int = 0) -> dict:
    """Live tokens packed first, zero features on dead rows (the env's layout); choose half the live tokens."""
    gen = torch.Generator().manual_seed(seed)
    live = (torch.arange(n)[None, :] < torch.tensor(live_counts)[:, None]).float()
    tokens = torch.randn(len(live_counts), n, f, generator=gen) * live[..., None]
    count = torch.tensor([[float(c // 2)] for c in live_counts])
    return {"tokens": tokens, "live": live, "count": count}


@pytest.fixture(scope="module")
def module() -> TokenPolicyModule:
    torch.manual_seed(0)
    return build()


def test_forward_shapes_and_value(module):
    batch = {Columns.OBS: make_obs(LIVE_COUNTS)}
    for out in (module.forward_exploration(batch), module.forward_inference(batch)):
        assert out[Columns.ACTION_DIST_INPUTS].shape == (len(LIVE_COUNTS), N + 1)  # scores, then the count
        assert out[Columns.ACTION_DIST_INPUTS][:, -1].tolist() == [c // 2 for c in LIVE_COUNTS]
    train = module.forward_train(batch)
    assert train[Columns.ACTION_DIST_INPUTS].shape == (len(LIVE_COUNTS), N + 1)
    assert train[Columns.EMBEDDINGS].shape == (len(LIVE_COUNTS), HIDDEN)
    values = module.compute_values(batch)
    assert values.shape == (len(LIVE_COUNTS),)
    assert torch.allclose(values, module.compute_values(batch, embeddings=train[Columns.EMBEDDINGS]))
    for get in (module.get_inference_action_dist_cls, module.get_exploration_action_dist_cls,
                module.get_train_action_dist_cls):
        assert get() is ExactCount


def test_sets_have_exactly_the_count_and_never_a_dead_token(module):
    obs = make_obs(LIVE_COUNTS)
    inputs = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    dead = obs["live"] == 0
    assert torch.all(inputs[:, :-1][dead] == DEAD_SCORE) and torch.all(inputs[:, :-1][~dead] > DEAD_SCORE)
    dist = ExactCount.from_logits(inputs)
    for _ in range(50):
        sample = dist.sample()
        assert sample.sum(-1).tolist() == obs["count"].squeeze(1).tolist() and not sample[dead].any()
    mode = dist.to_deterministic().sample()
    scores = inputs[:, :-1]
    for row, count in enumerate(obs["count"].squeeze(1).long().tolist()):  # the mode: the highest scores
        assert set(mode[row].nonzero().squeeze(1).tolist()) == set(scores[row].topk(count).indices.tolist())


def test_a_uniform_draw_of_exactly_zero_still_gives_a_set_of_the_count(module, monkeypatch):
    # torch.rand returns 0.0 about once in 2^24 draws: its Gumbel noise must not outweigh an impossible share
    obs = make_obs(LIVE_COUNTS)
    dist = ExactCount.from_logits(module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS])
    monkeypatch.setattr(torch, "rand_like", torch.zeros_like)
    sample = dist.sample()
    assert sample.sum(-1).tolist() == obs["count"].squeeze(1).tolist() and not sample[obs["live"] == 0].any()


def enumerate_sets(scores: torch.Tensor, count: int) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Every set of ``count`` live tokens and its probability, by brute force."""
    live = [i for i in range(len(scores)) if scores[i] > DEAD_SCORE]
    sets = list(itertools.combinations(live, count))
    weights = torch.tensor([float(scores[list(chosen)].sum()) for chosen in sets], dtype=torch.float64)
    return sets, (weights - weights.logsumexp(0)).exp()


def test_distribution_matches_enumeration_of_every_set():
    gen = torch.Generator().manual_seed(1)
    scores, other = torch.randn(3, 7, generator=gen, dtype=torch.float64) * 2, torch.randn(3, 7, generator=gen)
    scores[1, 5:] = DEAD_SCORE
    other = other.double().masked_fill(scores == DEAD_SCORE, DEAD_SCORE)
    counts = torch.tensor([[3.0], [2.0], [0.0]], dtype=torch.float64)
    dist = ExactCount.from_logits(torch.cat([scores, counts], 1))
    second = ExactCount.from_logits(torch.cat([other, counts], 1))
    chosen = torch.zeros(3, 7)
    chosen[0, [0, 2, 6]] = 1
    chosen[1, [1, 4]] = 1
    logp = dist.logp(chosen)
    for row in range(3):
        sets, probabilities = enumerate_sets(scores[row], int(counts[row]))
        _, other_probabilities = enumerate_sets(other[row], int(counts[row]))
        index = sets.index(tuple(chosen[row].nonzero().squeeze(1).tolist()))
        assert logp[row].item() == pytest.approx(probabilities[index].log().item(), abs=1e-9)
        entropy = -(probabilities * probabilities.log()).sum()
        assert dist.entropy()[row].item() == pytest.approx(entropy.item(), abs=1e-9)
        kl = (probabilities * (probabilities.log() - other_probabilities.log())).sum()
        assert dist.kl(second)[row].item() == pytest.approx(kl.item(), abs=1e-9)
    # sampling frequencies of the 35 sets of the first row
    sets, probabilities = enumerate_sets(scores[0], 3)
    torch.manual_seed(0)
    draws = ExactCount.from_logits(torch.cat([scores[:1], counts[:1]], 1).expand(20000, -1)).sample()
    frequencies = torch.zeros(len(sets), dtype=torch.float64)
    for draw in draws:
        frequencies[sets.index(tuple(draw.nonzero().squeeze(1).tolist()))] += 1
    assert (frequencies / len(draws) - probabilities).abs().max() < 0.01
    assert ExactCount.required_input_dim(gym.spaces.MultiBinary(N)) == N + 1


def test_entropy_and_log_probability_have_finite_gradients():
    scores = torch.randn(4, N, requires_grad=True)
    with torch.no_grad():
        dead = torch.arange(N)[None, :] >= torch.tensor(LIVE_COUNTS)[:, None]
    masked = scores.masked_fill(dead, DEAD_SCORE)
    counts = torch.tensor([[c // 2] for c in LIVE_COUNTS], dtype=torch.float32)
    dist = ExactCount.from_logits(torch.cat([masked, counts], 1))
    (dist.entropy().sum() + dist.logp(dist.sample()).sum()).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[~dead].abs().sum() > 0


def test_entropy_statistic_has_the_entropy_without_its_gradient():
    scores = torch.randn(4, N, requires_grad=True)
    logits = torch.cat([scores, torch.tensor([[c // 2] for c in LIVE_COUNTS], dtype=torch.float32)], 1)
    statistic = ExactCountEntropyStatistic.from_logits(logits)
    torch.testing.assert_close(statistic.entropy(), ExactCount.from_logits(logits).entropy().detach())
    assert not statistic.entropy().requires_grad and statistic.logp(statistic.sample()).requires_grad
    assert build().get_train_action_dist_cls() is ExactCount
    assert build(entropy_gradient=False).get_train_action_dist_cls() is ExactCountEntropyStatistic


def test_entropy_statistic_reuses_the_normaliser_of_the_log_probability(monkeypatch):
    """PPO's loss takes the log-probability, then the entropy, then differentiates the loss: the statistic reads
    the log-probability's normaliser (one tree per minibatch) and leaves its gradient as it was."""
    scores = torch.randn(4, N, requires_grad=True)
    logits = torch.cat([scores, torch.tensor([[c // 2] for c in LIVE_COUNTS], dtype=torch.float32)], 1)
    chosen = ExactCount.from_logits(logits.detach()).sample()
    (expected,) = torch.autograd.grad(ExactCount.from_logits(logits).logp(chosen).sum(), scores)
    trees = []
    original = ExactCount._log_normaliser
    monkeypatch.setattr(ExactCount, "_log_normaliser", lambda self, s: trees.append(1) or original(self, s))
    statistic = ExactCountEntropyStatistic.from_logits(logits)
    logp = statistic.logp(chosen)
    entropy = statistic.entropy()
    logp.sum().backward()
    assert len(trees) == 1
    torch.testing.assert_close(scores.grad, expected)
    torch.testing.assert_close(entropy, ExactCount.from_logits(logits.detach()).entropy())


def test_permuting_live_tokens_permutes_logits(module):
    obs = make_obs([11])
    perm = torch.cat([torch.randperm(11, generator=torch.Generator().manual_seed(2)), torch.arange(11, N)])
    permuted = {"tokens": obs["tokens"][:, perm], "live": obs["live"][:, perm], "count": obs["count"]}
    logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    logits_perm = module.forward_inference({Columns.OBS: permuted})[Columns.ACTION_DIST_INPUTS]
    assert torch.allclose(logits_perm[:, :N], logits[:, perm], atol=1e-6)
    values = module.compute_values({Columns.OBS: obs})
    assert torch.allclose(module.compute_values({Columns.OBS: permuted}), values, atol=1e-6)


@pytest.mark.parametrize("num_tokens,num_features,hidden", [(16, 7, 64), (196, 9, 32), (49, 8, 128)])
def test_macs_per_token_matches_flop_counter(num_tokens, num_features, hidden):
    """The policy GFLOPs count live tokens only, and so does the module's compute: dead rows cost nothing."""
    policy = build(num_tokens, num_features, hidden=hidden)
    live_counts = [num_tokens, num_tokens // 2, num_tokens // 4]
    batch = {Columns.OBS: make_obs(live_counts, num_tokens, num_features)}
    with FlopCounterMode(display=False) as counter:
        policy.forward_inference(batch)
    measured = counter.get_total_flops() / 2
    assert sum(live_counts) * policy.macs_per_token() == pytest.approx(measured, rel=0.02)


def test_building_a_module_logs_no_rllib_deprecation(caplog):
    """evaluate.py and PrunedViT build modules for users: RLlib's note about its own legacy config is not theirs."""
    with caplog.at_level(logging.WARNING):
        build()
    assert not [record for record in caplog.records if "deprecat" in record.getMessage().lower()]


def test_states_naming_the_networks_without_underscore_load(module):
    """Checkpoints written before the networks were made private name them token_net, logit_net, value_head."""
    public = {key.removeprefix("_"): value for key, value in module.get_state().items()}
    assert "token_net.0.weight" in public
    fresh = build()
    fresh.set_state(public)
    batch = {Columns.OBS: make_obs(LIVE_COUNTS)}
    assert torch.equal(fresh.forward_inference(batch)[Columns.ACTION_DIST_INPUTS],
                       module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS])


ENV_N, ENV_F = 8, 3
TARGET = np.array([1, 0, 1, 1, 0, 0, 1, 0])


class TargetPatternEnv(MultiAgentEnv):
    """Both agents see the same tokens and choose half the live ones; live tokens shrink 8 -> 6 -> 4 over 3
    steps; the reward is the fraction of chosen tokens that TARGET marks."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.agents = self.possible_agents = ["attention", "similarity"]
        obs_space, act_space = agent_spaces(ENV_N, ENV_F)
        self.observation_spaces = dict.fromkeys(self.agents, obs_space)
        self.action_spaces = dict.fromkeys(self.agents, act_space)
        self.rng = np.random.default_rng((config or {}).get("seed", 0))

    def _obs(self) -> dict:
        live = (np.arange(ENV_N) < self.n_live).astype(np.float32)
        tokens = (self.rng.normal(size=(ENV_N, ENV_F)) * live[:, None]).astype(np.float32)
        count = np.array([self.n_live // 2], np.float32)
        return {agent: {"tokens": tokens, "live": live, "count": count} for agent in self.agents}

    def reset(self, *, seed=None, options=None):
        self.n_live = ENV_N
        return self._obs(), {}

    def step(self, action_dict):
        # an empty action (RLlib's env check steps with a random one from the action space) earns nothing
        rewards = {a: float(TARGET[np.asarray(act).astype(bool)].mean()) if np.any(act) else 0.0
                   for a, act in action_dict.items()}
        self.n_live -= 2
        done = self.n_live <= ENV_N - 6
        return self._obs(), rewards, {"__all__": done}, {"__all__": False}, {}


def test_ppo_trains_both_modules_and_checkpoint_reloads(tmp_path):
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig

    obs_space, act_space = agent_spaces(ENV_N, ENV_F)
    module_specs = {pid: RLModuleSpec(module_class=TokenPolicyModule, observation_space=obs_space,
                                      action_space=act_space, model_config={"hidden": 16})
                    for pid in ("attention", "similarity")}
    config = (
        PPOConfig()
        .environment(TargetPatternEnv, env_config={"seed": 0})
        .multi_agent(policies={"attention", "similarity"},
                     policy_mapping_fn=lambda aid, *a, **k: aid.split("_")[0])
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=module_specs))
        .env_runners(num_env_runners=0)
        .training(learner_class=PruningPPOLearner, train_batch_size_per_learner=60, minibatch_size=30, num_epochs=2,
                  lr=1e-3)
        .debugging(seed=0)
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    algo = config.build_algo()
    try:
        initial = algo.learner_group.get_weights(module_ids=["attention", "similarity"])
        for _ in range(2):
            result = algo.train()
        assert {"attention", "similarity"} <= set(result["learners"])
        # the advantages PPO weighs are standardised over the steps its loss counts: RLlib's artificial step at the
        # end of each agent episode (a quarter of the rows here) is left out of their mean and spread
        learner = algo.learner_group._learner
        pieces = [type(piece) for piece in learner._learner_connector.connectors]
        assert pieces[pieces.index(GeneralAdvantageEstimation) + 1] is LossMaskedAdvantages
        episodes = algo.env_runner.sample(num_episodes=4, explore=True)
        batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=episodes, shared_data={},
                                           metrics=learner.metrics)
        for policy in ("attention", "similarity"):
            counted = batch[policy][Columns.LOSS_MASK].bool()
            advantages = batch[policy][Postprocessing.ADVANTAGES][counted]
            assert len(advantages) == 3 * 4 and (~counted).sum() == 4  # 3 real steps and 1 artificial an episode
            assert abs(advantages.mean().item()) < 1e-5 and advantages.std(correction=0).item() == pytest.approx(1)
        trained_weights = algo.learner_group.get_weights(module_ids=["attention", "similarity"])
        for policy in ("attention", "similarity"):  # both modules were updated
            assert any(not np.array_equal(initial[policy][name], value)
                       for name, value in trained_weights[policy].items())
        assert np.isfinite(result["learners"]["attention"]["total_loss"])

        checkpoint = algo.save_to_path(tmp_path / "ckpt")
        restored = RLModule.from_checkpoint(f"{checkpoint}/learner_group/learner/rl_module/attention")
        assert isinstance(restored, TokenPolicyModule)
        learner_weights = algo.learner_group.get_weights(module_ids=["attention"])["attention"]
        for name, value in restored.get_state().items():
            np.testing.assert_array_equal(value, learner_weights[name])
        batch = {Columns.OBS: make_obs([8, 6, 4], ENV_N, ENV_F)}
        trained = algo.get_module("attention").forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
        assert torch.equal(restored.forward_inference(batch)[Columns.ACTION_DIST_INPUTS], trained)
    finally:
        algo.stop()
        ray.shutdown()
