"""The purify loop of ``kind="loop"`` methods: ``steps`` purifier steps on seeded with-replacement batches
(optionally augmented, :func:`step_batch`), the lr schedule, an evaluation every ``eval_every`` steps (asking
:class:`~fip_fast.pipeline.selection.Selection` what to keep and whether to stop), checkpoints, the progress bar
and the timings.

Where it runs (one process or DDP) is the business of the :mod:`~fip_fast.pipeline.strategy` it is given.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fip_fast.pipeline.checkpoint import LoopCheckpoint
from fip_fast.pipeline.data import CleanSplit, augment_generator, batch_indices
from fip_fast.pipeline.evaluator import Evaluator
from fip_fast.pipeline.options import LoopOptions
from fip_fast.pipeline.purifier import Purifier
from fip_fast.pipeline.report import PurifyReport
from fip_fast.pipeline.selection import Selection, _state_copy
from fip_fast.pipeline.strategy import SingleProcess, sync

logger = logging.getLogger("fip_fast")

__all__ = ["LoopPlan", "loop_plan", "step_batch", "PurifyLoop"]


@dataclass
class LoopPlan:
    """The shape of the run: ``steps`` optimizer steps of ``batch_size`` samples (global, over every rank),
    an evaluation every ``eval_every`` steps and at the end, the lr ``schedule``, the sampling ``seed`` and
    ``augment``, the augmentation of the training batches (``augment(x, generator) -> x``, or None)."""

    steps: int
    batch_size: int
    eval_every: int
    schedule: str
    seed: int
    augment: Any = None


#: Learning-rate schedules of the loop (the multiplier of every group's base lr at step t of T).
SCHEDULES = ("cosine", "constant", "onecycle", "cyclic")


def schedule_factor(name: str, step: int, steps: int) -> float:
    """``"cosine"``: ½(1 + cos(πt/T)).  ``"onecycle"``: a linear warm-up over the first 10 % of the steps (from
    1/25), then the cosine — the large rate arrives after BatchNorm and momentum have adapted to the clean data.
    ``"cyclic"``: two triangles from 1 % of the rate up to it and back (Super-FT's schedule)."""
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
    from fip_fast.baselines.superft import superft_lr_factor

    return superft_lr_factor(name, step, steps, warmup=max(1, round(0.1 * steps)))


def loop_plan(opts: Dict[str, Any], loop: LoopOptions, seed: int, augment: Any = None) -> LoopPlan:
    """Take ``steps`` and ``batch_size`` out of the method options (the builder does not get them);
    ``augment``: the resolved augmentation (:func:`fip_fast.augment.make_augment` of ``loop.augment``)."""
    n_steps = int(opts.pop("steps"))
    bs = int(opts.pop("batch_size"))
    if n_steps < 0 or bs < 1:
        raise ValueError(f"steps must be ≥ 0 and batch_size ≥ 1, got {n_steps}, {bs}")
    return LoopPlan(n_steps, bs, int(loop.eval_every or max(1, n_steps // 10)), loop.lr_schedule, seed, augment)


def step_batch(data: CleanSplit, plan: LoopPlan, step: int, strategy: SingleProcess,
               device: torch.device) -> Tuple[Tensor, Tensor]:
    """This process's part of the training batch of ``step``, on ``device``.

    The global batch (``batch_size`` indices, :func:`batch_indices`) is the same on every rank.  With an
    augmentation the *whole* global batch is augmented with the generator of ``(seed, step)``
    (:func:`augment_generator`) before this rank takes its slice: every rank of a distributed run, and a resumed
    run, trains on exactly the views of the uninterrupted single-process run.  Fisher estimation and clean
    validation never see augmented data."""
    idx = batch_indices(data.x_train.shape[0], plan.batch_size, plan.seed, step)   # same on every rank
    if plan.augment is None:
        idx = strategy.local_batch(idx, plan.batch_size)
        return data.x_train[idx].to(device, non_blocking=True), data.y_train[idx].to(device, non_blocking=True)
    pos = strategy.local_batch(torch.arange(idx.numel()), plan.batch_size)        # this rank's positions
    x = plan.augment(data.x_train[idx].to(device, non_blocking=True), augment_generator(plan.seed, step))
    return x[pos.to(x.device)], data.y_train[idx[pos]].to(device, non_blocking=True)


@dataclass
class LoopState:
    """Where the loop is.  start: the first step of this call (> 0 after a resume).  done: steps taken.
    loss_sum / loss_n: finite training losses since the last evaluation.  seconds: time in ``purifier.step``."""

    start: int = 0
    done: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    seconds: float = 0.0
    stopped: bool = False


class PurifyLoop:
    """``loop.resume()`` (optional), ``loop.run()``, ``model = loop.finish()``; results go into ``report``."""

    def __init__(self, name: str, model: nn.Module, purifier: Purifier, data: CleanSplit, plan: LoopPlan,
                 selection: Selection, evaluator: Evaluator, report: PurifyReport, *,
                 strategy: SingleProcess, checkpoint: Optional[LoopCheckpoint], device: torch.device,
                 progress: bool, t_total: float):
        self.name, self.model, self.purifier, self.data, self.plan = name, model, purifier, data, plan
        self.selection, self.evaluator, self.report = selection, evaluator, report
        self.strategy, self.ckpt, self.device, self.progress, self.t_total = (strategy, checkpoint, device,
                                                                             progress, t_total)
        self.state = LoopState()
        self._groups = purifier.optimizer.param_groups if purifier.optimizer is not None else []
        self._base_lrs = [g["lr"] for g in self._groups]     # captured before a resume overwrites them

    def resume(self) -> None:
        """Continue from the latest checkpoint: weights, optimizer, RNG, history, selection, θ0's metrics."""
        start, ex = self.ckpt.resume(self.model, self.purifier.optimizer, self.device)
        if int(self.strategy.broadcast(start)) != start:
            raise RuntimeError(f"rank {self.strategy.rank} resumed from step {start} but rank 0 from another step: "
                               f"every rank must see the same checkpoint directory {self.ckpt.directory}")
        self.report.history = list(ex.get("history", []))
        self.selection.load_state_dict(ex, self.device)
        load = getattr(self.purifier, "load_state_dict", None)     # a duck-typed purifier may hold nothing
        if load is not None:
            load(ex.get("purifier", {}))
        self.report.selected_step = self.selection.step
        if "initial" in ex:
            self.report.initial = ex["initial"]
            self.selection.a0 = self.report.initial.get("val_acc", self.selection.a0)
        self.report.resumed_from = self.state.start = self.state.done = start
        self._groups = self.purifier.optimizer.param_groups if self.purifier.optimizer is not None else []  # new
        logger.info("fip_fast.pipeline: resumed %s from step %d", self.name, start)

    def run(self) -> None:
        from tqdm.auto import tqdm

        plan, st = self.plan, self.state
        bar = tqdm(total=plan.steps, initial=st.start, desc=self.name, disable=not self.progress, leave=False,
                   unit="step")
        try:
            for step in range(st.start, plan.steps):
                self._train_step(step)
                bar.update(1)
                st.done = step + 1
                if st.done % plan.eval_every == 0 or st.done == plan.steps:
                    self._evaluate(bar)
                if self.ckpt is not None and (st.done % self.ckpt.every == 0 or st.stopped):
                    self._checkpoint()
                if st.stopped:
                    break
        finally:
            bar.close()
        self.report.steps_run = st.done
        self.report.timings["loop"] = st.seconds
        self.report.skipped_steps = self.purifier.skipped_steps

    def _train_step(self, step: int) -> None:
        plan, st, dev = self.plan, self.state, self.device
        xb, yb = step_batch(self.data, plan, step, self.strategy, dev)
        if plan.schedule != "constant":  # a decaying rate lets clean accuracy recover after the purifying steps
            fac = schedule_factor(plan.schedule, step, plan.steps)
            for g, b in zip(self._groups, self._base_lrs):
                g["lr"] = b * fac
        sync(dev)
        t0 = time.perf_counter()
        loss = self.purifier.step(xb, yb)
        sync(dev)
        st.seconds += time.perf_counter() - t0
        if math.isfinite(loss):
            st.loss_sum, st.loss_n = st.loss_sum + loss, st.loss_n + 1

    def _evaluate(self, bar: Any) -> None:
        """One history record; the selection policy takes it and says whether to stop."""
        st = self.state
        st.loss_sum, st.loss_n = self.strategy.reduce_loss(st.loss_sum, st.loss_n, self.device)
        with self.purifier.unperturbed():
            # NaN, not 0, when every step since the last evaluation had a non-finite loss.
            rec = {"step": st.done, "train_loss": st.loss_sum / st.loss_n if st.loss_n else float("nan"),
                   **self.evaluator(self.model),
                   "elapsed_s": time.perf_counter() - self.t_total}
            st.loss_sum, st.loss_n = 0.0, 0
            acc = rec.get("val_acc", float("nan"))
            rec["acceptable"] = self.selection.observe(st.done, acc, self.model, last=st.done == self.plan.steps)
            self.report.selected_step = self.selection.step
            self.report.history.append(rec)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}",
                            **({"val_acc": f"{acc:.3f}"} if self.data.has_val else {}))
            if self.selection.should_stop():
                self.report.stopped_early = st.stopped = True

    def _checkpoint(self) -> None:
        def write() -> None:
            with self.purifier.unperturbed():
                self.ckpt.save(self.state.done, self.model, self.purifier.optimizer,
                               {"history": self.report.history, **self.selection.state_dict(),
                                "initial": self.report.initial,
                                "purifier": getattr(self.purifier, "state_dict", dict)()})

        self.strategy.write_checkpoint(write)

    def finish(self) -> nn.Module:
        """The selected, unperturbed weights, merged back (``purifier.finalize``), in eval mode; final metrics."""
        report, purifier = self.report, self.purifier
        t0 = time.perf_counter()
        self.strategy.detach(purifier)
        with purifier.unperturbed():
            final_state = _state_copy(self.model) if self.selection.weights is None else self.selection.weights
        self.model.load_state_dict(final_state)
        report.selected_step = self.selection.step
        if report.selected_step != report.steps_run:
            logger.info("fip_fast.pipeline: returning the weights of step %d (clean-val selection)",
                        report.selected_step)
        # A lagged optimizer would re-apply its perturbation on the next step; the model is handed back here, so
        # the optimizer is dropped with the purifier.
        model = purifier.finalize(self.model)
        model.eval()
        report.timings["finalize"] = time.perf_counter() - t0
        report.final = self.evaluator(model)
        report.extra.update(purifier.info())
        report.timings["eval"] = self.evaluator.seconds
        report.timings["total"] = time.perf_counter() - self.t_total
        return model
