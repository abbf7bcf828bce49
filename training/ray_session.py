"""The Ray instance train.py runs on: a local one with the CPUs a trial reserves, or a cluster with this
repository shipped to its nodes; Ray's own notices kept to its session logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray._private.services import canonicalize_bootstrap_address  # how ray.init reads --address

from cli import interrupted_go_on_line
from envs.errors import UsageError, one_line
from envs.vit.backbone_checkpoint import NOT_A_CLONE, REPO_ROOT, installed_without_repository

HASH_SEED = {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
"""The string hash seed of every Ray worker. RLlib orders the agents that stepped in an episode as a ``set`` of
their IDs iterates, which follows the process's hash seed, random by default; the exact-count sets are drawn
with one noise row per agent in that order, so only a fixed seed makes a seeded run repeat."""
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Where ``ray job submit`` hands its driver the job's config, runtime_env included."""
CONNECT_TIMEOUT_S = 5.0
"""How long :func:`connect_once` waits for a cluster's head node or GCS to accept a connection."""


def start_ray(args: argparse.Namespace, reserved_cpus: float) -> None:
    """A local Ray instance with at least the CPUs one trial reserves, or the cluster at --address with this
    repo shipped to every node.

    The console shows our progress lines and Ray's errors: worker and actor output reaches the terminal
    (a crashing env runner or server prints its traceback), while Ray's and RLlib's own warnings, all
    internal to them at start (token auth notice, RLModuleConfig and new-API-stack deprecations, gputil),
    are kept to the session logs under /tmp/ray. One line stays: the core worker's note that the ViT
    server has constructor arguments in the object store, which it does on purpose (see vit_server.py).
    """
    quiet = {"logging_level": logging.ERROR, "logging_config": ray.LoggingConfig(log_level="ERROR"),
             "log_to_driver": True}
    if args.address:
        if installed_without_repository():
            raise UsageError(f"--address {args.address}: {NOT_A_CLONE}")
        runtime_env = {"working_dir": str(REPO_ROOT), **worker_env_vars(),  # the repository, to every node
                       "excludes": [".git/", "runs/", "results/", "data/", ".venv/", "*.safetensors"]}
        # ray.init's ConnectionError: a Ray Client address (ray://) nobody answers at, after its retries; its
        # ValueError: the runtime_env of a Ray job this runs in sets a field of ours (the job's own working_dir)
        try:
            ray.init(address=args.address, runtime_env=runtime_env, **quiet)
        except (ConnectionError, ValueError) as error:
            raise UsageError(f"--address {args.address}: {error}") from None
    else:
        ray.init(address="local", num_cpus=max(args.num_cpus or os.cpu_count() or 1, reserved_cpus),
                 include_dashboard=False, runtime_env=worker_env_vars(), **quiet)


def worker_env_vars() -> dict[str, dict[str, str]]:
    """The runtime_env field that gives every Ray worker :data:`HASH_SEED`, unless the Ray job train.py runs in
    (``ray job submit``) sets the variable for its workers already: ray.init refuses a variable given twice,
    even with one value."""
    job = json.loads(os.environ.get(RAY_JOB_CONFIG, "{}")).get("runtime_env") or {}
    return {} if set(HASH_SEED) & set(job.get("env_vars") or {}) else {"env_vars": HASH_SEED}


def check_cluster_answers(address: str) -> None:
    """Refuse, in one line, an ``--address`` at which no Ray cluster answers (a typo, a cluster stopped since, or
    for ``auto`` one that Ray recorded on this machine and that is gone): ``ray.init`` would retry it without
    end. Checked before the data is read. Ray Client addresses (``ray://``) are left to Ray."""
    if address.startswith("ray://"):
        return
    try:  # as ray.init resolves it: 'auto' is $RAY_ADDRESS or the cluster last started on this machine
        resolved = canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError) as error:
        raise UsageError(f"--address {address}: {one_line(error)}") from None
    if resolved is None:  # 'local': ray.init starts one
        return
    try:
        connect_once(resolved)
    except OSError as error:
        raise UsageError(f"--address {address}: no Ray cluster answers at {resolved} ({error.strerror or error}): "
                         f"start one (ray start --head) or pass its head node's address") from None


def connect_once(address: str) -> None:
    """Open a TCP connection to ``address`` (``host:port``) and close it again: whether a Ray cluster's head node or
    GCS answers there. Its ``OSError`` where it fails: refused, or (``TimeoutError``) no answer within
    :data:`CONNECT_TIMEOUT_S`."""
    host, _, port = address.rpartition(":")
    socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()


def cluster_shortfall(reserved: Mapping[str, float]) -> str | None:
    """A notice where the Ray cluster has fewer resources than one trial ``reserved``: Tune then waits, silently,
    for nodes to join (an autoscaling cluster adds them), so the user learns why nothing happens; None where
    one trial fits."""
    cluster = ray.cluster_resources()
    if all(cluster.get(kind, 0) >= amount for kind, amount in reserved.items()):
        return None

    def listed(resources: Mapping[str, float]) -> str:
        return ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind in reserved)
    return (f"waiting for the cluster: one trial reserves {listed(reserved)} and the cluster has {listed(cluster)}; "
            f"its trials start when nodes join (or stop this run and start it again with --overwrite and a "
            f"smaller --num-workers or --servers: --resume keeps the run's)")


