"""Periodic, atomic, weights-only checkpoints of a loop and its resumption (:class:`Checkpointer`)."""
from __future__ import annotations

import contextlib
import random
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from fip_fast.io._atomic import atomic_path
from fip_fast.io._errors import PathLike


def _plain(obj: Any, where: str = "state") -> Any:
    """Convert ``obj`` to what ``torch.load(weights_only=True)`` accepts; fail loudly on anything else."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where} is a {type(obj).__name__}, which a weights-only checkpoint cannot hold")


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Periodic, atomic checkpoints of a training / purification loop, and resumption from the latest one.

    Each checkpoint ``<directory>/<prefix>-<step:08d>.pt`` is a ``torch.save`` of a plain dict
    ``{"step", "model", "optimizer", "rng", "extra"}`` that loads with ``weights_only=True``; optimizer state
    (momentum buffers, step counts, hyper-parameters such as ``betas`` tuples) is converted to plain types on
    the way out.  Only the newest ``keep`` checkpoints are kept.

    Usage::

        ckpt = Checkpointer("run/ckpt", every=100)
        start = ckpt.resume(model, optimizer)        # 0 when there is nothing to resume
        for step in range(start, total):
            ...
            ckpt.maybe_save(step + 1, model, optimizer)
    """

    _PATTERN = r"^{prefix}-(\d+)\.pt$"

    def __init__(self, directory: PathLike, every: int = 100, keep: int = 2, prefix: str = "ckpt"):
        if every < 1 or keep < 1:
            raise ValueError("every and keep must be ≥ 1")
        self.directory, self.every, self.keep, self.prefix = Path(directory), int(every), int(keep), prefix
        self._re = re.compile(self._PATTERN.format(prefix=re.escape(prefix)))
        self.extra: Dict[str, Any] = {}  # the "extra" dict of the checkpoint last resumed from

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step:08d}.pt"

    def checkpoints(self) -> List[Path]:
        """Existing checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._re.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the checkpoint for ``step`` atomically and prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "step": int(step),
            "model": _plain(model.state_dict(), "model"),
            "optimizer": _plain(optimizer.state_dict(), "optimizer") if optimizer is not None else None,
            "rng": _rng_state(),
            "extra": _plain(dict(extra or {}), "extra"),
        }
        path = self.path_for(step)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        for old in self.checkpoints()[:-self.keep]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return path

    def maybe_save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                   extra: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        """Save when ``step`` is a positive multiple of ``every``; return the path written, if any."""
        return self.save(step, model, optimizer, extra) if step > 0 and step % self.every == 0 else None

    def load_latest(self, map_location: Union[str, torch.device] = "cpu") -> Optional[Dict[str, Any]]:
        """The newest readable checkpoint's payload (``weights_only=True``), or None when there is none.

        A checkpoint that fails to load (e.g. truncated by a copy) is skipped in favour of the previous one.
        """
        for path in reversed(self.checkpoints()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # truncated / corrupt: IndexError, EOFError, UnpicklingError, RuntimeError…
                warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
                continue
        return None

    def resume(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               restore_rng: bool = True, map_location: Union[str, torch.device] = "cpu") -> int:
        """Restore model, optimizer and RNG states from the latest checkpoint; return its step (0 if none)."""
        payload = self.load_latest(map_location)
        if payload is None:
            return 0
        model.load_state_dict(payload["model"])
        if optimizer is not None and payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if restore_rng:
            _set_rng_state(payload["rng"])
        self.extra = payload.get("extra", {})
        return int(payload["step"])
