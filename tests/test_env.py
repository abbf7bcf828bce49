"""TokenPruningEnv and PruningEngine, with an in-process engine (no Ray cluster needed)."""

import os
import pathlib
import pickle
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import timm
import torch
from ray.rllib.env.env_context import EnvContext
from ray.rllib.env.env_errors import StepFailedRecreateEnvError
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

from envs import pruning_env
from envs.episode_metrics import PruningMetrics
from envs.problem import ProblemError
from envs.pruning_engine import EpisodeLost, PruningEngine
from envs.pruning_env import TokenPruningEnv, policy_for_agent
from envs.vit.backbone_checkpoint import normalize
from envs.vit.features import AGENT_FEATURES
from envs.vit.pruned_forward import exact_forward
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import tokens_to_keep
from policies.decisions import choosable, survives, take_turns
from policies.heuristics import heuristic_selector
from tests.conftest import TINY_KWARGS
from tests.tiny_policies import first_live


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_KWARGS).eval()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    config = {"num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3}
    return PruningEngine(StagedViT(vit, (1, 2, 3)), config, images, torch.randint(0, 10, (40,)), 0.5, "merge",
                         baseline="distinct")


def one_rollout_problem(engine, **problem) -> dict:
    """PruningProblem fields for an env on the in-process engine: one rollout per image against the engine's
    reward baseline, then ``problem``."""
    return {"rollouts_per_image": 1, "reward_baseline": engine.baseline, **problem}


def make_env(engine, images_per_env: int = 1, **problem) -> TokenPruningEnv:
    """An env on the in-process engine; ``problem``: PruningProblem fields beyond :func:`one_rollout_problem`."""
    return TokenPruningEnv({"server": engine, "problem": one_rollout_problem(engine, images_per_env=images_per_env,
                                                                             **problem)})


def rollout(env, seed, policy=lambda aid, obs: first_live(obs)):
    """An episode of ``env`` reset with ``seed``, each agent choosing ``policy(agent id, observation)`` (by
    default the first tokens it may choose); each step's agents and rewards, and the last infos."""
    obs, _ = env.reset(seed=seed)
    trace, done = [], False
    while not done:
        obs, rewards, terminateds, _, infos = env.step({aid: policy(aid, o) for aid, o in obs.items()})
        trace.append((set(obs), rewards))
        done = terminateds["__all__"]
    return trace, infos


def test_rllib_env_check_passes(engine):
    check_multiagent_environments(make_env(engine, 1))
    check_multiagent_environments(make_env(engine, 3))


def test_agent_ids_spaces_and_turns(engine):
    assert make_env(engine, 1).reset(seed=0)[0]["attention"]["count"][0] == 3  # the default share: 0.1 of 32
    env = make_env(engine, 2, protected_share=0.25)
    assert env.possible_agents == ["attention_0", "similarity_0", "attention_1", "similarity_1"]
    assert {policy_for_agent(a) for a in env.possible_agents} == {"attention", "similarity"}
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"attention_0", "attention_1"}  # the attention agents choose first
    assert obs["attention_1"]["tokens"].shape == (64, engine.spec().num_features["attention"])
    assert obs["attention_1"]["live"].sum() == 64 and obs["attention_1"]["count"][0] == 8  # 8 of the 32 kept
    kept = {aid: first_live(o) for aid, o in obs.items()}
    obs, rewards, terminateds, _, _ = env.step(kept)
    assert set(obs) == {"similarity_0", "similarity_1"} and rewards == {} and not terminateds["__all__"]
    assert obs["similarity_0"]["tokens"].shape == (64, engine.spec().num_features["similarity"])
    assert (obs["similarity_0"]["live"] == 1 - kept["attention_0"]).all()  # it removes among the others
    assert obs["similarity_0"]["count"][0] == 32
    single = make_env(engine, 1, agents="similarity")
    assert single.possible_agents == ["similarity"]


@pytest.mark.parametrize("agents", ["both", "attention", "similarity"])
def test_rllib_episodes_take_every_step_of_every_agent_setting(engine, agents):
    """RLlib's MultiAgentEpisode takes each step of an episode as the env runners add it: an agent that acts and
    observes again at once, as one agent alone does at every pruning point, must get a reward (0 until the
    end), which RLlib refused the single-agent ablations for (``MultiAgentEnvError``) before any iteration."""
    from ray.rllib.env.multi_agent_episode import MultiAgentEpisode

    env = make_env(engine, 2, agents=agents)
    episode = MultiAgentEpisode(agent_module_ids={aid: policy_for_agent(aid) for aid in env.possible_agents})
    obs, infos = env.reset(seed=0)
    episode.add_env_reset(observations=obs, infos=infos)
    done, steps = False, 0
    while not done:
        actions = {aid: first_live(o) for aid, o in obs.items()}
        obs, rewards, terminateds, truncateds, infos = env.step(actions)
        episode.add_env_step(observations=obs, actions=actions, rewards=rewards, infos=infos,
                             terminateds=terminateds, truncateds=truncateds)
        done, steps = terminateds["__all__"], steps + 1
    assert steps == 3 * (2 if agents == "both" else 1)  # one turn per acting agent at each of 3 pruning points
    assert episode.is_done


