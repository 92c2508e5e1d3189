"""What the purify loop drives: :class:`Purifier` (the interface of ``kind="loop"`` methods), the
:class:`OptimizerPurifier` made of a model + optimizer + loss, and the :class:`MethodContext` a builder gets."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast.pipeline.data import LossFn

__all__ = ["MethodContext", "Purifier", "OptimizerPurifier"]


@dataclass
class MethodContext:
    """What a ``kind="loop"`` builder gets besides the model and its options."""

    x_train: Tensor                 # the purification part of the clean data (CPU or device)
    y_train: Tensor
    device: torch.device
    loss_fn: LossFn
    seed: int
    progress: bool
    resuming: bool = False          # True when the optimizer state will be loaded from a checkpoint
    rank: int = 0                   # this process's rank and the number of processes (purify(distributed=…))
    world_size: int = 1

    def fisher_loader(self, batch_size: int = 128) -> List[Tuple[Tensor, Tensor]]:
        """The purification data as a list of batches (no replacement), for Fisher estimation.

        In a distributed run (``world_size > 1``) only this rank's contiguous share of the samples
        (:func:`fip_fast.integrations.distributed.shard_indices`): :func:`fip_fast.estimate_fisher` all-reduces the
        sums and sample counts, so every rank gets F0 of the whole purification part."""
        lo, hi = 0, self.x_train.shape[0]
        if self.world_size > 1:
            from fip_fast.integrations.distributed import shard_indices

            r = shard_indices(hi, self.rank, self.world_size)
            lo, hi = r.start, r.stop
        return [(self.x_train[i:min(i + batch_size, hi)], self.y_train[i:min(i + batch_size, hi)])
                for i in range(lo, hi, batch_size)]


class Purifier:
    """What the purify loop drives (``kind="loop"`` methods).  Subclass or use :class:`OptimizerPurifier`."""

    params: List[Tensor] = []
    optimizer: Optional[torch.optim.Optimizer] = None

    def step(self, x: Tensor, y: Tensor) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def unperturbed(self) -> ContextManager:
        """Inside the block the model holds its true (unperturbed) weights."""
        return contextlib.nullcontext()

    def finalize(self, model: nn.Module) -> nn.Module:
        """Called once at the end with unperturbed weights: e.g. merge a reparameterization back."""
        return model

    def distribute(self, wrap: Optional[Callable[[nn.Module], nn.Module]]) -> None:
        """Run the training forward/backward of :meth:`step` through ``wrap(model)`` from now on (``purify``
        passes a ``DistributedDataParallel`` wrapper under ``distributed="ddp"``); ``wrap=None`` goes back to the
        plain model.  A purifier that cannot do this does not support distributed purification."""
        raise NotImplementedError(f"{type(self).__name__} does not implement distribute(): this method cannot run "
                                  "under purify(distributed=…); use OptimizerPurifier or implement distribute()")

    @property
    def skipped_steps(self) -> int:
        return int(getattr(self.optimizer, "skipped_steps", 0) or 0)

    def info(self) -> Dict[str, Any]:
        return {}


def _bn_stats_snapshot(model: nn.Module) -> List[Tuple[Tensor, Tensor]]:
    """Copies of every BatchNorm running statistic (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    from torch.nn.modules.batchnorm import _NormBase

    out: List[Tuple[Tensor, Tensor]] = []
    for m in model.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name, None)
                if buf is not None:
                    out.append((buf, buf.detach().clone()))
    return out


def _bn_stats_restore(snapshot: List[Tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


class OptimizerPurifier(Purifier):
    """A purifier made of a model, an optimizer and a loss: ``optimizer.step(closure)`` per batch.

    The closure zeroes the gradients, runs the model in train mode and back-propagates ``loss_fn`` (mean
    cross-entropy by default) — the FIP optimizer calls it a second time on ``"fd"`` suppressor steps.

    A step the optimizer skips (non-finite gradients: its ``skipped_steps`` count goes up) leaves the
    parameters untouched; :meth:`step` then also restores the BatchNorm running statistics, which the forward
    pass of the closure already updated with the very batch statistics (often NaN / Inf) that caused the skip.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Optional[LossFn] = None,
                 finalize: Optional[Callable[[nn.Module], nn.Module]] = None,
                 penalty: Optional[Callable[[], Tensor]] = None):
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or F.cross_entropy
        self.penalty = penalty
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._finalize = finalize

    def step(self, x: Tensor, y: Tensor) -> float:
        from fip_fast.optim import frozen_running_stats

        model, opt, loss_fn = self.model, self.optimizer, self.loss_fn

        def closure():
            opt.zero_grad(set_to_none=True)
            # The perturbed (second) pass must not fold θ + e's statistics into BatchNorm's running estimates.
            with frozen_running_stats(model) if getattr(opt, "perturbed_pass", False) else contextlib.nullcontext():
                out = model(x)
            loss = loss_fn(out, y)
            if self.penalty is not None:
                loss = loss + self.penalty()
            if hasattr(opt, "backward"):
                opt.backward(loss)
            else:
                loss.backward()
            return loss

        model.train()
        skipped0 = self.skipped_steps
        bn = _bn_stats_snapshot(model)
        loss = opt.step(closure)
        if bn and self.skipped_steps > skipped0:
            _bn_stats_restore(bn)
        return float(loss.detach()) if isinstance(loss, Tensor) else (float(loss) if loss is not None else float("nan"))

    def unperturbed(self) -> ContextManager:
        fn = getattr(self.optimizer, "unperturbed", None)
        return fn() if fn is not None else contextlib.nullcontext()

    def finalize(self, model: nn.Module) -> nn.Module:
        return self._finalize(model) if self._finalize is not None else model

    def distribute(self, wrap: Optional[Callable[[nn.Module], nn.Module]]) -> None:
        """The closure calls ``wrap(model)`` (e.g. DDP) instead of the model; ``wrap=None`` undoes it."""
        base = getattr(self, "_base_model", None)
        if wrap is None:
            if base is not None:
                self.model, self._base_model = base, None
            return
        if base is not None:
            raise RuntimeError("distribute() was already called; call distribute(None) first")
        self._base_model = self.model
        self.model = wrap(self.model)

