"""One trial: RLlib's PPO on one pruning problem with its own ViT servers, as Tune's trainable; where it goes
on from when Tune restarts or resumes it, and its training loop."""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.env_runner_group import EnvRunnerGroup
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    EPISODE_AGENT_RETURN_MEAN,
    EPISODE_AGENT_STEPS,
    EVALUATION_RESULTS,
    NUM_AGENT_STEPS_SAMPLED,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
)

from envs.episode_metrics import PruningMetrics
from envs.problem import PruningProblem
from envs.pruning_env import TokenPruningEnv, env_steps_per_episode, policy_for_agent
from envs.vit.backbone_checkpoint import normalize
from envs.vit_server import (
    NAMESPACE,
    ServerInputs,
    ServerSettings,
    SharedInputs,
    call_through_restarts,
    load_server_inputs,
    staged_from_weights,
    start_vit_servers,
    trial_server_name,
    wait_until_serving,
)
from policies.checkpoints import (
    UNRECORDED_PREFIX,
    CheckpointInfo,
    PolicyCheckpointError,
    checkpoint_number,
    numbered_checkpoint_directories,
    read_checkpoint_info,
    trial_checkpoints,
)
from policies.decisions import trained_policies
from policies.export import stage_checkpoint
from policies.rl_module import TokenPolicyModule
from policies.sample_ahead import SampleAheadPPO
from policies.warm_start import warm_start_modules
from training.learner import PruningPPOLearner
from training.placement import (
    Placement,
    TrialResources,
    server_bundles,
    with_resources,
)
from training.ray_session import quiet_ray_loggers

TRAIN_SERVER, VAL_SERVER = "vit_server_train", "vit_server_val"
SCORE = "val_score"  # the reported metric checkpoints are ranked by: see validation_score


def build_config(problem: PruningProblem, resources: TrialResources, train_servers: list[str], val_server: str,
                 initial_states: dict[str, Path] | None = None, resumed_at: int = 0) -> PPOConfig:
    """The whole PPO setup as data: env, the two policies, resources, PPO and validation settings.

    ``initial_states``: module directories (``RLModule.save_to_path``) the policies start from (warm start);
    ``resumed_at``: the iteration of the checkpoint the run goes on from (its envs draw other images than the
    run before it did).
    """
    env_config = {"problem": problem.to_json(), "server_name": train_servers, "seed": problem.seed,
                  "resumed_at": resumed_at,
                  "data_error_wait_s": 60.0}  # RLlib resets a failed env at once: StopOnDataError ends the run
    policies = trained_policies(problem.agents)
    module_specs = {  # spaces come from the env, per policy
        policy: RLModuleSpec(module_class=TokenPolicyModule, model_config=policy_model_config(problem))
        for policy in policies}
    return (
        with_resources(PPOConfig(SampleAheadPPO if resources.sample_ahead else PPO), resources)
        .environment(TokenPruningEnv, env_config=env_config, disable_env_checking=True)
        .multi_agent(policies=set(policies), policy_mapping_fn=policy_for_agent, count_steps_by="agent_steps")
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=module_specs))
        .env_runners(rollout_fragment_length="auto", sample_timeout_s=600.0)
        .training(learner_class=PruningPPOLearner, **asdict(problem.ppo))
        .callbacks(PruningMetrics, on_algorithm_init=functools.partial(restore_initial_states,
                                                                        initial_states=initial_states or {}))
        .evaluation(evaluation_interval=problem.checkpoint_every, evaluation_num_env_runners=0,
                    custom_evaluation_function=functools.partial(
                        validate_on_server, server_name=val_server, model_config=policy_model_config(problem),
                        steps_per_image=env_steps_per_episode(problem)))
        .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=1000,
                         delay_between_env_runner_restarts_s=5.0, restart_failed_sub_environments=True)
        .debugging(seed=problem.seed, log_level="ERROR")  # RLlib's start-up notices: see start_ray
    )


def policy_model_config(problem: PruningProblem) -> dict[str, Any]:
    """``TokenPolicyModule``'s ``model_config`` for ``problem``'s policies, one for the learner, the warm start and
    validation, so that each builds the modules whose weights the others hand it."""
    return {"hidden": problem.hidden, "entropy_gradient": problem.ppo.entropy_coeff > 0}


def server_settings(problem: PruningProblem, placement: Placement, access: dict) -> dict[str, ServerSettings]:
    """Servers on the train split for sampling, one on a val subset for checkpoint selection, with the
    resources the placement gives them (the validation server reserves no CPU: see trial_resources). The
    validation server comes first, so that a validation split holding the backbone's training images is
    refused before the train split's minutes of decoding."""
    train = ServerSettings(problem, split="train", limit=problem.train_limit, num_gpus=placement.server_gpus,
                           num_cpus=placement.server_cpus, torch_threads=int(placement.server_cpus), **access)
    return {VAL_SERVER: replace(train, split="val", limit=problem.val_limit, num_cpus=0), TRAIN_SERVER: train}


