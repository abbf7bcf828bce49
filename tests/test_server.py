"""The shared ViT server as a real named Ray actor: batching, env access by name, restart after a crash."""

import os
import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from ray.rllib.env.env_context import EnvContext
from ray.rllib.env.env_errors import StepFailedRecreateEnvError

from envs.problem import PruningProblem
from envs.pruning_env import TokenPruningEnv, actor_was_restarted, image_stream_key
from envs.vit.data import DataError
from envs.vit.features import AGENT_FEATURES
from envs.vit_server import (
    NAMESPACE,
    SERVER_DOWN,
    ServerSettings,
    ask_for_data_errors,
    call_through_restarts,
    data_error_among,
    load_server_inputs,
    start_vit_servers,
    trial_server_name,
)
from tests.conftest import CIFAR_CLASSES
from tests.tiny_policies import first_live


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
    yield
    ray.shutdown()


def started_server(tiny_backbone, data_dir, **batching):
    """A server on 64 validation images of the tiny backbone, its handle."""
    problem = PruningProblem(backbone=str(tiny_backbone), data_dir=str(data_dir), prune_points=(1, 2, 3))
    (handle,) = start_vit_servers(ServerSettings(problem, split="val", limit=64, num_cpus=0, **batching),
                                  ["test_server"])
    return handle


@pytest.fixture
def server(ray_local, tiny_backbone, data_dir):
    handle = started_server(tiny_backbone, data_dir, max_wait_ms=200)
    yield handle
    ray.kill(handle, no_restart=True)


@pytest.fixture
def batching_server(ray_local, tiny_backbone, data_dir):
    """Its drain waits for 8 images (or 20 s), so four callers of 2 images share one forward however late the
    last of them arrives on a busy machine."""
    handle = started_server(tiny_backbone, data_dir, max_batch=8, max_wait_ms=20_000)
    yield handle
    ray.kill(handle, no_restart=True)


def test_concurrent_callers_share_one_forward(batching_server):
    server = batching_server
    before = ray.get(server.stats.remote())
    calls = [server.reset.remote([f"caller{c}-{i}" for i in range(2)], [c, c + 10], [], [0.25, 0.75] if c == 0 else [])
             for c in range(4)]
    results = ray.get(calls)
    stats = ray.get(server.stats.remote())
    assert [len(r) for r in results] == [2, 2, 2, 2]
    keep_column = AGENT_FEATURES["attention"].index("keep_fraction")
    keep_fractions = [[obs["attention"][0, keep_column] for obs in result] for result in results]
    assert keep_fractions == [[0.75, 0.25]] + [[0.5, 0.5]] * 3  # each caller's ratios, else the problem's
    assert stats["requests"] - before["requests"] == 4
    assert stats["forwards"] - before["forwards"] == 1  # four callers, one stage-0 forward
    keep = [np.ones(64, dtype=bool)] * 2
    ray.get([server.step.remote([f"caller{c}-{i}" for i in range(2)], keep) for c in range(4)])
    assert ray.get(server.stats.remote())["forwards"] - stats["forwards"] == 1
    ray.get([server.release.remote([f"caller{c}-{i}" for i in range(2)]) for c in range(4)])
    assert ray.get(server.stats.remote())["open_episodes"] == before["open_episodes"]


def test_servers_of_every_trial_start_from_one_copy_of_the_data(ray_local, tiny_backbone, data_dir, monkeypatch):
    """train.py puts the weights and the split in the object store once; each trial's servers start from those
    references and put nothing more, so a sweep of K trials holds one copy of the data there, not K + 1."""
    problem = PruningProblem(backbone=str(tiny_backbone), data_dir=str(data_dir), prune_points=(1, 2, 3))
    settings = ServerSettings(problem, split="val", limit=64, num_cpus=0)
    shared = load_server_inputs(settings).shared()
    put, puts = ray.put, []
    monkeypatch.setattr(ray, "put", lambda value, **kwargs: puts.append(value) or put(value, **kwargs))
    (handle,) = start_vit_servers(settings, ["trial_server"], shared)  # as each trial's servers start
    try:
        assert puts == []
        assert ray.get(handle.spec.remote()).num_images == 64
    finally:
        ray.kill(handle, no_restart=True)


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def killed(server) -> bool:
    """Whether the kill of ``server`` has landed: the actor is dead, restarting, or restarted without episodes."""
    try:
        return ray.get(server.stats.remote())["open_episodes"] == 0
    except SERVER_DOWN:
        return True


def test_env_finds_server_by_name_and_survives_a_restart(server):
    env = TokenPruningEnv({"server_name": "test_server", "problem": {"images_per_env": 4}})  # 4 rollouts of 1 image
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step({aid: first_live(o) for aid, o in obs.items()})  # the similarity turn: no server call
    obs, _, _, truncateds, _ = env.step({aid: first_live(o) for aid, o in obs.items()})  # the attention turn
    assert not truncateds["__all__"]
    ray.kill(server, no_restart=False)  # a crash: Ray restarts the actor, in-flight episodes are gone
    wait_until(lambda: killed(server), timeout_s=30)  # the kill lands asynchronously
    obs, *_ = env.step({aid: first_live(o) for aid, o in obs.items()})
    with pytest.raises(StepFailedRecreateEnvError):  # the lost episode is discarded, not trained on
        env.step({aid: first_live(o) for aid, o in obs.items()})
    obs, _ = env.reset()
    steps = 0
    while True:
        obs, _, terminateds, _, infos = env.step({aid: first_live(o) for aid, o in obs.items()})
        steps += 1
        if terminateds["__all__"]:
            break
    assert steps == 6 and infos["attention_0"]["kept_per_stage"] == [32, 16, 8]


