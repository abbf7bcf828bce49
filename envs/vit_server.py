"""The shared ViT server: one named async Ray actor that serves every env runner.

It holds the backbone (on a GPU when it was given one) and the decoded image split. Envs find it by
name and send image indices and keep decisions, never images. Concurrent requests from all callers are
queued and served together: the queue is drained once ``max_batch`` images are waiting or ``max_wait_ms``
has passed, and the whole drain goes through one engine call (one padded forward per stage present), so
throughput grows with the number of callers. The forward runs in a worker thread, so requests keep
queueing while it computes. On a CPU that is all the batching worth having: a forward costs about the same
per image at any batch size, so waiting only idles the server (benchmarks/README.md); ``max_wait_ms=None``
(the default) therefore waits 2 ms on a GPU and not at all on a CPU.

If the actor dies, Ray restarts it (``max_restarts``) from the same creation arguments; episodes that were
in flight are gone and the env starts new ones (see ``TokenPruningEnv``). Callers wait for the restart with
:func:`call_through_restarts`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from envs.pruning_engine import EngineSpec, PruningEngine
from envs.server_settings import ServerSettings
from envs.vit.backbone_checkpoint import load_backbone, vit_from_state
from envs.vit.data import DataError, StreamedImages
from envs.vit.held_out import load_checked_split
from envs.vit.staged_vit import StagedViT
from policies.rl_module import policy_module_spec

NAMESPACE = "marl_token_pruning"
DEFAULT_NAME = "vit_server"
RESTART_TIMEOUT_S = 120.0
"""How long a caller waits for a dead ViT server to be restarted before it gives up."""
_PINNED: dict[str, list[ray.ObjectRef]] = {}  # creation arguments must outlive the actor for restarts


class _Request(NamedTuple):
    """One caller's request, waiting in the server's queue."""

    kind: str  # "reset" or "step"
    keys: list[str]  # one episode key per image
    payload: list  # image indices (reset) or keep masks (step), one per key
    future: asyncio.Future
    upcoming: list[int] = ()  # reset: images the caller will ask for next
    ratios: list[float] = ()  # reset: each image's removal ratio (empty: the problem's target_ratio)


class ViTServer:
    """Async actor body; created by :func:`start_vit_servers`, which reads data and weights on the driver."""

    def __init__(self, state: dict, config: dict, images: torch.Tensor | StreamedImages, labels: torch.Tensor,
                 settings: ServerSettings) -> None:
        self.settings = settings
        torch.set_num_threads(settings.torch_threads)
        device = "cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        problem = settings.problem
        staged = staged_from_weights(state, config, problem.prune_points)
        self.engine = PruningEngine(staged, config, images, labels, problem.target_ratio, problem.reduction, device,
                                    baseline=problem.baseline_heuristic)
        wait_ms = settings.max_wait_ms
        self._max_wait_s = (2.0 if device == "cuda" else 0.0) / 1000 if wait_ms is None else wait_ms / 1000
        self._queue: list[_Request] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1)
        self.counts = {"requests": 0, "batches": 0, "images": 0}
        self.data_error: str | None = None  # the first image it could not read (ask_for_data_errors)

    async def spec(self) -> EngineSpec:
        return self.engine.spec()

    async def reset(self, keys: list[str], indices: list[int], upcoming: list[int] = (),
                    ratios: list[float] = ()) -> list[dict]:
        """Start episodes on these images, each at its removal ratio of ``ratios`` (empty: the problem's
        target_ratio); ``upcoming``: the images the caller will ask for next (read ahead when the split streams
        from its files)."""
        return await self._submit("reset", keys, list(indices), list(upcoming), list(ratios))

    async def step(self, keys: list[str], keep: list[np.ndarray]) -> list[dict]:
        return await self._submit("step", keys, keep)

    async def release(self, keys: list[str]) -> None:
        self.engine.release(keys)

    async def validate(self, weights: dict[str, dict], model_config: dict) -> dict[str, float]:
        """``PruningEngine.validate`` of policy modules with these weights (``LearnerGroup.get_weights``), on
        every image this server holds; queued behind the episodes in flight."""
        modules = {}
        for policy, state in weights.items():
            modules[policy] = policy_module_spec(policy, self.engine.staged.num_patches, model_config).build()
            modules[policy].set_state(state)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self.engine.validate({p: m.eval() for p, m in modules.items()},
                                                        self.settings.problem.protected_share))

    async def stats(self) -> dict:
        return {**self.counts, "forwards": self.engine.forwards, "open_episodes": len(self.engine.episodes),
                "nonfinite_features": self.engine.nonfinite_features, "data_error": self.data_error}

    async def _submit(self, kind: str, keys: list, payload: list, upcoming: list[int] = (),
                      ratios: list[float] = ()) -> list:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(kind, keys, payload, future, upcoming, ratios))
        self.counts["requests"] += 1
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        """Drain the queue forever: wait for a first request, then up to max_wait for company."""
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = time.monotonic() + self._max_wait_s
            while self._waiting_images() < self.settings.max_batch and time.monotonic() < deadline:
                await asyncio.sleep(max(0.0, min(0.0005, deadline - time.monotonic())))
            batch, size = [], 0
            while self._queue and (not batch or size + len(self._queue[0].keys) <= self.settings.max_batch):
                batch.append(self._queue.pop(0))
                size += len(batch[-1].keys)
            if not self._queue:
                self._arrived.clear()
            self.counts["batches"] += 1
            self.counts["images"] += size
            outcomes = await loop.run_in_executor(self._executor, self._run, batch)
            for request, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)

    def _waiting_images(self) -> int:
        return sum(len(request.keys) for request in self._queue)

    def _run(self, batch: list[_Request]) -> list:
        """One engine call per kind for the whole drain; failures are returned per request."""
        outcomes: list = [None] * len(batch)
        for kind in ("reset", "step"):
            chosen = [i for i, request in enumerate(batch) if request.kind == kind]
            if kind == "step":  # a request naming a lost episode fails alone
                for i in list(chosen):
                    if (lost := self.engine.lost(batch[i].keys)) is not None:
                        outcomes[i] = lost
                        chosen.remove(i)
            if not chosen:
                continue
            keys = [k for i in chosen for k in batch[i].keys]
            payload = [p for i in chosen for p in batch[i].payload]
            upcoming = [u for i in chosen for u in batch[i].upcoming]
            ratios = [r for i in chosen for r in batch[i].ratios or [self.engine.target_ratio] * len(batch[i].keys)]
            try:
                results = (self.engine.reset(keys, payload, upcoming, ratios) if kind == "reset"
                           else self.engine.step(keys, payload))
            except Exception as error:  # noqa: BLE001 - reported to each caller, the server stays up
                if isinstance(error, DataError) and self.data_error is None:
                    self.data_error = str(error)
                for i in chosen:
                    outcomes[i] = error
                continue
            start = 0
            for i in chosen:
                outcomes[i] = results[start:start + len(batch[i].keys)]
                start += len(batch[i].keys)
        return outcomes


Result = TypeVar("Result")


SERVER_DOWN: tuple[type[Exception], ...] = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
"""What a call to a server that died, or is restarting, raises."""


def remote_cause(error: BaseException) -> BaseException:
    """The exception a Ray task or actor call raised where it ran: a ``RayTaskError``'s cause, else ``error``."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return error.cause
    return error