def restore_initial_states(algorithm: Algorithm, *, initial_states: dict[str, Path], **_) -> None:
    """RLlib's ``on_algorithm_init`` hook: load each warm-started module into the learner, the documented
    ``restore_from_path(..., component=...)`` way, then hand the weights to the env runners."""
    for policy, path in initial_states.items():
        algorithm.restore_from_path(str(path), component="/".join(
            (COMPONENT_LEARNER_GROUP, COMPONENT_LEARNER, COMPONENT_RL_MODULE, policy)))
    if initial_states:
        algorithm.env_runner_group.sync_weights(from_worker_or_learner_group=algorithm.learner_group,
                                                inference_only=True)


def validate_on_server(algorithm: Algorithm, eval_env_runner_group: EnvRunnerGroup, *, server_name: str,
                       model_config: dict, steps_per_image: int) -> tuple[dict[str, float], int, int]:
    """RLlib's custom evaluation: the learner's current weights, scored by the ViT server that holds the
    validation images in the exact-budget mode that evaluate.py reports (``PruningEngine.validate``); every
    validation image counts, every time. The scores land in the results under ``evaluation``. The step counts
    returned are what stepping those images through the env would have been: an env step per turn
    (``env_steps_per_episode`` per image), each the one acting agent's step."""
    server = ray.get_actor(server_name, namespace=NAMESPACE)
    policies = list(algorithm.config.policies)
    weights = algorithm.learner_group.get_weights(module_ids=policies)
    metrics = call_through_restarts(lambda: ray.get(server.validate.remote(weights, model_config)))
    for name, value in metrics.items():
        algorithm.metrics.log_value((EVALUATION_RESULTS, name), value, reduce="item")
    env_steps = call_through_restarts(lambda: ray.get(server.spec.remote())).num_images * steps_per_image
    return metrics, env_steps, env_steps


def imitate_heuristic(problem: PruningProblem, inputs: ServerInputs, directory: Path, trial: str) -> dict[str, Path]:
    """The warm start (policies/warm_start.py): the modules fitted to the heuristics on a seeded subset of the
    train split, saved under ``directory``; returns each policy's path."""
    started = time.time()
    staged = staged_from_weights(inputs.state, inputs.config, problem.prune_points)
    chosen = torch.randperm(len(inputs.images), generator=torch.Generator().manual_seed(problem.seed))
    images = normalize(inputs.images[chosen[:problem.warm_start_images]], inputs.config)
    fitted = warm_start_modules(staged, images, problem.ratios_trained, problem.reduction, problem.warm_start,
                                problem.agents, problem.protected_share, policy_model_config(problem),
                                problem.warm_start_steps, directory, problem.seed)
    imitated = {"attention": "greedy attention", "similarity": problem.warm_start}
    matches = ", ".join(f"{policy} agent imitates {imitated[policy]} ({agreement:.1%} of its choices match)"
                        for policy, (_, agreement) in fitted.items())
    print(f"[{trial}] warm start on {len(images)} train images: {matches}, in {time.time() - started:.0f} s",
          flush=True)
    return {policy: path for policy, (path, _) in fitted.items()}


@dataclass(frozen=True)
class StopRule:
    """When a trial stops; given anew by each command, ``--resume`` included."""

    iterations: int
    time_budget_min: float  # 0: no limit


def validation_score(result: dict[str, Any]) -> float | None:
    """The score checkpoints are ranked by: top-1 accuracy of the exact-budget mode (``MARL exact``, what
    ships at the problem's budget) on the validation images."""
    return result.get(EVALUATION_RESULTS, {}).get("exact_accuracy")


