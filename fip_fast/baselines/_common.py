"""Plumbing shared by the baselines: batches sampled from the clean set, freezing, counting, timing, the lr
schedule, the ``info`` dict.  The one import surface of the baseline modules: what they share from elsewhere in
``fip_fast`` (:func:`~fip_fast._utils.model_device`, :func:`~fip_fast._utils.split_batch`,
:func:`~fip_fast.optim.frozen_running_stats`) is re-exported here.

The common calling convention of every baseline::

    model, info = run_<name>(model, clean_loader, steps=…, lr=…, *, batch_size=128, seed=0, device=None,
                             loss_fn=None, progress=True, **method_options)

* ``model`` is purified **in place** and returned (in eval mode, ``requires_grad`` flags as they were).
* ``clean_loader`` is either an iterable of ``(x, y)`` batches (a ``DataLoader``, a list of tuples, dicts with
  ``x``/``y`` or ``input_ids``/``labels``) — cycled when exhausted — or a pair of tensors ``(x, y)`` holding the
  whole clean set, from which mini-batches of ``batch_size`` are drawn **with replacement** (the authors' FIP
  protocol: 2000 iterations sampled with replacement from 1 % of the data).
* ``augment=None`` (ft, ft_sam, ngf, salience_ar): an augmentation of the training batches (a spelling of
  :func:`fip_fast.augment.make_augment`, e.g. ``"shift"``) passed to :func:`batch_stream`; the fixed batches of a
  Fisher or salience estimate (:func:`fixed_batches`) stay unaugmented.  :func:`fip_fast.pipeline.purify` passes
  its ``augment=`` on to a runner that accepts it.
* ``info`` is a plain dict: ``method``, ``steps``, ``wall_time_s`` (purification only, CUDA-synchronized),
  ``trainable_params`` (number of scalars the method updates), ``loss_history`` (a few (step, loss) pairs),
  ``skipped_steps`` (non-finite gradients), plus method-specific entries.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast._utils import model_device, split_batch  # noqa: F401  (re-exported to the baselines)
from fip_fast.optim import frozen_running_stats  # noqa: F401  (re-exported to the baselines)

logger = logging.getLogger("fip_fast")

LossFn = Callable[[Tensor, Tensor], Tensor]


def _is_tensor_pair(obj: Any) -> bool:
    return (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj)
            and obj[0].dim() >= 1 and obj[1].dim() >= 1 and obj[0].shape[0] == obj[1].shape[0]
            and obj[0].shape[0] > 1)


def batch_stream(clean_loader: Any, batch_size: int = 128, seed: int = 0,
                 device: Optional[torch.device] = None, augment: Any = None) -> Iterator[tuple[Tensor, Tensor]]:
    """An endless stream of ``(x, y)`` mini-batches on ``device`` (see the module docstring).

    A pair of tensors is sampled with replacement by a private ``torch.Generator`` seeded with ``seed``; any other
    iterable is re-iterated when exhausted (its own shuffling, if any, applies).  ``augment``: ``None`` or a
    spelling of :func:`fip_fast.augment.make_augment` (e.g. ``"shift"``) — every batch's inputs are drawn
    through it (its own generator, seeded from ``seed``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if augment is not None:
        yield from _augmented(batch_stream(clean_loader, batch_size, seed, device), augment, seed)
        return
    if _is_tensor_pair(clean_loader):
        x, y = clean_loader
        g = torch.Generator().manual_seed(int(seed))
        n = x.shape[0]
        while True:
            idx = torch.randint(n, (batch_size,), generator=g)
            xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
            yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)
    else:
        empty = True
        while True:
            for batch in clean_loader:
                empty = False
                xb, yb = split_batch(batch)
                yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)
            if empty:
                raise ValueError("clean_loader yielded no batches")


def _augmented(stream: Iterator[tuple[Tensor, Tensor]], augment: Any, seed: int
               ) -> Iterator[tuple[Tensor, Tensor]]:
    from fip_fast.augment import make_augment

    g = torch.Generator().manual_seed(int(seed) + 104_729)
    fn = None
    for x, y in stream:
        if fn is None:
            fn = make_augment(augment, x[0])      # one sample: a batch of signals (N, C, T) is no image
            if fn is None:          # "none": pass through
                yield x, y
                yield from stream
                return
        yield fn(x, g), y