RUN_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1")
                                                                   else ()))
"""The signals a run takes over, whose handlers train.py gives back (``cli.signal_handlers_restored``): SIGTERM
(:func:`interrupt_on_sigterm`), SIGINT and SIGUSR1 (Tune's, which it keeps after a run it did not interrupt). A
Python session that called ``train.main`` gets its Ctrl-C back: under Tune's handler a Ctrl-C only logs a
warning."""


def interrupt_on_sigterm(go_on_command: Callable[[], str] | None = None) -> None:
    """A SIGTERM (``kill``, a job scheduler) ends the run as Ctrl-C does, with the checkpoints written so far and
    the line that says how to go on, instead of the handler ``ray.init`` installs, which aborts the driver. With
    ``go_on_command`` (the command that goes on with the run), a SIGTERM that stopped Ray's own processes too ends
    the driver at once with a line naming it (:func:`exit_once_ray_is_gone`)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        return
    if go_on_command is None:
        signal.signal(signal.SIGTERM, interrupt_as_sigint)
        return
    gcs_address = ray.get_runtime_context().gcs_address

    def interrupt(signum: int, frame: Any) -> None:
        threading.Thread(target=exit_once_ray_is_gone, args=(gcs_address, go_on_command, interrupt),
                         daemon=True).start()
        interrupt_as_sigint(signum, frame)
    signal.signal(signal.SIGTERM, interrupt)


def interrupt_as_sigint(signum: int, frame: Any) -> None:
    """SIGTERM's handler during a run: a SIGINT to this process, which Tune's handler turns into a stop with
    checkpoints during its run, and Python's into a KeyboardInterrupt before it; where SIGINT is ignored, a
    KeyboardInterrupt. A shell without job control (a job script) starts a command put in the background with
    ``&`` with SIGINT ignored, and Python leaves it so: the SIGINT was dropped, and a SIGTERM between Ray's start and
    Tune's handler, or a second one after Tune had put the ignoring back, let the run train to its end."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)
    else:  # SIG_IGN, or SIG_DFL, or a handler not set from Python (None)
        raise KeyboardInterrupt


RAY_GONE_POLL_S = 0.5
"""How often :func:`exit_once_ray_is_gone` asks whether the GCS still answers."""


def exit_once_ray_is_gone(gcs_address: str, go_on_command: Callable[[], str], handler: Any) -> None:
    """After a SIGTERM, end the process with a line naming ``go_on_command()`` and code 130 once Ray's GCS is gone
    while this driver is still connected to it. A SIGTERM to the whole process group (systemd's
    KillMode=control-group) or to every process of a job step (Slurm's scancel) stops Ray's own processes with
    train.py: Tune's stop then waits on a GCS that is gone, and Ray's core worker would end the process after 60 s
    with exit code 1 and its "Failed to connect to GCS" line, no Python code run: no word of how to go on.
    The trials' processes got the signal too, so nothing more can be saved: their checkpoints on disk are what
    ``--resume`` goes on from. It watches while ``handler`` is SIGTERM's: train.py gives the handlers back when
    the run ends, before it shuts Ray down."""
    while not ray_gone(gcs_address):
        if signal.getsignal(signal.SIGTERM) is not handler:
            return
        time.sleep(RAY_GONE_POLL_S)
    sys.stdout.flush()
    print(interrupted_go_on_line(go_on_command(), "Ray's own processes too (no closing lines)"), file=sys.stderr,
          flush=True)
    os._exit(130)


def ray_gone(gcs_address: str) -> bool:
    """Whether the GCS at ``gcs_address`` (``host:port``) refuses connections while this process is still
    connected to Ray. Asked in this order because ``ray.shutdown`` disconnects before it stops the GCS: a GCS
    that this process shut down is never taken for one stopped by a signal. Only a refusal counts (its host up,
    its port closed): a timeout, a cluster's GCS slow to answer over the network, is not taken for one gone."""
    try:
        connect_once(gcs_address)
    except ConnectionRefusedError:
        return ray.is_initialized()
    except OSError:  # no answer in time
        pass
    return False


def quiet_ray_loggers() -> None:
    """Ray's, RLlib's and Tune's own warnings to the session logs (start_ray says which), in this process;
    Tune's progress tables off (its legacy reporter, silent at ``verbose=0``: the new one prints tables even
    then); our progress lines are the console. Gymnasium's warning that RLlib registers its multi-agent env
    again is left out too: every env runner of a process (a trial's local one and its validation one)
    registers it under the same id."""
    for logger in ("ray", "ray.rllib", "ray.tune"):  # RLlib's and Tune's loggers have levels of their own
        logging.getLogger(logger).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Overriding environment rllib-multi-agent-env-v0 already in registry")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