def test_spaces_pickle_once_per_policy_however_many_images(engine):
    """RLlib pickles the agents' spaces into every checkpoint: their size must not grow with the images."""
    def pickled(env):
        return len(pickle.dumps(gym.spaces.Dict(env.observation_spaces))) + len(pickle.dumps(env.action_spaces))

    few, many = make_env(engine, 2), make_env(engine, 32)
    assert pickled(many) - pickled(few) < 100 * (len(many.possible_agents) - len(few.possible_agents))


@pytest.mark.parametrize("mask", [np.array, torch.tensor])
def test_survivors_are_the_tokens_not_removed_or_the_attention_agents_alone(mask):
    live = mask([True, True, True, True, False])
    kept, removed = mask([True, False, False, False, False]), mask([False, False, True, True, False])
    assert choosable(live, kept).tolist() == [False, True, True, True, False]
    assert choosable(live, None).tolist() == live.tolist()
    assert survives(live, kept, removed).tolist() == [True, True, False, False, False]
    assert survives(live, None, removed).tolist() == [True, True, False, False, False]
    assert survives(live, mask([True, True, False, False, False]), None).tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError):
        survives(live, None, None)


@pytest.mark.parametrize("agents", ["both", "attention", "similarity"])
def test_the_envs_turn_rule_is_the_inference_one(agents):
    """The env applies the turns to numpy masks (choosable, survives), inference to tensors (take_turns): the
    same sets of the same choices."""
    generator = torch.Generator().manual_seed(0)

    def random_rule(tokens, count):  # ``count`` of the allowed tokens, at random
        scores = torch.rand(tokens.shape, generator=generator).masked_fill(~tokens, -1.0)
        return torch.zeros_like(tokens).scatter(1, scores.topk(count, dim=1).indices, True)

    live = torch.ones(6, 20, dtype=torch.bool)
    turns = take_turns(live, 0.4, 0.25, random_rule if agents != "similarity" else None,
                       random_rule if agents != "attention" else None)
    for i in range(len(live)):
        kept = None if turns.kept is None else turns.kept[i].numpy()  # bool, as the env holds the actions
        removed = None if turns.removed is None else turns.removed[i].numpy()
        assert (choosable(live[i].numpy(), kept) == turns.left[i].numpy()).all()
        assert (survives(live[i].numpy(), kept, removed) == turns.survivors[i].numpy()).all()


def test_turns_meet_the_budget_exactly_and_reward_at_the_end(engine):
    trace, infos = rollout(make_env(engine, 2), 0)
    assert len(trace) == 6  # two turns per pruning point
    assert all(rewards == {} for _, rewards in trace[:-1])
    assert all(info["kept_per_stage"] == [32, 16, 8] for info in infos.values()), infos
    assert infos["attention_0"]["keep_ratio"] == 8 / 64
    assert set(trace[-1][1]) == {"attention_0", "similarity_0", "attention_1", "similarity_1"}


@pytest.mark.parametrize("agents", ["both", "similarity"])
def test_training_metrics_count_each_image_once(engine, agents):
    """PruningMetrics logs one value per image and metric from the final infos, whichever agents act."""
    _, infos = rollout(make_env(engine, 3, agents=agents), 0)
    episode = SimpleNamespace(get_infos=lambda index: infos)
    logged = []
    logger = SimpleNamespace(log_value=lambda key, value, **kwargs: logged.append((key, value)))
    PruningMetrics().on_episode_end(episode=episode, metrics_logger=logger)
    images = [infos[f"{'attention' if agents == 'both' else agents}_{i}"] for i in range(3)]
    assert sorted(logged) == sorted(
        (key, value) for info in images for key, value in (
            ("agree", float(info["agree"])), ("correct", float(info["correct"])),
            ("keep_ratio", info["keep_ratio"]), ("gflops", info["gflops_backbone"] + info["gflops_features"])))