def call_through_restarts(call: Callable[[], Result], timeout_s: float = RESTART_TIMEOUT_S,
                          before_retry: Callable[[], None] = lambda: None, *,
                          retry_on: tuple[type[Exception], ...] = SERVER_DOWN,
                          failure: str = "ViT server unreachable") -> Result:
    """``call()`` (a blocking call to a ViT server), retried every 0.5 s while it raises ``retry_on`` (the
    server is dead or restarting; not yet registered, for a lookup), for up to ``timeout_s``; then a
    ``RuntimeError`` saying ``failure``. ``before_retry`` runs before each retry (e.g. to look the server up
    again)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except retry_on as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{failure} (waited {timeout_s} s)") from error
            time.sleep(0.5)
            before_retry()


def staged_from_weights(state: dict, config: dict, prune_points: tuple[int, ...]) -> StagedViT:
    """The backbone rebuilt from its weights and checkpoint config (as read by ``load_server_inputs``)."""
    return StagedViT(vit_from_state(state, config), prune_points)


@dataclass(frozen=True)
class ServerInputs:
    """What a server is built from, read on the driver: weights, backbone config and the decoded split."""

    state: dict
    config: dict
    images: torch.Tensor | StreamedImages
    labels: torch.Tensor

    def shared(self) -> SharedInputs:
        """These inputs put in Ray's object store, once for every server and trial given the result."""
        return SharedInputs(ray.put(self.state), self.config, ray.put(self.images), ray.put(self.labels))


@dataclass(frozen=True)
class SharedInputs:
    """:class:`ServerInputs` in Ray's object store (:meth:`ServerInputs.shared`): what travels to the servers of
    every trial of a sweep, so the weights and the decoded split are held there once, not once per trial."""

    state: ray.ObjectRef
    config: dict
    images: ray.ObjectRef
    labels: ray.ObjectRef

    def get(self) -> ServerInputs:
        """The inputs read back into this process."""
        return ServerInputs(ray.get(self.state), self.config, ray.get(self.images), ray.get(self.labels))


