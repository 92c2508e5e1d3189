"""A counter of Triton kernel launches made by :mod:`fip_fast.kernels`, so tests can prove "one launch per call".

Every launch in this package goes through :func:`launch`, which bumps a process-wide counter per kernel name.
The counter costs one dict update per launch (nanoseconds next to a launch) and is always on, so a test
measures exactly the code path users run::

    from fip_fast.kernels import _launch_count as lc
    with lc.counting() as launches:
        kernels.fip_step_(...)
    assert launches.total == 1

Only launches of this package's Triton kernels are counted.  Torch ops that a wrapper issues itself (the two
projection matmuls of :func:`~fip_fast.kernels.spectral_linear_grad`, the one host-to-device copy of a pointer
table on a cache miss) are not kernel launches of this package and are documented where they happen.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import torch

_lock = threading.Lock()
_counts: Counter = Counter()


class _Snapshot:
    """Launches since the start of a :func:`counting` block: ``.total`` and ``.by_kernel`` (name → count)."""

    def __init__(self) -> None:
        self._start = Counter(_counts)

    @property
    def by_kernel(self) -> dict[str, int]:
        now = Counter(_counts)
        now.subtract(self._start)
        return {k: v for k, v in now.items() if v}

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())


@contextlib.contextmanager
def counting() -> Iterator[_Snapshot]:
    """Context manager yielding a live view of the launches made inside the block."""
    yield _Snapshot()


def total() -> int:
    """Launches since the process started (all kernels)."""
    return sum(_counts.values())


def _device_of(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def launch(kernel, grid, *args, device: torch.device | None = None, **kwargs):
    """``kernel[grid](*args, **kwargs)``, counted under the kernel's function name.

    Device guard: Triton launches on the *current* CUDA device (and its current stream), whatever the device of
    the pointers.  So when the tensors are on another GPU than the current one (model parallel,
    ``device_map="auto"``), the launch runs inside ``torch.cuda.device(device)``.  ``device`` is the tensors'
    device (the ops pass it; otherwise that of the first tensor argument).  The guard costs one
    ``current_device()`` query per CUDA launch and is entered only when the index differs."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
    with _lock:
        _counts[name] += 1
    if device is None:
        device = _device_of(args)
    if device is not None and device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        with torch.cuda.device(device.index):
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)
