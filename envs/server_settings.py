"""What defines a ViT server (``envs.vit_server``), in a module without Ray.

Tools that never start a server still need its defaults: ``benchmarks/engine_throughput.py`` measures the
engine at the batch sizes the server forms, on a GPU box that has no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envs.problem import PruningProblem


@dataclass(frozen=True)
class ServerSettings:
    """Everything that defines a server: the problem it serves, which images, and its resources."""

    problem: PruningProblem = field(default_factory=PruningProblem)
    split: str = "train"
    limit: int | None = None  # serve a seeded subset of this many images of the split
    max_batch: int = 256  # images one engine call takes at most (more wait for the next drain)
    max_wait_ms: float | None = None  # None: 2 ms on a GPU, 0 on a CPU (see envs.vit_server)
    download: bool = False  # fetch CIFAR-10/100 into the problem's data_dir when absent (on the driver)
    memory_budget_mb: float | None = None  # above this, images are read from their files (envs/vit/data.py)
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    torch_threads: int = 1
    max_restarts: int = 5