def run_trial(config: dict, *, stop: StopRule, access: dict, data_dir: str, run_dir: Path | None,
              inputs: dict[str, SharedInputs] | None, commit: str | None,
              backbone_digests: dict[str, str | None]) -> None:
    """Tune's trainable: one PPO run on one problem with its own ViT servers.

    It goes on from the trial's newest checkpoint when Tune restarts or resumes it
    (:func:`resumable_checkpoints`), else starts from the trial's ``from_checkpoint`` or the warm start; it
    reports every iteration and, every ``checkpoint_every`` iterations and at the stop, a validated
    checkpoint. ``config["trial"]``: the trial's problem, resources and starting checkpoint (build_tuner);
    ``run_dir``: :func:`~training.run_directory.local_run_dir`, where Tune stores the trial's checkpoints on
    disk, not the staging directory of the trial's context; ``data_dir``: the data directory as the driver
    resolved it (a trial runs in a directory of its own); ``inputs``: the servers' weights and images as the
    driver read them and put them in the object store, one copy for every trial (loaded here if None);
    ``commit``: the code's commit where the driver runs (a cluster's nodes receive the code without git), and
    ``backbone_digests``: the digest of each trial's backbone weights as the driver read them, by the problems'
    ``backbone`` (a trial's node may not hold the file: the servers receive the weights through the object
    store), both recorded in every checkpoint."""
    quiet_ray_loggers()
    trial = config["trial"]  # this trial's entry of the grid (build_tuner)
    problem = replace(PruningProblem.from_json(trial["problem"]), data_dir=data_dir)
    resources = TrialResources.from_json(trial["resources"])
    settings = server_settings(problem, resources.placement, access)
    inputs = inputs or {name: load_server_inputs(s).shared() for name, s in settings.items()}
    trial_id, tag = tune.get_context().get_trial_id(), uuid.uuid4().hex[:6]
    names = {VAL_SERVER: trial_server_name("val", trial_id, tag),
             TRAIN_SERVER: [trial_server_name(f"train_{index}", trial_id, tag)
                            for index in range(resources.placement.servers)]}
    train_bundles, val_bundle = server_bundles(resources)
    # all servers start at once, and the warm start runs while they do
    servers = [*start_vit_servers(settings[TRAIN_SERVER], names[TRAIN_SERVER], inputs[TRAIN_SERVER], train_bundles,
                                  wait=False),
               *start_vit_servers(settings[VAL_SERVER], [names[VAL_SERVER]], inputs[VAL_SERVER], [val_bundle],
                                  wait=False)]
    try:
        with contextlib.ExitStack() as downloads:  # a checkpoint from cloud storage stays on disk until the end
            trial_dir = run_dir / trial["name"] if run_dir is not None else None
            recorded = tune.get_checkpoint()
            own = resumable_checkpoints(trial_dir, recorded, downloads)
            start = [Path(trial["from_checkpoint"])] if trial["from_checkpoint"] else []
            initial_states = {}
            if not own and not start and problem.warm_start != "none":
                clones = Path(tune.get_context().get_trial_dir(), "warm_start")  # staged there, Tune stores it
                initial_states = imitate_heuristic(problem, inputs[TRAIN_SERVER].get(), clones, trial["name"])
            wait_until_serving(servers)
            algo = build_config(problem, resources, names[TRAIN_SERVER], names[VAL_SERVER], initial_states,
                                newest_iteration(own or start)).build_algo()
            try:
                restore_newest(algo, own or start)
                set_aside_unrecorded(trial_dir, recorded)
                train_until(algo, problem, stop, commit=commit, backbone_digest=backbone_digests[problem.backbone])
            finally:
                algo.stop()
    finally:
        for server in servers:
            ray.kill(server, no_restart=True)


def resumable_checkpoints(trial_dir: Path | None, recorded: tune.Checkpoint | None,
                          downloads: contextlib.ExitStack) -> list[Path]:
    """What a restarted or resumed trial may go on from, newest first: its checkpoints in ``trial_dir`` (where
    Tune stores them, on a local disk or a shared one; None for cloud storage), then the one Tune recorded last
    when it is elsewhere, downloaded for as long as ``downloads`` stays open. The disk comes first because Tune
    saves its record of a run only every 10 s or more: after a SIGKILL the record can name a checkpoint older
    than the newest, even one its rotation has deleted since."""
    found = list(reversed(trial_checkpoints(trial_dir))) if trial_dir is not None else []
    if recorded is not None and (trial_dir is None or not Path(recorded.path).is_relative_to(trial_dir)):
        found.append(Path(downloads.enter_context(recorded.as_directory())))
    return found


def set_aside_unrecorded(trial_dir: Path | None, recorded: tune.Checkpoint | None) -> None:
    """Rename the trial's checkpoint directories that Tune has no record of (stored after it last saved its record,
    before a SIGKILL) out of Tune's numbering, which goes on from its record and would write later iterations
    into them. They stay what a later resume may go on from (:func:`trial_checkpoints`); one set aside before
    under the same name holds an older iteration and is replaced."""
    if trial_dir is None:
        return
    recorded_here = recorded is not None and Path(recorded.path).parent == trial_dir
    last_recorded = checkpoint_number(Path(recorded.path)) if recorded_here else -1
    for checkpoint in numbered_checkpoint_directories(trial_dir, set_aside=False):
        if checkpoint_number(checkpoint) > last_recorded:
            aside = checkpoint.with_name(UNRECORDED_PREFIX + checkpoint.name)
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)


