"""The one timer of the project: wall-clock seconds per call, synchronised with the device.

GPU kernels run asynchronously, so a timer that does not wait for them measures the launch, not the work;
every call here is followed by a device sync (a no-op on the CPU). ``evaluate.py``'s images/s columns and
the benchmarks use it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)
ROUND_ORDER_SEED = 0
"""The seed of the orders :func:`images_per_second_in_turns` takes the runs in, round by round: the same runs are
timed in the same orders each time."""


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


def median_seconds(fn: Callable[[], object], **kwargs: Any) -> float:
    """Median of :func:`timed_calls` (same arguments)."""
    return statistics.median(timed_calls(fn, **kwargs))


def batches_pass(run: Callable[[torch.Tensor], object], images: torch.Tensor,
                 batch_size: int) -> Callable[[], None]:
    """One pass of ``run`` over all of ``images`` in batches of ``batch_size``."""
    def one_pass() -> None:
        for start in range(0, len(images), batch_size):
            run(images[start:start + batch_size])

    return one_pass


def images_per_second(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int,
                      repeats: int) -> float:
    """Median throughput of ``run`` over all of ``images`` in batches of ``batch_size``, after a warm-up pass."""
    return len(images) / median_seconds(batches_pass(run, images, batch_size), repeats=repeats, device=images.device)


def images_per_second_in_turns(runs: Mapping[Key, Callable[[torch.Tensor], object]], images: torch.Tensor,
                               batch_size: int, rounds: int, warmup_rounds: int = 1,
                               on_pass: Callable[[], object] | None = None) -> dict[Key, list[float]]:
    """Each run's images/s over all of ``images`` in batches of ``batch_size``, once per round, the runs in turn
    within each round, after ``warmup_rounds`` untimed rounds (which compile what was compiled; CUDA graphs
    are recorded on a function's second call); ``on_pass`` is called after each pass (a progress bar's update).

    A machine shared with other work drifts by tens of percent within a minute, more than the rows of a table
    differ. Timed one after the other, each run would see a different machine; timed in turns, every run sees
    the drift of each round, and a ratio taken within the round (:func:`ratios_within_rounds`) cancels it.
    A round of many runs lasts long enough to drift within it, so each round takes the runs in an order of its
    own, drawn with :data:`ROUND_ORDER_SEED`: no run has a fixed place in the rounds, and a drift within them adds
    noise to a ratio, not a bias.
    """
    passes = [(key, batches_pass(run, images, batch_size)) for key, run in runs.items()]
    rates: dict[Key, list[float]] = {key: [] for key in runs}
    orders = random.Random(ROUND_ORDER_SEED)
    for round_index in range(warmup_rounds + rounds):
        for key, one_pass in orders.sample(passes, len(passes)):
            (seconds,) = timed_calls(one_pass, repeats=1, warmup=0, device=images.device)
            if round_index >= warmup_rounds:
                rates[key].append(len(images) / seconds)
            if on_pass is not None:
                on_pass()
    return rates


def ratios_within_rounds(rates: Mapping[Key, Sequence[float]], reference: Key) -> dict[Key, list[float]]:
    """Each run's rate divided by ``reference``'s in the same round (:func:`images_per_second_in_turns`)."""
    return {key: [value / base for value, base in zip(values, rates[reference], strict=True)]
            for key, values in rates.items()}


def round_spread(rates: Sequence[float]) -> float:
    """A run's fastest round over its slowest (:func:`images_per_second_in_turns`): 1 on a steady machine; far above
    it, the machine was busy with other work during some rounds, and a median of them may not describe it."""
    return max(rates) / min(rates)