def clean_tensors(clean_loader: Any, max_batches: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The clean set as one ``(x, y)`` pair (concatenating the loader's batches once)."""
    if _is_tensor_pair(clean_loader):
        return clean_loader[0], clean_loader[1]
    xs, ys = [], []
    for b, batch in enumerate(clean_loader):
        if max_batches is not None and b >= max_batches:
            break
        x, y = split_batch(batch)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("clean_loader yielded no batches")
    return torch.cat(xs), torch.cat(ys)


def fixed_batches(clean_loader: Any, batch_size: int = 128, max_batches: Optional[int] = None
                  ) -> list[tuple[Tensor, Tensor]]:
    """The clean set as a finite list of batches, in order, without replacement (for Fisher / salience)."""
    if _is_tensor_pair(clean_loader):
        x, y = clean_loader
        out = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    else:
        out = [split_batch(b) for b in clean_loader]
    if max_batches is not None:
        out = out[:max_batches]
    if not out:
        raise ValueError("clean_loader yielded no batches")
    return out


def count_trainable(params: Iterable[Tensor]) -> int:
    return int(sum(p.numel() for p in params))


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Sequence[Tensor]):
    """Inside the block exactly ``params`` have ``requires_grad``; every flag is restored on exit."""
    ids = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


@contextlib.contextmanager
def module_modes(model: nn.Module, train: bool):
    """Set the whole model to train/eval mode inside the block; restore each module's own flag afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, t in saved:
            m.training = t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block, synchronizing CUDA at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="step")


def grads_finite(params: Sequence[Tensor]) -> bool:
    gs = [p.grad for p in params if p.grad is not None]
    if not gs:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in gs]).all())


def default_loss(loss_fn: Optional[LossFn]) -> LossFn:
    return loss_fn if loss_fn is not None else F.cross_entropy


def history_every(steps: int, points: int = 20) -> int:
    return max(1, int(math.ceil(steps / points)))


SCHEDULES = ("cosine", "constant")


def check_schedule(lr_schedule: str) -> None:
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")


def lr_factor(lr_schedule: str, t: int, steps: int) -> float:
    """Multiplier of the base learning rate at step ``t`` (0-based) of ``steps``: ``"cosine"`` decays as
    0.5·(1 + cos(π·t/steps)) — the same rule as :func:`fip_fast.pipeline.purify`'s loop — ``"constant"`` is 1."""
    if lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * t / max(1, steps)))


def set_lr(opt: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    for g, lr in zip(opt.param_groups, base_lrs):
        g["lr"] = lr * factor


def check_common(steps: int, lr: float, lr_schedule: Optional[str] = None) -> None:
    """Validate the arguments every runner takes: ``steps`` an int ≥ 0, ``lr`` finite ≥ 0 and, where given,
    ``lr_schedule`` one of :data:`SCHEDULES`."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int ≥ 0, got {steps!r}")
    if not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number ≥ 0, got {lr!r}")
    if lr_schedule is not None:
        check_schedule(lr_schedule)


def check_sgd(momentum: float, weight_decay: float) -> None:
    """Validate SGD's ``momentum`` ∈ [0, 1) and ``weight_decay`` finite ≥ 0."""
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}")

def setup_run(model: nn.Module, device: Optional[torch.device], loss_fn: Optional[LossFn]
              ) -> tuple[torch.device, LossFn]:
    """``(device, loss_fn)`` of a run: ``device`` (default the model's), to which the model is moved, and
    ``loss_fn`` (default cross-entropy)."""
    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev)
    return dev, default_loss(loss_fn)


class LrSchedule:
    """Sets each param group's lr of ``opt`` to its value at construction times a factor.

    :meth:`at` uses :func:`lr_factor` (``lr_schedule`` over ``steps``); :meth:`scale` takes any factor (Super-FT's
    own schedules).
    """

    def __init__(self, opt: torch.optim.Optimizer, lr_schedule: str = "cosine", steps: int = 1):
        self.opt, self.lr_schedule, self.steps = opt, lr_schedule, steps
        self.base_lrs = [g["lr"] for g in opt.param_groups]

    def at(self, t: int) -> None:
        """The lr of step ``t`` (0-based)."""
        self.scale(lr_factor(self.lr_schedule, t, self.steps))

    def scale(self, factor: float) -> None:
        set_lr(self.opt, self.base_lrs, factor)


