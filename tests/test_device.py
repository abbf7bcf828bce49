"""envs/vit/device.py: the ``--device`` names of backbone.py and evaluate.py, on a machine with a GPU or without
one (torch.cuda is patched, so these run the same wherever the tests do)."""

from __future__ import annotations

import re

import pytest
import torch

from envs.errors import UsageError
from envs.vit.device import describe_device, resolve_device


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that sees two GPUs, the current one cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Test GPU {torch.device(device).index}")


def test_auto_is_the_gpu_when_one_is_visible(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert describe_device(resolve_device("auto")) == "cuda:0 (Test GPU 0)"


def test_cuda_without_an_index_is_the_current_gpu(two_gpus, monkeypatch):
    """Where tensors made on ``cuda`` go: the current GPU, cuda:1 after ``torch.cuda.set_device(1)``."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert re.fullmatch(r"cpu \(.+, \d+ cores\)", describe_device(torch.device("cpu")))  # the CPU's model


@pytest.mark.parametrize(("name", "gpus", "message"), [
    ("bogus", 0, "--device 'bogus' is not a torch device: auto, cpu, cuda, cuda:1, ..."),
    ("meta", 0, "--device 'meta': this project runs on the CPU or a CUDA GPU (auto, cpu, cuda, cuda:1, ...)"),
    ("cuda", 0, "--device cuda requested but no GPU is visible"),
    ("cuda:2", 2, "--device cuda:2: 2 GPU(s) visible, cuda:0 to cuda:1"),
])
def test_bad_devices_are_refused_with_what_would_do(name, gpus, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UsageError) as error:
        resolve_device(name)
    assert str(error.value) == message