def test_reward_baseline_is_the_heuristic_on_the_same_image(engine):
    """With a reward baseline, the final reward is the agents' fidelity minus the heuristic's on the same
    image; the heuristic's is what its own pruned forward of that image gives."""
    trace, infos = rollout(make_env(engine, 2, prob_weight=0.0), 0)
    images = [infos[f"attention_{i}"]["image"] for i in range(2)]
    inputs = normalize(engine.images[images], engine.backbone_config)
    full = engine.staged(inputs).argmax(1)
    heuristic = exact_forward(engine.staged, inputs, heuristic_selector("distinct"), 0.5, "merge")
    for i in range(2):
        expected = float(infos[f"attention_{i}"]["agree"]) - float(heuristic[i].argmax() == full[i])
        assert trace[-1][1][f"attention_{i}"] == trace[-1][1][f"similarity_{i}"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="reward baseline 'distinct'.*'none'"):
        make_env(engine, 1, reward_baseline="none")


def test_rollouts_of_one_image_are_each_others_baseline(engine):
    """With ``rollouts_per_image`` K, an env's images come in runs of K rollouts of one image, each starting
    from the same observation; with the ``rollouts`` baseline a rollout's reward is its fidelity (agreement,
    probability and log-probability terms) minus the mean of the other rollouts' of that image."""
    plain = PruningEngine(engine.staged, engine.backbone_config, engine.images, engine.labels, 0.5, "merge")
    env = make_env(plain, 6, rollouts_per_image=3, reward_baseline="rollouts", logprob_weight=0.5)
    first, _ = env.reset(seed=3)
    assert env._images[0:3] == [env._images[0]] * 3 and env._images[3:6] == [env._images[3]] * 3
    assert all((first[f"attention_{i}"]["tokens"] == first["attention_0"]["tokens"]).all() for i in (1, 2))

    def sampled(aid, obs):  # a random exact-count set: the rollouts of an image differ
        chosen = np.zeros(len(obs["live"]), dtype=np.int8)
        chosen[rng.choice(np.flatnonzero(obs["live"]), int(obs["count"][0]), replace=False)] = 1
        return chosen

    rng = np.random.default_rng(0)
    trace, infos = rollout(env, 3, sampled)
    reached = np.array([float(infos[f"attention_{i}"]["agree"]) + infos[f"attention_{i}"]["prob_unpruned_class"]
                        + 0.5 * np.log(infos[f"attention_{i}"]["prob_unpruned_class"]) for i in range(6)])
    group_means = reached.reshape(2, 3).mean(1).repeat(3)
    expected = reached - (3 * group_means - reached) / 2
    assert [trace[-1][1][f"similarity_{i}"] for i in range(6)] == pytest.approx(expected.tolist())
    assert len(set(reached.round(6))) > 2  # the rollouts reached different outcomes


@torch.no_grad()
def test_each_image_prunes_at_the_ratio_it_draws(engine):
    """With ``train_ratios`` each image draws one of them (its rollouts share it): its agents see ``1 - ratio``
    among their features, choose that ratio's counts, and its reward baseline is the heuristic at that ratio."""
    env = make_env(engine, 8, rollouts_per_image=2, train_ratios=(0.25, 0.75))
    first, _ = env.reset(seed=0)
    ratios = list(env._ratios)
    assert set(ratios) == {0.25, 0.75} and ratios[0::2] == ratios[1::2]
    keep_column = AGENT_FEATURES["attention"].index("keep_fraction")
    for i, ratio in enumerate(ratios):
        obs = first[f"attention_{i}"]
        assert (obs["tokens"][obs["live"] > 0, keep_column] == 1 - ratio).all()
        assert obs["count"][0] == max(1, round(0.1 * tokens_to_keep(64, ratio)))
    trace, infos = rollout(env, 0)
    inputs = normalize(engine.images[env._images], engine.backbone_config)
    full = engine.staged(inputs).argmax(1)
    for i, ratio in enumerate(ratios):
        info = infos[f"attention_{i}"]
        assert info["target_ratio"] == ratio
        kept = [64]
        for _ in range(3):
            kept.append(tokens_to_keep(kept[-1], ratio))
        assert info["kept_per_stage"] == kept[1:]
        heuristic = exact_forward(engine.staged, inputs[i:i + 1], heuristic_selector("distinct"), ratio, "merge")
        baseline = float(heuristic[0].argmax() == full[i]) + float(heuristic[0].softmax(-1)[full[i]])
        expected = float(info["agree"]) + info["prob_unpruned_class"] - baseline
        # the engine's baseline comes from a forward of the env's eight images, this one from one image's: float32
        # probabilities of two batch compositions, equal to rounding (a relative tolerance fails on a difference
        # near 0 on some CPUs)
        assert trace[-1][1][f"attention_{i}"] == pytest.approx(expected, abs=1e-6)


def test_each_agent_alone_makes_every_removal(engine):
    for agents in ("attention", "similarity"):
        trace, infos = rollout(make_env(engine, 1, agents=agents), 0)
        assert len(trace) == 3 and infos[agents]["kept_per_stage"] == [32, 16, 8]