#: ``on_step(done, loss)``: called by a runner after each step — ``done`` steps taken, ``loss`` that step's training
#: loss as a float (NaN for a skipped step).  :func:`fip_fast.pipeline.purify` passes one that evaluates the model
#: every ``eval_every`` steps (:class:`fip_fast.pipeline.evaluator.RunnerEvals`), so a runner's report has a curve.
StepHook = Callable[[int, float], None]


class RunLog:
    """A run's progress bar, its ``loss_history`` — ``(step, loss)`` at about ``points`` evenly spaced steps
    (:func:`history_every`) and at the last one — and the caller's ``on_step`` hook (:data:`StepHook`), whose time
    (``hook_seconds``) :func:`run_info` keeps out of ``wall_time_s``."""

    def __init__(self, steps: int, desc: str, progress: bool, points: int = 20, on_step: Optional[StepHook] = None):
        self.steps, self.every = steps, history_every(steps, points)
        self.loss_history: list[tuple[int, float]] = []
        self.bar = progress_bar(steps, desc, progress)
        self.on_step, self.hook_seconds = on_step, 0.0
        self.skipped = 0            # steps reported through skip()

    def due(self, t: int) -> bool:
        """Whether step ``t`` (0-based) is one whose values are recorded."""
        return t % self.every == 0 or t == self.steps - 1

    def record(self, t: int, loss: Tensor) -> None:
        """Step ``t`` done: keep its loss if :meth:`due`, advance the bar, call the hook."""
        if self.due(t):
            self.loss_history.append((t, float(loss.detach())))
        self.bar.update(1)
        self._hook(t, loss)

    def skip(self, t: int) -> None:
        """Step ``t`` skipped (a non-finite gradient): count it, advance the bar, call the hook with a NaN loss."""
        self.skipped += 1
        self.bar.update(1)
        self._hook(t, None)

    def _hook(self, t: int, loss: Optional[Tensor]) -> None:
        if self.on_step is not None:
            t0 = time.perf_counter()
            self.on_step(t + 1, float(loss.detach()) if loss is not None else float("nan"))
            self.hook_seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.bar.close()

@contextlib.contextmanager
def training(model: nn.Module, params: Sequence[Tensor], train: bool):
    """Inside the block exactly ``params`` have ``requires_grad`` and the model is in train (``train=True``) or
    eval mode; flags and modes are restored on exit (:func:`only_trainable` inside :func:`module_modes`)."""
    with only_trainable(model, params), module_modes(model, train):
        yield


def run_info(method: str, steps: int, timer: Timer, params: Iterable[Tensor], log: RunLog,
             skipped_steps: Optional[int] = None, **extra: Any) -> dict:
    """The ``info`` dict of a run: the common keys (module docstring), then ``extra`` in its order.
    ``skipped_steps``: the steps :meth:`RunLog.skip` counted, unless the caller counts them elsewhere (an optimizer
    that skips inside its own ``step``)."""
    return {"method": method, "steps": steps, "wall_time_s": timer.seconds - log.hook_seconds,
            "trainable_params": count_trainable(params), "loss_history": log.loss_history,
            "skipped_steps": log.skipped if skipped_steps is None else skipped_steps, **extra}


def upcast(t: Tensor) -> Tensor:
    """At least fp32 arithmetic: ``t`` in fp32, an fp64 ``t`` as it is (for the fp64 reference checks)."""
    return t if t.dtype == torch.float64 else t.float()


PathOrModule = Union[str, nn.Module]


def find_layer(model: nn.Module, layer: Optional[PathOrModule] = None,
               types: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> tuple[str, nn.Module]:
    """``(name, module)``: ``layer`` by qualified name (or the module itself); default the **last** module of
    ``types`` in ``model.named_modules()`` order — for a classifier, its output layer."""
    named = list(model.named_modules())
    if layer is None:
        cands = [(n, m) for n, m in named if isinstance(m, types)]
        if not cands:
            raise ValueError(f"model has no layer of type {[t.__name__ for t in types]}")
        return cands[-1]
    if isinstance(layer, nn.Module):
        for n, m in named:
            if m is layer:
                return n, m
        raise ValueError("layer is not a sub-module of model")
    mods = dict(named)
    if layer not in mods:
        raise ValueError(f"model has no sub-module named {layer!r}; e.g. "
                         f"{[n for n, m in named if isinstance(m, types)][-5:]}")
    return layer, mods[layer]
