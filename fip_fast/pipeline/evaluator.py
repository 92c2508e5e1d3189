"""One evaluation of the model during a purification: clean-validation metrics (for selection) and ``eval_fn``
(for the record only), timed.  Used on θ0, every ``eval_every`` steps and on the returned model."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from fip_fast.pipeline.data import CleanSplit, LossFn, val_metrics
from fip_fast.pipeline.strategy import SingleProcess, sync

__all__ = ["Evaluator", "EvalFn"]

#: ``eval_fn(model) -> dict`` (e.g. test ACC / ASR): recorded in the report, never used for selection.
EvalFn = Callable[[nn.Module], Dict[str, Any]]


class Evaluator:
    """``evaluator(model) -> {"val_loss", "val_acc"[, "eval"]}``; ``seconds``: the time spent in all calls."""

    def __init__(self, data: CleanSplit, loss_fn: LossFn, device: torch.device, eval_fn: Optional[EvalFn],
                 strategy: SingleProcess):
        self.data, self.loss_fn, self.device, self.eval_fn, self.strategy = data, loss_fn, device, eval_fn, strategy
        self.seconds = 0.0

    def __call__(self, model: nn.Module) -> Dict[str, Any]:
        sync(self.device)
        t0 = time.perf_counter()
        self.strategy.sync_buffers()
        out: Dict[str, Any] = {}
        if self.data.has_val:
            out = val_metrics(model, self.data.x_val, self.data.y_val, self.loss_fn, self.device,
                              shard=self.strategy.val_shard)
        if self.eval_fn is not None:
            out["eval"] = self.strategy.eval_fn(self.eval_fn, model)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out
