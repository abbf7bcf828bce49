"""Where a command runs: the ``--device`` of backbone.py and evaluate.py, in which precision, and how results
name it.

Both commands take the same names (``auto``: the GPU when one is visible, else the CPU) and refuse the same
bad ones with a message meant for the user as is. Results record :func:`describe_device`, so that a
timing says which hardware it comes from.
"""

from __future__ import annotations

import os
import platform

import torch

from envs.errors import UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:1, ..."
"""The ``--device`` names, as the commands' help and errors list them."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The precisions the forwards run in (evaluate.py's and batch1_latency's ``--dtype``; bfloat16 under autocast)."""


def autocast_to(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """The forwards on ``device`` in ``dtype``: ``torch.autocast`` to it, off for float32. One for every command
    (evaluate.py's ``--dtype``, backbone.py's ``--amp``, the engine benchmark's ``--precision``)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def resolve_device(name: str) -> torch.device:
    """The device ``--device name`` means; a ``UsageError`` naming the problem for a name that is no torch device,
    a device other than the CPU or a CUDA GPU (the timers synchronise with those only, ``envs.vit.timing``),
    or a GPU that is not visible. A GPU comes with its index (``cuda`` is ``cuda:0``), as its tensors report
    theirs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device: {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name!r}: this project runs on the CPU or a CUDA GPU ({DEVICE_CHOICES})")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but no GPU is visible")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: {torch.cuda.device_count()} GPU(s) visible, cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """``cpu (AMD EPYC, 2 cores)`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: which hardware the timings come from."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_model()}, {os.cpu_count()} cores)" if device.type == "cpu" else str(device)


def cpu_model() -> str:
    """The CPU's model name as the operating system reports it (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"
