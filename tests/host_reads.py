"""Recorders of what would make a GPU wait for the device, or copy host data to it, run here on a CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Records the aten ops that, on a GPU, wait for the device or copy host data to it: reading a tensor's
    value (``item()``, ``int()``, ``bool()``, ``if tensor:``), making a tensor from Python data
    (``torch.tensor``), and the ops whose output size is a count of true elements, which the host reads back
    (``nonzero``, ``masked_select``, indexing with a boolean mask, as torchvision's autocontrast does)."""

    RECORDED = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default,
                torch.ops.aten.lift_fresh_copy.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.masked_select.default)
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._index_put_impl_.default)

    def __init__(self, calls: list[str]):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func in self.INDEXING and any(index is not None and index.dtype in (torch.bool, torch.uint8)
                                              for index in args[1])
        if func in self.RECORDED or masks:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_round_trips(monkeypatch) -> Iterator[list[str]]:
    """The calls inside that would make a GPU step wait for the device, or copy from the host, on a CPU.

    On the CPU every tensor is a host tensor, so three nets catch what would cross over on a GPU: the Python
    methods that read a tensor out or build one from host data, recorded by name; the aten ops of
    :class:`HostReads` (``int(tensor)`` and the like reach no Python method); and ``torch.device("meta")``
    as the default device, so that a tensor made without ``device=`` (a host tensor, on a GPU run) is a meta
    tensor, and a random draw without ``device=`` from the training device's generator fails outright.
    """
    calls: list[str] = []

    def recorded(call, name):
        def record(*args, **kwargs):
            calls.append(name)
            return call(*args, **kwargs)
        return record

    with monkeypatch.context() as patch:
        for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"),
                            (torch.Tensor, "numpy"), (torch, "tensor"), (torch, "as_tensor"), (torch, "from_numpy")):
            patch.setattr(owner, name, recorded(getattr(owner, name), name))
        with torch.device("meta"), HostReads(calls):
            yield calls