@ray.remote(max_restarts=1)
class StreamKey:
    """An actor that says the image-stream key an env would get in it, as an env runner does."""

    def key(self) -> tuple[int, ...]:
        return image_stream_key(EnvContext({}, worker_index=1))

    def crash(self) -> None:
        os._exit(1)


def test_an_actor_ray_restarted_gets_an_image_stream_of_its_own(ray_local):
    """RLlib's new stack replaces a crashed env runner by Ray's restart of the same actor, with the same
    EnvContext and seed: only the restart itself tells the env not to replay its predecessor's images."""
    actor = StreamKey.remote()
    assert ray.get(actor.key.remote()) == (1, 0, 0)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.crash.remote())
    restarted = call_through_restarts(lambda: ray.get(actor.key.remote()), timeout_s=60)
    assert restarted[:3] == (1, 0, 0) and len(restarted) == 4  # the new process's id joins the key
    assert not actor_was_restarted()  # the driver is no restarted actor


def test_unknown_server_name_fails_clearly(ray_local):
    with pytest.raises(RuntimeError, match="no ViT server named"):
        TokenPruningEnv({"server_name": "nobody_home", "server_timeout_s": 1})


def test_calls_wait_through_a_restart_then_give_up_clearly():
    """What envs and validation do while Ray restarts a dead server: retry, looking it up again, until a deadline."""
    failures = [ray.exceptions.RayActorError(), ray.exceptions.ActorUnavailableError("restarting", None)]
    lookups = []

    def call():
        if failures:
            raise failures.pop(0)
        return "served"
    assert call_through_restarts(call, 10.0, lambda: lookups.append(1)) == "served" and len(lookups) == 2

    def dead():
        raise ray.exceptions.RayActorError()
    with pytest.raises(RuntimeError, match=r"ViT server unreachable \(waited 0.2 s\)"):
        call_through_restarts(dead, 0.2)


def test_an_unreadable_streamed_image_stops_the_run_instead_of_failing_resets_forever(ray_local, tiny_backbone,
                                                                                     tmp_path):
    """A split streamed from its files meets a damaged image only when an episode draws it. The env fails the
    reset (after a wait, as RLlib resets it again at once) and the server keeps the error, which train.py's
    driver reads to end the run with it (``StopOnDataError``)."""
    from training.console import RunStoppedOnUnreadableImage, StopOnDataError

    for split in ("train", "test"):
        for name in CIFAR_CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / name / f"{i}.png").write_bytes(b"not an image")
    problem = PruningProblem(backbone=str(tiny_backbone), dataset="folder", data_dir=str(tmp_path), val_size=2,
                             prune_points=(1, 2, 3), images_per_env=4)
    name, trial = trial_server_name("train_0", "t1", "5a9e1c"), SimpleNamespace(trial_id="t1")  # as a trial's
    (handle,) = start_vit_servers(ServerSettings(problem, memory_budget_mb=0, num_cpus=0), [name])

    def first_data_error(trial_ids):
        answers = ask_for_data_errors(trial_ids)
        return data_error_among(ray.wait(answers, num_returns=len(answers))[0] if answers else [])

    def driver_steps(stop, seconds):  # Tune's loop, stepping on while the answers are on their way
        deadline, iteration = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            stop.on_step_end(iteration=iteration, trials=[trial])
            iteration += 1
            time.sleep(0.05)
    try:
        assert first_data_error(["t1"]) is None
        driver_steps(StopOnDataError(), 1)  # no error yet: the servers' answer stops nothing
        env = TokenPruningEnv({"server_name": name, "problem": problem.to_json()})
        with pytest.raises(DataError, match=r"^cannot read image "):
            env.reset(seed=0)
        assert first_data_error(["t1"]).startswith("cannot read image ")
        assert first_data_error(["t10", "other"]) is None  # another run's trials on the same Ray cluster
        stop = StopOnDataError()  # as train.py's: an answer has every_s = 2 s to arrive before it is asked again
        stop.on_step_end(iteration=0, trials=[trial])  # asked; its answers are pickled with Tune's run record:
        stop = pickle.loads(pickle.dumps(stop))  # without them, and without its clock, so it asks at once
        unreadable = (r"^cannot read image .*\(replace it with a readable image: removing it renumbers the images "
                      r"after it, and with them the splits\)$")
        with pytest.raises(RunStoppedOnUnreadableImage, match=unreadable):
            driver_steps(stop, 30)  # until an answer arrives (each may take up to 2 s), for up to 30 s
    finally:
        ray.kill(handle, no_restart=True)
