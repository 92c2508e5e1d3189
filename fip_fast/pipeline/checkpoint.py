"""Checkpoint / resume of the purify loop: the loop state saved through :class:`fip_fast.io.Checkpointer` (atomic,
weights-only) with fingerprints of θ0, of the options that shape the run and of the clean data — a checkpoint of
another run is refused (:class:`ResumeMismatchError`) instead of silently returning that run's weights."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fip_fast.pipeline.report import _jsonable

__all__ = ["ResumeMismatchError", "LoopCheckpoint", "open_checkpoint", "theta0_fingerprint"]


class ResumeMismatchError(ValueError):
    """``resume=True`` found a checkpoint written for another model, configuration or clean set."""


def _tensor_fingerprint(items: Iterable[Tuple[str, Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in the given (fixed) order."""
    h = hashlib.sha256()
    for k, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_NOT_FINGERPRINTED = ("device", "distributed", "world_size", "batchnorm")   # where it runs, not what it computes
# Options added after checkpoints were first written: left out of the fingerprint at these (default) values, so
# that a checkpoint written before the option existed still resumes.
_ADDED_LATER = {"augment": "none"}


def _run_fingerprint(theta0: str, config: Dict[str, Any], data: Sequence[Tensor]) -> Dict[str, str]:
    """What a checkpoint must match to be resumed: θ0, the options that shape the run, the clean data."""
    cfg = {k: v for k, v in config.items()
           if k not in _NOT_FINGERPRINTED and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
    return {"theta0": theta0, "config": json.dumps(_jsonable(cfg), sort_keys=True),
            "data": _tensor_fingerprint(zip(("x_train", "y_train", "x_val", "y_val"), data))}


def _check_resume(extra: Dict[str, Any], fp: Dict[str, str], directory: Any) -> None:
    """Refuse to resume from another run's checkpoint: it would silently return that run's purified weights."""
    old = extra.get("fingerprint")
    if not isinstance(old, dict):
        raise ResumeMismatchError(f"checkpoint_dir {directory}: its checkpoint records no fingerprint of the model "
                                  "and options it was written for, so resuming from it cannot be verified; use an "
                                  "empty checkpoint_dir")
    what = {"theta0": "model (θ0: the initial weights differ)", "data": "clean data"}
    for key in ("theta0", "data"):
        if old.get(key) != fp[key]:
            raise ResumeMismatchError(f"checkpoint_dir {directory}: its checkpoint was written for another "
                                      f"{what[key]}; resuming would return another run's weights — pass the same "
                                      "model and clean data as the interrupted run, or another checkpoint_dir")
    if old.get("config") != fp["config"]:
        try:
            a, b = json.loads(old.get("config") or "{}"), json.loads(fp["config"])
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        except (TypeError, ValueError):
            diff = ["?"]
        raise ResumeMismatchError(f"checkpoint_dir {directory}: its checkpoint was written with other options "
                                  f"({', '.join(diff)} differ); resume with the same method and options, or use "
                                  "another checkpoint_dir")


def theta0_fingerprint(model: nn.Module) -> str:
    """θ0's fingerprint (every state-dict entry, sorted by name): taken before anything touches the model."""
    return _tensor_fingerprint(sorted(model.state_dict().items()))


class LoopCheckpoint:
    """The checkpoints of one purification: ``purify-<method>-*`` files in ``directory``, every ``every`` steps.

    Every checkpoint carries :func:`_run_fingerprint` under ``extra["fingerprint"]`` beside the loop state that
    the caller passes (history, selection, initial metrics)."""

    def __init__(self, directory: Any, every: int, method: str, fingerprint: Dict[str, str]):
        from fip_fast.io import Checkpointer

        self.directory, self.fingerprint = directory, fingerprint
        self._ckpt = Checkpointer(directory, every=max(1, int(every)), prefix=f"purify-{method}")
        self.every = self._ckpt.every

    def resumable(self) -> bool:
        """Whether the directory holds a checkpoint; raises :class:`ResumeMismatchError` if it is another run's."""
        latest = self._ckpt.load_latest()
        if latest is None:
            return False
        _check_resume(latest.get("extra") or {}, self.fingerprint, self.directory)
        return True

    def resume(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
               device: torch.device) -> Tuple[int, Dict[str, Any]]:
        """Load model, optimizer and RNG state of the latest checkpoint: ``(its step, its extra dict)``."""
        start = self._ckpt.resume(model, optimizer, restore_rng=True, map_location=device)
        extra = dict(self._ckpt.extra or {})
        _restore_w0(model, extra.pop(_W0_KEY, None) or {})
        return start, extra

    def save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
             state: Dict[str, Any]) -> None:
        extra = {"fingerprint": self.fingerprint, **state}
        w0 = _spectral_w0(model)
        if w0:
            extra[_W0_KEY] = w0
        self._ckpt.save(step, model, optimizer, extra=extra)


#: Fast FIP's W0 (a non-persistent buffer: the model's state dict does not carry it) travels in the checkpoint's
#: extra dict, so that a resumed run re-derives its weights from the very W0 of the interrupted one — re-deriving
#: W0 from the loaded W(δ) (what loading a bare state dict does) is exact only up to rounding, which the further
#: steps amplify
_W0_KEY = "spectral_W0"


def _spectral_w0(model: nn.Module) -> Dict[str, Tensor]:
    from fip_fast.spectral import spectral_layers

    return {name: m.spectral_W0 for name, m in spectral_layers(model)}


@torch.no_grad()
def _restore_w0(model: nn.Module, saved: Dict[str, Tensor]) -> None:
    from fip_fast.spectral import spectral_layers

    for name, m in spectral_layers(model):
        w0 = saved.get(name)
        if w0 is not None and w0.shape == m.spectral_W0.shape:
            m.spectral_W0.copy_(w0)


def open_checkpoint(directory: Any, every: int, resume: bool, method: str, theta0: str, config: Dict[str, Any],
                    data: Sequence[Tensor]) -> Tuple[Optional[LoopCheckpoint], bool]:
    """``(checkpointer or None, resuming)``: whether the loop continues from a (verified) checkpoint."""
    if directory is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir")
        return None, False
    ckpt = LoopCheckpoint(directory, every, method, _run_fingerprint(theta0, config, data))
    return ckpt, bool(resume) and ckpt.resumable()
