"""TokenPolicyModule and MultiBernoulli: shapes, dead-token masking, exact distribution maths,
permutation equivariance, the analytic policy GFLOPs, and one short PPO run on a dummy two-agent env
(train, save, reload one module from the checkpoint).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.env.multi_agent_env import MultiAgentEnv
from torch.utils.flop_counter import FlopCounterMode

from policies.distribution import MultiBernoulli
from policies.rl_module import DEAD_LOGIT, TokenPolicyModule

N, NUM_FEATURES, HIDDEN = 16, 7, 32
LIVE_COUNTS = [16, 9, 3, 1]


def spaces(n: int, f: int) -> tuple[gym.spaces.Dict, gym.spaces.MultiBinary]:
    obs = gym.spaces.Dict({"tokens": gym.spaces.Box(-np.inf, np.inf, (n, f), np.float32),
                           "live": gym.spaces.Box(0.0, 1.0, (n,), np.float32)})
    return obs, gym.spaces.MultiBinary(n)


def build(n: int = N, f: int = NUM_FEATURES, **model_config) -> TokenPolicyModule:
    obs_space, act_space = spaces(n, f)
    spec = RLModuleSpec(module_class=TokenPolicyModule, observation_space=obs_space, action_space=act_space,
                        model_config={"hidden": HIDDEN, **model_config})
    return spec.build()


def make_obs(live_counts: list[int], n: int = N, f: int = NUM_FEATURES, seed: int = 0) -> dict:
    """Live tokens packed first, zero features on dead rows (the env's layout)."""
    gen = torch.Generator().manual_seed(seed)
    live = (torch.arange(n)[None, :] < torch.tensor(live_counts)[:, None]).float()
    tokens = torch.randn(len(live_counts), n, f, generator=gen) * live[..., None]
    return {"tokens": tokens, "live": live}


@pytest.fixture(scope="module")
def module() -> TokenPolicyModule:
    torch.manual_seed(0)
    return build()


def test_forward_shapes_and_value(module):
    batch = {Columns.OBS: make_obs(LIVE_COUNTS)}
    for out in (module.forward_exploration(batch), module.forward_inference(batch)):
        assert out[Columns.ACTION_DIST_INPUTS].shape == (len(LIVE_COUNTS), N)
    train = module.forward_train(batch)
    assert train[Columns.ACTION_DIST_INPUTS].shape == (len(LIVE_COUNTS), N)
    assert train[Columns.EMBEDDINGS].shape == (len(LIVE_COUNTS), HIDDEN)
    values = module.compute_values(batch)
    assert values.shape == (len(LIVE_COUNTS),)
    assert torch.allclose(values, module.compute_values(batch, embeddings=train[Columns.EMBEDDINGS]))
    for get in (module.get_inference_action_dist_cls, module.get_exploration_action_dist_cls,
                module.get_train_action_dist_cls):
        assert get() is MultiBernoulli


def test_dead_tokens_are_masked_and_never_sampled(module):
    obs = make_obs(LIVE_COUNTS)
    logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    dead = obs["live"] == 0
    assert torch.all(logits[dead] == DEAD_LOGIT) and torch.all(logits[~dead] > DEAD_LOGIT)
    dist = MultiBernoulli.from_logits(logits)
    samples = dist.sample(sample_shape=(2000,))
    assert samples.shape == (2000, len(LIVE_COUNTS), N)
    assert not samples[:, dead].any() and samples[:, ~dead].any()
    assert not dist.to_deterministic().sample()[dead].any()
    # All-dead rows contribute ~nothing to entropy or log-probability.
    all_dead = MultiBernoulli.from_logits(torch.full((1, N), DEAD_LOGIT))
    assert all_dead.entropy().item() < 1e-6 and abs(all_dead.logp(torch.zeros(1, N)).item()) < 1e-6


def test_init_logit_bias_sets_initial_keep_probability():
    torch.manual_seed(0)
    obs = make_obs(LIVE_COUNTS)
    logits = build(init_logit_bias=2.0).forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    live = logits[obs["live"] > 0]
    assert torch.allclose(live, torch.full_like(live, 2.0), atol=0.1)


def test_distribution_matches_hand_computed_bernoulli():
    gen = torch.Generator().manual_seed(1)
    p_logits, q_logits = torch.randn(5, N, generator=gen) * 3, torch.randn(5, N, generator=gen) * 3
    actions = torch.randint(0, 2, (5, N), generator=gen)
    p, q = torch.sigmoid(p_logits), torch.sigmoid(q_logits)
    dist, other = MultiBernoulli.from_logits(p_logits), MultiBernoulli.from_logits(q_logits)

    expected_logp = (actions * F.logsigmoid(p_logits) + (1 - actions) * F.logsigmoid(-p_logits)).sum(-1)
    for value in (actions, actions.float(), actions.to(torch.int8), actions.bool()):
        assert torch.allclose(dist.logp(value), expected_logp, atol=1e-5)
    expected_entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum(-1)
    assert torch.allclose(dist.entropy(), expected_entropy, atol=1e-5)
    expected_kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
    assert torch.allclose(dist.kl(other), expected_kl, atol=1e-4)

    assert torch.equal(dist.to_deterministic().sample(), (p_logits > 0).float())
    assert MultiBernoulli.required_input_dim(gym.spaces.MultiBinary(N)) == N


def test_rsample_is_binary_with_gradients():
    logits = torch.zeros(3, N, requires_grad=True)
    sample = MultiBernoulli.from_logits(logits).rsample()
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    sample.sum().backward()
    assert torch.allclose(logits.grad, torch.full_like(logits, 0.25))


def test_permuting_live_tokens_permutes_logits(module):
    obs = make_obs([11])
    perm = torch.cat([torch.randperm(11, generator=torch.Generator().manual_seed(2)), torch.arange(11, N)])
    permuted = {"tokens": obs["tokens"][:, perm], "live": obs["live"][:, perm]}
    logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    logits_perm = module.forward_inference({Columns.OBS: permuted})[Columns.ACTION_DIST_INPUTS]
    assert torch.allclose(logits_perm, logits[:, perm], atol=1e-6)
    values = module.compute_values({Columns.OBS: obs})
    assert torch.allclose(module.compute_values({Columns.OBS: permuted}), values, atol=1e-6)


@pytest.mark.parametrize("num_tokens,num_features,hidden", [(16, 7, 64), (196, 9, 32), (49, 8, 128)])
def test_macs_per_token_matches_flop_counter(num_tokens, num_features, hidden):
    policy = build(num_tokens, num_features, hidden=hidden)
    batch = {Columns.OBS: make_obs([num_tokens], num_tokens, num_features)}
    with FlopCounterMode(display=False) as counter:
        policy.forward_inference(batch)
    measured = counter.get_total_flops() / 2
    assert num_tokens * policy.macs_per_token() == pytest.approx(measured, rel=0.02)


def test_states_naming_the_networks_without_underscore_load(module):
    """reference/marl_policy names them token_net, logit_net, value_head."""
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
    """Both agents see the same tokens; live tokens shrink 8 -> 6 -> 4 over 3 steps; reward is the fraction
    of live tokens whose action equals TARGET."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.agents = self.possible_agents = ["attention", "similarity"]
        obs_space, act_space = spaces(ENV_N, ENV_F)
        self.observation_spaces = dict.fromkeys(self.agents, obs_space)
        self.action_spaces = dict.fromkeys(self.agents, act_space)
        self.rng = np.random.default_rng((config or {}).get("seed", 0))

    def _obs(self) -> dict:
        live = (np.arange(ENV_N) < self.n_live).astype(np.float32)
        tokens = (self.rng.normal(size=(ENV_N, ENV_F)) * live[:, None]).astype(np.float32)
        return {agent: {"tokens": tokens, "live": live} for agent in self.agents}

    def reset(self, *, seed=None, options=None):
        self.n_live = ENV_N
        return self._obs(), {}

    def step(self, action_dict):
        live = np.arange(ENV_N) < self.n_live
        rewards = {a: float((np.asarray(act)[live] == TARGET[live]).mean()) for a, act in action_dict.items()}
        self.n_live -= 2
        done = self.n_live <= ENV_N - 6
        return self._obs(), rewards, {"__all__": done}, {"__all__": False}, {}


def test_ppo_trains_both_modules_and_checkpoint_reloads(tmp_path):
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig

    obs_space, act_space = spaces(ENV_N, ENV_F)
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
        .training(train_batch_size_per_learner=60, minibatch_size=30, num_epochs=2, lr=1e-3)
        .debugging(seed=0)
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    algo = config.build_algo()
    try:
        for _ in range(2):
            result = algo.train()
        assert {"attention", "similarity"} <= set(result["learners"])
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
