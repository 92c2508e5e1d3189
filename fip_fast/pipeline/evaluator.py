"""One evaluation of the model during a purification: clean-validation metrics (for selection) and ``eval_fn``
(for the record only), timed.  Used on θ0, every ``eval_every`` steps and on the returned model."""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from fip_fast.pipeline.data import CleanSplit, LossFn, val_metrics
from fip_fast.pipeline.strategy import SingleProcess, sync

__all__ = ["Evaluator", "EvalFn", "RunnerEvals"]

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


class RunnerEvals:
    """A runner's evaluations on the way (a :mod:`fip_fast.baselines` function with an ``on_step`` argument):
    ``on_step(done, loss)`` is called after each step (``done`` steps taken; ``loss``: that step's training loss,
    NaN for a skipped step) and evaluates the model every ``every`` steps, as the loop methods do — the same history
    record (``step``, ``train_loss`` = the mean finite loss since the last evaluation, clean-val metrics, ``eval``,
    ``elapsed_s``), so the report's curves have a point per evaluation for every method.  The last step (``done ==
    steps``) is left to :func:`~fip_fast.pipeline.purify`, which records the returned model after the runner.  The
    model's modes are restored after each evaluation (the runner continues in train mode); nothing random is drawn,
    so the run is the same with or without it.  ``seconds``: time spent here (kept out of the loop's timing)."""

    def __init__(self, model: nn.Module, evaluator: Evaluator, every: int, steps: int, t_total: float):
        if every < 1:
            raise ValueError(f"eval_every must be ≥ 1, got {every}")
        self.model, self.evaluator, self.every, self.steps, self.t_total = model, evaluator, every, steps, t_total
        self.records: List[Dict[str, Any]] = []
        self.seconds = 0.0
        self._loss_sum, self._loss_n = 0.0, 0

    def __call__(self, done: int, loss: float) -> None:
        if math.isfinite(loss):
            self._loss_sum, self._loss_n = self._loss_sum + loss, self._loss_n + 1
        if done % self.every or done >= self.steps:
            return
        t0 = time.perf_counter()
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            rec = {"step": done, "train_loss": self.pop_loss(), **self.evaluator(self.model),
                   "elapsed_s": time.perf_counter() - self.t_total}
        finally:
            for m, t in modes:
                m.training = t
        self.records.append(rec)
        self.seconds += time.perf_counter() - t0

    def pop_loss(self) -> float:
        """The mean finite loss since the last evaluation (NaN when none), and a fresh start."""
        out = self._loss_sum / self._loss_n if self._loss_n else float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        return out
