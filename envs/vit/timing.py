"""The one timer of the project: wall-clock seconds per call, synchronised with the device.

GPU kernels run asynchronously, so a timer that does not wait for them measures the launch, not the work;
every call here is followed by a device sync (a no-op on the CPU). ``evaluate.py``'s images/s columns and
the benchmarks use it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the queued work of ``device`` (CUDA only; CPU work is synchronous)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], object], *, repeats: int = 5, seconds: float = 0.0, warmup: int = 1,
                device: torch.device | str | None = None) -> list[float]:
    """Seconds of each of at least ``repeats`` calls of ``fn`` (more until ``seconds`` have passed), after
    ``warmup`` untimed calls; each call ends with a device sync."""
    for _ in range(warmup):
        fn()
        synchronize(device)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < repeats or time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], **kwargs) -> float:
    """Median of :func:`timed_calls` (same arguments)."""
    return statistics.median(timed_calls(fn, **kwargs))


def images_per_second(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int,
                      repeats: int) -> float:
    """Median throughput of ``run`` over all of ``images`` in batches of ``batch_size``, after a warm-up pass."""
    def one_pass() -> None:
        for start in range(0, len(images), batch_size):
            run(images[start:start + batch_size])

    return len(images) / median_seconds(one_pass, repeats=repeats, device=images.device)