def load_server_inputs(settings: ServerSettings) -> ServerInputs:
    """Read and check the backbone and the data (no Ray needed): bad settings fail here, before anything starts."""
    problem = settings.problem
    model, config = load_backbone(problem.backbone_path)
    StagedViT(model, problem.prune_points)  # fail here, clearly, on pruning points the backbone lacks
    split = load_checked_split(problem.dataset, settings.split, problem.data_dir, config, val_size=problem.val_size,
                               seed=problem.split_seed, limit=settings.limit, download=settings.download,
                               memory_budget_mb=settings.memory_budget_mb)
    return ServerInputs(model.state_dict(), config, split.images, split.labels)


def start_vit_servers(settings: ServerSettings, names: Sequence[str],
                      inputs: ServerInputs | SharedInputs | None = None,
                      bundles: Sequence[int] | None = None, *, wait: bool = True) -> list[ray.actor.ActorHandle]:
    """Start one named actor per name on the same inputs and, unless ``wait`` is False, wait until they all
    serve (:func:`wait_until_serving`: a caller with other work to do while they start calls it later).

    Weights and images travel through Ray's object store, put there once for all of them (or already there:
    :class:`SharedInputs`), so the nodes the actors land on need neither the checkpoint nor the data set on
    their disk. ``inputs``: read here from ``settings`` if None. ``bundles``: for each server, the bundle of
    the caller's placement group it takes (a Tune trial's), so that it never takes a bundle that RLlib has set
    aside for an env runner.
    """
    if not isinstance(inputs, SharedInputs):
        inputs = (inputs or load_server_inputs(settings)).shared()
    refs = [inputs.state, inputs.images, inputs.labels]
    actor_class = ray.remote(ViTServer)
    servers = []
    group = ray.util.get_current_placement_group() if bundles is not None else None
    for index, name in enumerate(names):
        _PINNED[name] = refs
        strategy = (PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundles[index])
                    if group is not None else None)
        servers.append(actor_class.options(
            name=name, namespace=NAMESPACE, num_cpus=settings.num_cpus, num_gpus=settings.num_gpus,
            max_restarts=settings.max_restarts, max_concurrency=1000, scheduling_strategy=strategy,
        ).remote(refs[0], inputs.config, refs[1], refs[2], settings))
    if wait:
        wait_until_serving(servers)
    return servers


def trial_server_name(role: str, trial_id: str, tag: str) -> str:
    """The actor name of one of a Tune trial's ViT servers: its ``role`` (``train_0``, ``val``), the trial's ID
    and a ``tag`` that a restarted trial draws anew (its servers are new actors); :func:`ask_for_data_errors`
    finds a trial's servers by it."""
    return f"{DEFAULT_NAME}_{role}_{trial_id}_{tag}"


def names_a_trial_server(name: str, trial_ids: Collection[str]) -> bool:
    """Whether ``name`` is one that :func:`trial_server_name` gives a server of one of the trials ``trial_ids``."""
    return name.startswith(f"{DEFAULT_NAME}_") and any(f"_{trial_id}_" in name for trial_id in trial_ids)


def ask_for_data_errors(trial_ids: Collection[str]) -> list[ray.ObjectRef]:
    """Ask the ViT servers of these Tune trials which image they could not read first (a streamed split reads its
    images as episodes draw them); :func:`data_error_among` reads the answers as they arrive. An env cannot stop
    the run on it: RLlib recreates a failed env and resets it again, without end, so train.py's driver asks
    (``training.console.StopOnDataError``)."""
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
             if actor["namespace"] == NAMESPACE and names_a_trial_server(actor["name"], trial_ids)]
    answers = []
    for name in names:
        try:
            answers.append(ray.get_actor(name, NAMESPACE).stats.remote())
        except ValueError:  # gone since it was listed
            continue
    return answers


def data_error_among(answers: Sequence[ray.ObjectRef]) -> str | None:
    """The first unreadable image named in these answers of :func:`ask_for_data_errors` (ready ones: ``ray.wait``
    first), or None; a server that died before it answered names none."""
    for answer in answers:
        try:
            error = ray.get(answer)["data_error"]
        except ray.exceptions.RayError:
            continue
        if error is not None:
            return error
    return None


def wait_until_serving(servers: Sequence[ray.actor.ActorHandle]) -> None:
    """Return once every server has built its engine; raises the error of one whose start failed. A server's
    process imports torch and timm first, seconds of CPU, so servers started together start side by side."""
    ray.get([server.spec.remote() for server in servers])