def newest_iteration(checkpoints: list[Path]) -> int:
    """The iteration of the newest of ``checkpoints`` (a trial's own, or ``--from-checkpoint``'s) whose record
    reads (0 without checkpoints): the key of the image streams of a run that goes on from it, so that they
    draw other images than the run that wrote it drew from its start. It is the iteration restored unless that
    checkpoint then fails to restore and :func:`restore_newest` falls back to an older one."""
    for checkpoint in checkpoints:
        with contextlib.suppress(PolicyCheckpointError):  # an unreadable record is passed over
            return read_checkpoint_info(checkpoint).iteration or 0
    return 0


def reached_iteration(trial_dir: Path) -> int:
    """How far a trial got: the iteration of its newest checkpoint on disk whose record reads (0 without), also
    where that iteration was stored but never reported (a Ctrl-C, or a resume at its stop)."""
    return newest_iteration(list(reversed(trial_checkpoints(trial_dir))))


def restore_newest(algo: Algorithm, checkpoints: list[Path]) -> None:
    """The whole algorithm state (weights, optimiser, iteration count) from the first of ``checkpoints``
    that restores (a checkpoint cut short by a crash while it was stored does not), on every runner."""
    for checkpoint in checkpoints:
        try:
            algo.restore_from_path(str(checkpoint.resolve()))
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint can fail in many ways
            fallback = "; trying an older one" if checkpoint != checkpoints[-1] else ""
            print(f"cannot restore {checkpoint} ({type(error).__name__}: {error}){fallback}", flush=True)
            continue
        # restore pushes weights to remote runners without waiting; make sure they have them
        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True,
                                           timeout_seconds=60)
        print(f"resumed from {checkpoint} at iteration {algo.iteration}", flush=True)
        return
    if checkpoints:
        raise PolicyCheckpointError(f"none of {', '.join(map(str, checkpoints))} restores")


def without_agent_slots(result: dict) -> dict:
    """``result``, changed in place: RLlib's counts of agent steps sampled per agent ID summed, its episode returns
    and steps per agent ID left out. An agent ID names a slot of an env's images (``attention_0`` ...
    ``similarity_63``), not an agent, so they would fill progress.csv and TensorBoard with 512 columns by
    default. The per-policy metrics (``module_*``) hold what they tell."""
    runners = result.get(ENV_RUNNER_RESULTS, {})
    for key in (EPISODE_AGENT_RETURN_MEAN, EPISODE_AGENT_STEPS):
        runners.pop(key, None)
    for key in (NUM_AGENT_STEPS_SAMPLED, NUM_AGENT_STEPS_SAMPLED_LIFETIME):
        if isinstance(runners.get(key), dict):
            runners[key] = sum(runners[key].values())
    return result


def train_until(algo: Algorithm, problem: PruningProblem, stop: StopRule, *, commit: str | None,
                backbone_digest: str | None) -> None:
    """The PPO loop: train and report each iteration; validate and checkpoint every K iterations and at the
    stop (Tune ranks the checkpoints by :data:`SCORE`; each records ``commit`` and the ``backbone_digest`` of the
    weights the agents learn on)."""
    began, first = time.time(), algo.iteration
    while algo.iteration < stop.iterations:
        result = without_agent_slots(algo.train())
        validated = algo.iteration % problem.checkpoint_every == 0  # evaluation_interval == checkpoint_every
        elapsed = time.time() - began
        out_of_time = stop.time_budget_min > 0 and elapsed > 60 * stop.time_budget_min
        final = algo.iteration >= stop.iterations or out_of_time
        if final and not validated:
            result[EVALUATION_RESULTS] = algo.evaluate()
        remaining = (stop.iterations - algo.iteration) * elapsed / (algo.iteration - first)
        if stop.time_budget_min > 0:
            remaining = max(0.0, min(remaining, 60 * stop.time_budget_min - elapsed))
        result["progress"] = {"elapsed_s": elapsed, "remaining_s": 0.0 if final else remaining,
                              "validated": validated or final, "out_of_time": out_of_time}
        result[SCORE] = validation_score(result) if validated or final else None  # a column from the first row on
        if validated or final:
            with tempfile.TemporaryDirectory(prefix="marl_checkpoint_") as staging:
                stage_checkpoint(algo, staging, CheckpointInfo(problem, algo.iteration, result[SCORE], commit,
                                                                 backbone_digest))
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(staging))
        else:
            tune.report(result)
        if out_of_time:
            break