def test_seeded_and_reproducible(engine):
    def scripted(aid, obs):  # a random exact-count set, the same for the same agent and choice
        rng = np.random.default_rng([sum(map(ord, aid)), int(obs["live"].sum())])
        chosen = np.zeros(len(obs["live"]), dtype=np.int8)
        chosen[rng.choice(np.flatnonzero(obs["live"]), int(obs["count"][0]), replace=False)] = 1
        return chosen

    runs = [rollout(make_env(engine, 2), 7, scripted) for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert runs[0][1]["attention_0"]["image"] == runs[1][1]["attention_0"]["image"]


def test_lost_episode_is_discarded_and_a_recreated_env_draws_new_images(engine):
    env = make_env(engine, 4)
    obs, _ = env.reset(seed=0)
    engine.release(env._keys)  # what a server restart does to in-flight episodes
    with pytest.raises(EpisodeLost):
        engine.step(env._keys, [np.ones(64)] * 4)
    obs, *_ = env.step({aid: first_live(o) for aid, o in obs.items()})  # the attention turn
    with pytest.raises(StepFailedRecreateEnvError):  # RLlib discards the episode and recreates the env
        env.step({aid: first_live(o) for aid, o in obs.items()})
    recreated = make_env(engine, 4)
    obs, _ = recreated.reset(seed=0)  # RLlib re-seeds a recreated env with the runner's seed
    assert obs["attention_0"]["live"].sum() == 64
    assert recreated._images != env._images


def test_image_streams_of_runners_and_sub_envs_are_independent(engine, monkeypatch):
    def images(worker: int, sub_env: int) -> list[int]:
        """Sub-env ``sub_env`` of env runner ``worker`` as RLlib's MultiAgentEnvRunner makes and seeds it: one
        EnvContext (vector_index 0) for all its sub-envs, seed ``base + worker + sub_env``."""
        config = EnvContext({"server": engine, "problem": one_rollout_problem(engine, images_per_env=8)},
                            worker_index=worker)
        env = TokenPruningEnv(config)
        env.reset(seed=100 + worker + sub_env)
        return env._images

    assert images(1, 1) == images(1, 1)  # reproducible
    assert images(1, 0) != images(1, 1)  # sub-envs of one runner
    assert images(1, 1) != images(2, 0)  # the same seed: the runner's index keeps them apart
    first = images(1, 0)
    resumed = EnvContext({"server": engine, "problem": one_rollout_problem(engine, images_per_env=8),
                          "resumed_at": 30}, worker_index=1)
    env = TokenPruningEnv(resumed)
    env.reset(seed=101)
    assert env._images != first  # a resumed run does not replay the images its first run trained on
    monkeypatch.setattr(pruning_env, "actor_was_restarted", lambda: True)
    assert images(1, 0) != first  # a runner Ray restarted does not replay its predecessor's images


def test_engine_state_is_bounded_and_freed(engine):
    env = make_env(engine, 2)
    before = len(engine.episodes)
    rollout(env, 0)
    assert len(engine.episodes) == before
    env.reset(seed=1)
    env.reset(seed=2)  # abandoning an episode releases it
    assert len(engine.episodes) == before + 2


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not pathlib.Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_an_engine_keeps_a_few_bytes_per_image_whatever_the_classes(engine):
    """Per image the engine keeps what the rewards read: the unpruned model's class and the baseline's answer,
    on first visit. Rows of 1,000 class probabilities would take 4 KB an image, 5 GiB a server on ImageNet."""
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **TINY_KWARGS).eval()
    labels = torch.zeros(50_000, dtype=torch.long)  # 200 MB per probability table at 1,000 classes
    before = resident_bytes()
    big = PruningEngine(StagedViT(vit, (1, 2, 3)), {**engine.backbone_config, "num_classes": 1000}, engine.images,
                        labels, 0.5, "merge", baseline="distinct")
    big.reset(["a", "b"], [0, 1], ratios=[0.5, 0.25])  # two ratios: two baseline caches
    assert resident_bytes() - before < 100e6


def test_bad_settings_fail_clearly(engine):
    with pytest.raises(ProblemError, match="agents must be one of both, attention, similarity"):
        make_env(engine, agents="both_and_more")
    with pytest.raises(ProblemError, match="images_per_env must be >= 1"):
        make_env(engine, 0)
    with pytest.raises(ValueError, match="unknown env_config keys: agents"):
        TokenPruningEnv({"server": engine, "agents": "attention"})
    with pytest.raises(ValueError, match="prune_points"):
        StagedViT(engine.staged.vit, (2, 9))


def test_runners_spread_over_servers_by_index(engine):
    names = ["server_0", "server_1", "server_2"]
    for worker in range(5):
        env = TokenPruningEnv(EnvContext({"server": engine, "server_name": names,
                                          "problem": one_rollout_problem(engine)}, worker_index=worker))
        assert env._server_name == names[worker % 3]
