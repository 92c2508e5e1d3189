"""``fip_fast.pipeline``: the purification pipeline — one entry point for FIP, Fast FIP and the baselines.

::

    from fip_fast import purify
    model, report = purify(model, (x_clean, y_clean), method="fast_fip")   # or "fip", "ft", "ngf", …
    print(report.summary())

What :func:`purify` does for the built-in methods (``"fip"``, ``"fast_fip"``):

1. **Clean data.**  The clean set (a ``(x, y)`` pair of tensors, a ``Dataset`` or any iterable of ``(x, y)``
   batches — it is small by design, ≈1 % of the training data, and is materialized in memory once) is split,
   class-stratified and seeded, into a *purification* part and a *clean validation* part (``val_fraction``,
   default 0.2; or pass ``val_data=``).  Mini-batches are drawn **with replacement** from the purification part
   (the authors' protocol: a fixed number of iterations sampled with replacement); batch ``t`` depends only on
   ``(seed, t)``, so a resumed run sees exactly the batches the uninterrupted one would have.
2. **F0.**  The diagonal empirical Fisher of the trainable parameters at θ0 on the purification part
   (:func:`fip_fast.estimate_fisher`, exact per-sample estimator, BatchNorm in eval mode), **normalized by its
   maximum** per parameter group, so that F0 ∈ [0, 1] and η_r ≈ 1 means the same on every model
   (METHOD.md "Stability": with SGD the anchor is stable while lr·η_r·max F0 < 2·(1+μ); max-normalization makes
   that lr·η_r < 3.9 at μ = 0.95, whatever the model).  Fast FIP normalizes the δ group and the group of biases /
   BatchNorm affine parameters separately: their raw Fisher magnitudes are on different scales.
3. **Optimizer.**  :class:`fip_fast.FIP` (SGD + momentum, suppressor ``"fd"`` by default with a closure, or
   ``trace_estimator="lagged"``).  Fast FIP first calls :func:`fip_fast.spectral.reparameterize` with
   ``relative=True`` (s = S·(1+δ): δ is dimensionless, one step size fits every singular value) and lets the
   biases and BatchNorm affine parameters train beside δ (``fast_fip_extra="bias_bn"``, as the authors' layers
   leave them trainable), each group with its own learning rate and radius.
4. **Loop** of ``steps`` iterations with a tqdm bar; the learning rate of every group follows a cosine decay to 0
   over the run (``lr_schedule="cosine"``, default; ``"constant"`` keeps it) — a decaying rate lets clean
   accuracy recover at the end of a run whose early, large steps did the purifying; every ``eval_every`` steps the clean-validation loss and
   accuracy are measured, and ``eval_fn(model)`` (if given — e.g. test ACC/ASR) is called.  **eval_fn results go
   into the history only; nothing is ever selected on them.**
5. **Selection / early stopping on clean validation data only.**  Starting accuracy a0 = clean-val accuracy
   of θ0.  The returned weights are those of the *latest* evaluation whose clean-val accuracy is
   ≥ a0 − ``val_margin`` (default 0.03) — purification keeps pushing toward a flatter minimum, so the latest
   acceptable point is the most purified one; choosing the *best* clean accuracy instead would typically choose
   θ0 itself, backdoor included.  θ0 is never a candidate: if no evaluation is acceptable, the evaluation with
   the highest clean-val accuracy is returned (``report.history[i]["acceptable"]`` says which were).  If the accuracy stays below a0 − 2·``val_margin`` for ``patience``
   consecutive evaluations, the loop stops early (the run is degrading clean behaviour); ``patience=0`` never
   stops — the default of fip and fast_fip, whose large early steps first cost clean accuracy that the cosine
   decay then recovers (measured on the demo: clean-val 78–89 % mid-run, 94–99 % at the end).
6. **Finish.**  A lagged perturbation is removed (the returned weights are unperturbed); Fast FIP merges
   W(δ) back (:func:`fip_fast.spectral.merge`): the returned model is an ordinary model of the original
   architecture with no ``SpectralLayer`` left, in eval mode, with its ``requires_grad`` flags as they were.
7. **Checkpoint / resume.**  With ``checkpoint_dir=``, the loop state (model, optimizer, step, history,
   selection) is saved every ``checkpoint_every`` steps through :class:`fip_fast.io.Checkpointer` (atomic,
   weights-only); ``resume=True`` continues from the latest checkpoint of that directory.  Pass the *same*
   original model θ0 and data when resuming (the reparameterization and the batch sequence are recomputed from
   them; Fisher estimation is skipped — F0 and θ0 come back with the optimizer state).

The returned :class:`PurifyReport` holds the configuration, the history, timings, the clean-val metrics of θ0
and of the returned model, ``eval_fn`` of both, the number of trainable scalars and the selected step.

Method registry
---------------
Two kinds of plug-ins share the ``purify(model, clean, method=NAME, …)`` entry:

``kind="loop"`` — ``builder(model, ctx: MethodContext, **options) -> Purifier``
    The builder prepares the model (e.g. reparameterizes it) and returns a :class:`Purifier`, an object with
    ``step(x, y) -> loss``, ``params`` (the trainable tensors), ``optimizer`` (for checkpoints, may be None),
    ``unperturbed()`` (a context manager) and ``finalize(model) -> model``.  The method then gets everything
    above for free: sampling, periodic evaluation, clean-val selection, early stopping, checkpoints, resume.
    :class:`OptimizerPurifier` wraps any ``torch.optim.Optimizer`` (closure-based or not), so a baseline that is
    "some optimizer on the clean loss" is a few lines::

        from fip_fast.pipeline import register_method, OptimizerPurifier

        @register_method("my_ft", kind="loop", defaults={"lr": 0.01})
        def build_my_ft(model, ctx, lr):
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
            return OptimizerPurifier(model, opt, loss_fn=ctx.loss_fn)

``kind="runner"`` (the default) — ``fn(model, clean, steps=…, *, batch_size, seed, device, loss_fn, progress,
**options) -> (model, info_dict)``
    The calling convention of :mod:`fip_fast.baselines` (``run_ft``, ``run_ngf``, …): the runner does its own
    loop on the purification part of the clean data (a ``(x, y)`` pair).  :func:`purify` measures clean-val
    metrics and ``eval_fn`` before and after, times it and wraps ``info`` into the report (``report.extra``);
    periodic evaluation, selection and checkpoints are the runner's business.  ``steps``, ``lr`` and
    ``batch_size`` are passed only when given (``lr`` only if the runner accepts it), so each runner's own
    defaults apply otherwise.

``register_method(name, fn, kind=…, defaults=…, description=…, overwrite=False)`` registers (also usable as a
decorator); :func:`available_methods` lists the names.  ``fip_fast.baselines`` is imported on the first lookup
of an unknown name, so baselines that call ``register_method`` at import time plug in automatically.

Defaults (how they were chosen)
-------------------------------
See ``docs/demo.md``: on the bundled MNIST demo (backdoored demo CNN), the suppressor radius, learning rates and
step counts were chosen by a rule that looks at **clean validation data only** — the largest suppressor strength
whose clean-val accuracy stays within ``val_margin`` of the starting accuracy — and then confirmed over
several seeds and attacks.  Test ASR was never used to choose anything.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import json
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast._utils import model_device, split_batch

logger = logging.getLogger("fip_fast")

__all__ = [
    "purify",
    "PurifyReport",
    "Purifier",
    "OptimizerPurifier",
    "MethodContext",
    "MethodSpec",
    "register_method",
    "available_methods",
    "get_method",
    "DEFAULTS",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
EvalFn = Callable[[nn.Module], Dict[str, Any]]


# =============================================================================================== defaults
#: Defaults of the built-in methods (see the module docstring and docs/demo.md for how they were chosen).
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "fip": dict(
        steps=300, batch_size=64, lr=0.05, momentum=0.9, eta_F=0.005, eta_r=1.0, rho=0.5, max_mix=1.0,
        trace_every=1, trace_estimator="fd", weight_decay=0.03, patience=0,
    ),
    "fast_fip": dict(
        steps=150, batch_size=64, lr=0.1, momentum=0.9, eta_F=0.005, eta_r=1.0, rho=0.5, max_mix=1.0,
        trace_every=1, trace_estimator="fd", weight_decay=0.01, patience=0,
        lr_delta=0.5, rho_delta=2.0, relative=True, rank=None, fast_fip_extra="bias_bn",
    ),
}
_LOOP_DEFAULTS = dict(val_fraction=0.2, val_margin=0.03, patience=3, eval_every=None, lr_schedule="cosine")


# =============================================================================================== registry
@dataclass
class MethodSpec:
    """A registered purification method (see the module docstring, "Method registry")."""

    name: str
    fn: Callable[..., Any]
    kind: str = "runner"                    # "loop" | "runner"
    defaults: Dict[str, Any] = field(default_factory=dict)
    description: str = ""


_METHODS: Dict[str, MethodSpec] = {}
_PLUGINS_LOADED = False


def register_method(name: str, fn: Optional[Callable[..., Any]] = None, *, kind: str = "runner",
                    defaults: Optional[Dict[str, Any]] = None, description: str = "", overwrite: bool = False):
    """Register a purification method under ``name`` (usable as ``@register_method(name, …)``).

    Args:
        name: the ``method=`` string (case-insensitive).
        fn: ``kind="loop"``: ``builder(model, ctx, **options) -> Purifier``; ``kind="runner"``:
            ``fn(model, clean, steps=…, *, batch_size, seed, device, loss_fn, progress, **options) -> (model, info)``.
        defaults: default options (``steps``, ``batch_size``, ``lr`` and method-specific ones); user keyword
            arguments to :func:`purify` override them.
        overwrite: replace an existing registration instead of raising.
    """
    if kind not in ("loop", "runner"):
        raise ValueError(f"kind must be 'loop' or 'runner', got {kind!r}")

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name.lower()
        if key in _METHODS and not overwrite and _METHODS[key].fn is not f:
            raise ValueError(f"a purification method named {name!r} is already registered "
                             "(pass overwrite=True to replace it)")
        _METHODS[key] = MethodSpec(key, f, kind, dict(defaults or {}), description or (f.__doc__ or "").strip()
                                   .split("\n")[0])
        return f

    return deco(fn) if fn is not None else deco


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    try:
        importlib.import_module("fip_fast.baselines")
    except Exception as e:  # a broken optional plug-in must not break fip / fast_fip
        logger.warning("fip_fast.pipeline: importing fip_fast.baselines failed (%s: %s); baselines unavailable",
                       type(e).__name__, e)


def available_methods() -> List[str]:
    """Names accepted by ``purify(method=…)``."""
    _load_plugins()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    key = name.lower()
    if key not in _METHODS:
        _load_plugins()
    if key not in _METHODS:
        raise ValueError(f"unknown purification method {name!r}; available: {available_methods()}")
    return _METHODS[key]


# =============================================================================================== data helpers


def _as_tensors(clean: Any) -> Tuple[Tensor, Tensor]:
    """The clean set as one ``(x, y)`` pair of tensors (CPU or wherever they are)."""
    if isinstance(clean, (tuple, list)) and len(clean) == 2 and all(isinstance(t, Tensor) for t in clean):
        x, y = clean
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"clean data: {x.shape[0]} inputs but {y.shape[0]} labels")
        return x, y
    batches: Iterable[Any] = clean
    if isinstance(clean, torch.utils.data.DataLoader):
        batches = clean
    elif isinstance(clean, torch.utils.data.Dataset) and hasattr(clean, "__len__"):
        batches = torch.utils.data.DataLoader(clean, batch_size=256, shuffle=False)
    xs, ys = [], []
    for b in batches:
        x, y = split_batch(b)
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("the clean data yielded no samples")
    return torch.cat(xs), torch.cat(ys)


def _stratified_holdout(y: Tensor, fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """(train_idx, val_idx): ``fraction`` of every class (at least one sample of classes with ≥ 2) held out."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    tr, va = [], []
    yc = y.cpu()
    if yc.dim() != 1 or yc.is_floating_point():
        perm = torch.randperm(yc.shape[0], generator=g)
        k = int(round(fraction * yc.shape[0]))
        return perm[k:], perm[:k]
    for c in torch.unique(yc).tolist():
        idx = torch.nonzero(yc == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(fraction * idx.numel()))
        if fraction > 0 and k == 0 and idx.numel() >= 2:
            k = 1
        va.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Batch ``step``: ``batch_size`` indices drawn with replacement; a function of (seed, step) only."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2 ** 62))
    return torch.randint(n, (batch_size,), generator=g)


@torch.no_grad()
def _val_metrics(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, device: torch.device,
                 batch_size: int = 512, shard: Optional[Tuple[int, int]] = None) -> Dict[str, float]:
    """Clean-validation loss and accuracy, in eval mode (every module's own flag restored).

    ``shard=(rank, world)``: this rank evaluates its contiguous block of the N samples
    (:func:`fip_fast.integrations.distributed.shard_indices`) and the sums (loss·samples, correct, samples) are all-reduced,
    so every rank returns the same numbers — the metrics of all N samples."""
    if x.shape[0] == 0:
        return {"val_loss": float("nan"), "val_acc": float("nan")}
    lo, hi = 0, x.shape[0]
    if shard is not None:
        from fip_fast.integrations.distributed import shard_indices

        r = shard_indices(x.shape[0], *shard)
        lo, hi = r.start, r.stop
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        tot, correct, n = 0.0, 0, 0
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            xb, yb = x[i:j].to(device), y[i:j].to(device)
            out = model(xb)
            tot += float(loss_fn(out, yb)) * yb.shape[0]
            if out.dim() == 2 and yb.dim() == 1:
                correct += int((out.argmax(1) == yb).sum())
            n += yb.shape[0]
    finally:
        for m, t in modes:
            m.training = t
    if shard is not None:
        import torch.distributed as dist

        sums = torch.tensor([tot, float(correct), float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        tot, correct, n = float(sums[0]), int(sums[1]), int(sums[2])
    return {"val_loss": tot / n, "val_acc": correct / n}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =============================================================================================== purifiers
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
        (:func:`fip_fast.integrations.distributed.shard_indices`): :func:`fip_fast.estimate_fisher` all-reduces the sums and
        sample counts, so every rank gets F0 of the whole purification part."""
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


def _normalized_fisher(model: nn.Module, ctx: MethodContext, groups: Sequence[Sequence[Tensor]]
                       ) -> Dict[Tensor, Tensor]:
    """F0 of every tensor in ``groups``, each group normalized by its own maximum (see the module docstring)."""
    from fip_fast.fisher import estimate_fisher, normalize_fisher

    ps = [p for g in groups for p in g]
    if ctx.resuming:   # F0 and θ0 come back with the optimizer state; placeholders only
        return {p: torch.zeros_like(p, dtype=torch.float32) for p in ps}
    fisher = estimate_fisher(model, ctx.fisher_loader(), params=ps, estimator="per_sample",
                             device=ctx.device, progress=ctx.progress)
    out: Dict[Tensor, Tensor] = {}
    for g in groups:
        if g:
            out.update(normalize_fisher({p: fisher[p] for p in g}, "max"))
    return out


_FIP_OPTIONS = ("momentum", "weight_decay", "eta_F", "eta_r", "trace_every", "trace_estimator", "max_mix")


def _fip_kwargs(o: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(o) - set(_FIP_OPTIONS))
    if unknown:
        raise TypeError(f"unknown FIP option(s) {unknown}; known: {sorted(_FIP_OPTIONS)} plus lr, rho (and "
                        "lr_delta, rho_delta, relative, rank, fast_fip_extra, layer_types for fast_fip)")
    return dict(momentum=o["momentum"], weight_decay=o["weight_decay"], eta_F=o["eta_F"], eta_r=o["eta_r"],
                trace_every=int(o["trace_every"]), trace_estimator=o["trace_estimator"], max_mix=o["max_mix"])


def _build_fip(model: nn.Module, ctx: MethodContext, *, lr: float, rho: float, impl: str = "auto",
               **o: Any) -> Purifier:
    """Full FIP: every trainable parameter, one group, F0 normalized by its maximum."""
    from fip_fast.optim import FIP

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    f0 = _normalized_fisher(model, ctx, [params]) if o["eta_r"] > 0 else None
    opt = FIP(params, lr=lr, rho=rho, fisher0=f0, impl=impl, **_fip_kwargs(o))
    return OptimizerPurifier(model, opt, ctx.loss_fn)


def _is_extra(module: nn.Module, pname: str, mode: str) -> bool:
    if mode == "none":
        return False
    if isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return True            # affine weight and bias of normalization layers
    return pname == "bias"


def _build_fast_fip(model: nn.Module, ctx: MethodContext, *, lr: float, rho: float, lr_delta: float,
                    rho_delta: float, relative: bool = True, rank: Optional[int] = None,
                    fast_fip_extra: str = "bias_bn", layer_types: Optional[Sequence[type]] = None,
                    impl: str = "auto", **o: Any) -> Purifier:
    """Fast FIP: train the singular-value shifts δ (+ biases / normalization affine parameters)."""
    from fip_fast import spectral
    from fip_fast.optim import FIP

    if fast_fip_extra not in ("bias_bn", "none"):
        raise ValueError(f"fast_fip_extra must be 'bias_bn' or 'none', got {fast_fip_extra!r}")
    # The extras: parameters that were trainable before reparameterization (merge restores every flag).
    extras = [p for m in model.modules() for pname, p in m.named_parameters(recurse=False)
              if p.requires_grad and _is_extra(m, pname, fast_fip_extra)]
    kw = dict(relative=relative, rank=rank, impl=impl)
    if layer_types is not None:
        kw["layer_types"] = tuple(layer_types)
    deltas = spectral.reparameterize(model, **kw)
    extra_ids = {id(p) for p in extras}
    delta_ids = {id(p) for p in deltas}
    extras = [p for p in model.parameters() if id(p) in extra_ids and id(p) not in delta_ids]
    for p in extras:
        p.requires_grad_(True)
    groups = [deltas, extras]
    f0 = _normalized_fisher(model, ctx, groups) if o["eta_r"] > 0 else None
    kw = _fip_kwargs(o)
    wd = kw.pop("weight_decay")
    # Weight decay on δ itself would pull δ back to 0 (toward θ0).  The spectral analogue of weight decay on W is
    # the penalty (wd/2)·‖W(δ)‖_F² = (wd/2)·Σ relu(s)²: it shrinks the singular values that clean data do not
    # support — added to the loss, so its gradient flows through δ like any other.
    pg = [dict(params=deltas, lr=lr_delta, rho=rho_delta, weight_decay=0.0)]
    if extras:
        pg.append(dict(params=extras, lr=lr, rho=rho, weight_decay=wd))
    opt = FIP(pg, lr=lr, rho=rho, fisher0=f0, impl=impl, weight_decay=0.0, **kw)
    layers = [m for _, m in spectral.spectral_layers(model)]
    penalty = None
    if wd > 0:
        def penalty() -> Tensor:
            return 0.5 * wd * sum(F.relu(m.spectrum()).pow(2).sum() for m in layers)
    return OptimizerPurifier(model, opt, ctx.loss_fn, finalize=spectral.merge, penalty=penalty)


register_method("fip", _build_fip, kind="loop", defaults=DEFAULTS["fip"],
                description="FIP: Fisher-trace suppressor + normalized Fisher anchor, all parameters")
register_method("fast_fip", _build_fast_fip, kind="loop", defaults=DEFAULTS["fast_fip"],
                description="Fast FIP: singular-value shifts δ (relative) + biases/BN affine")


# =============================================================================================== report
@dataclass
class PurifyReport:
    """What :func:`purify` returns beside the model.  ``to_dict()`` gives a JSON-serializable dict.

    Attributes:
        method: the method name.  config: every option used (defaults merged with the user's).
        steps_run: optimizer steps actually taken (≤ ``config["steps"]``; fewer after early stopping).
        selected_step: the step whose weights were returned (see the module docstring, selection rule).
        stopped_early: whether the clean-val early stop fired.
        trainable_params / total_params: scalars updated by the method / in the model.
        initial / final: clean-val metrics (``val_loss``, ``val_acc``) and ``eval_fn`` results (under
            ``"eval"``) of θ0 and of the returned model.
        history: one dict per evaluation: ``step``, ``train_loss`` (mean since the last evaluation),
            ``val_loss``, ``val_acc``, ``eval`` (eval_fn results or absent), ``elapsed_s``.
        timings: seconds: ``setup`` (Fisher, reparameterization), ``loop`` (steps only), ``eval`` (validation +
            eval_fn), ``finalize``, ``total``.
        skipped_steps: steps skipped for non-finite gradients.  resumed_from: checkpoint step (0 if none).
        extra: method-specific information (e.g. a runner's ``info`` dict).
        warnings: silent degradations found in the inputs (a single-class clean set, fewer clean samples than
            the batch size, an empty validation part…); each was also logged as a warning.
    """

    method: str
    config: Dict[str, Any]
    steps_run: int = 0
    selected_step: int = 0
    stopped_early: bool = False
    trainable_params: int = 0
    total_params: int = 0
    initial: Dict[str, Any] = field(default_factory=dict)
    final: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    resumed_from: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def summary(self) -> str:
        f = self.final
        return (f"{self.method}: {self.steps_run} steps (selected {self.selected_step}"
                f"{', stopped early' if self.stopped_early else ''}), val_acc {self.initial.get('val_acc', float('nan')):.4f}"
                f" -> {f.get('val_acc', float('nan')):.4f}, trainable {self.trainable_params:,} / "
                f"{self.total_params:,}, {self.timings.get('total', float('nan')):.1f} s")


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else (1e308 if o > 0 else -1e308)
    if isinstance(o, (bool, int, float, str)) or o is None:
        return o
    if isinstance(o, type):
        return o.__name__
    return repr(o)


# =============================================================================================== purify
def _state_copy(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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


def _run_fingerprint(theta0: str, config: Dict[str, Any], data: Sequence[Tensor]) -> Dict[str, str]:
    """What a checkpoint must match to be resumed: θ0, the options that shape the run, the clean data."""
    cfg = {k: v for k, v in config.items() if k not in _NOT_FINGERPRINTED}
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


def _data_warnings(y_all: Tensor, n_tr: int, n_va: int, batch_size: Optional[int], val_requested: bool,
                   val_fraction: Any) -> List[str]:
    """Degradations that let the run go on but weaken it silently: reported in ``report.warnings``."""
    out: List[str] = []
    if y_all.dim() == 1 and not y_all.is_floating_point() and y_all.numel():
        classes = torch.unique(y_all.cpu())
        if classes.numel() == 1:
            out.append(f"the clean set holds a single class ({int(classes[0])}): purification sees no other "
                       "class and clean-val accuracy cannot tell a collapsed model from a good one")
    if batch_size and n_tr < int(batch_size):
        out.append(f"only {n_tr} clean samples are left for purification, fewer than the batch size "
                   f"{int(batch_size)}: every batch repeats samples (drawn with replacement)")
    if val_requested and n_va == 0:
        out.append(f"the clean validation part is empty ({n_tr} clean samples, val_fraction {val_fraction}): no "
                   "clean-val selection or early stopping, the last step's weights are returned")
    return out


def purify(model: nn.Module, clean_loader: Any, method: str = "fast_fip", steps: Optional[int] = None, *,
           eval_fn: Optional[EvalFn] = None, eval_every: Optional[int] = None, val_data: Any = None,
           val_fraction: Optional[float] = None, val_margin: Optional[float] = None,
           patience: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
           seed: int = 0, device: Optional[Union[str, torch.device]] = None, loss_fn: Optional[LossFn] = None,
           progress: bool = True, checkpoint_dir: Optional[str] = None, checkpoint_every: int = 50,
           resume: bool = False, distributed: Optional[str] = None,
           **options: Any) -> Tuple[nn.Module, PurifyReport]:
    """Purify ``model`` of a backdoor using the small clean set ``clean_loader``; return ``(model, report)``.

    Args:
        model: the suspected model θ0 (modified in place and returned; for Fast FIP its layers are
            reparameterized during the run and merged back at the end).
        clean_loader: the defender's clean data — ``(x, y)`` tensors, a ``Dataset`` or an iterable of batches.
        method: ``"fast_fip"`` (default), ``"fip"`` or any registered name (:func:`available_methods`).
        steps: optimizer steps (default: the method's, see :data:`DEFAULTS`).
        eval_fn: ``eval_fn(model) -> dict`` called every ``eval_every`` steps and on θ0 and the result; its
            results are recorded in ``report.history`` / ``initial`` / ``final`` only — never used for selection.
        eval_every: steps between evaluations (default: ``steps // 10``, at least 1).
        val_data: explicit clean validation data; default: hold out ``val_fraction`` (0.2) of ``clean_loader``,
            class-stratified.  ``val_fraction=0`` disables validation (the last step is returned).
        val_margin: selection tolerance on clean-val accuracy (default 0.03); ``patience``: evaluations below
            a0 − 2·val_margin before stopping early (default: the method's — 0, never, for fip and
            fast_fip, whose cosine runs dip in clean accuracy mid-run and recover; 3 otherwise).
        batch_size, lr: override the method's defaults.  seed: batch sampling (and runner) seed.
        device: where to purify (default: the model's device); data are moved per batch.
        loss_fn: ``loss_fn(output, y) -> scalar`` (default mean cross-entropy).  progress: tqdm bar.
        checkpoint_dir / checkpoint_every / resume: periodic checkpoints and resuming (``kind="loop"`` methods).
        distributed: ``None`` (one process) or ``"ddp"``: data-parallel purification over the ranks of an
            initialized default process group (``torchrun`` + :func:`fip_fast.integrations.distributed.init_from_env`), see
            "Distributed purification" below.  ``"fsdp"`` is refused (not implemented in ``purify``: use
            :mod:`fip_fast.integrations.distributed` directly, as ``examples/torchrun_purify.py --parallel fsdp`` does).
        **options: method options, e.g. ``eta_F``, ``eta_r``, ``rho``, ``trace_estimator``, ``lr_delta``,
            ``rho_delta`` for FIP / Fast FIP (see :data:`DEFAULTS`), or a runner's own keyword arguments.

    Distributed purification (``distributed="ddp"``, ``kind="loop"`` methods only)
        Call it on every rank with the same model θ0, the same clean data and the same arguments.  It computes
        what the single-process call computes on the same global batches:

        * **F0**: each rank estimates the Fisher on its contiguous share of the purification part
          (:meth:`MethodContext.fisher_loader`); :func:`fip_fast.estimate_fisher` all-reduces sums and counts.
        * **Model**: after the method's builder has prepared it (Fast FIP: reparameterized, δ created) the
          training forward runs through ``DistributedDataParallel`` (:func:`fip_fast.integrations.distributed.wrap_ddp`),
          which averages the gradients inside ``backward()`` — also in the second (perturbed) pass of the fd
          suppressor.  The FIP step then does identical arithmetic on identical numbers on every rank.
        * **Batches**: step ``t`` draws ONE global batch of ``batch_size`` indices from ``(seed, t)`` — the
          same on every rank — and rank r runs its contiguous slice of ``batch_size / world_size`` samples, so
          the averaged gradient is the global-batch gradient.  ``batch_size`` must be divisible by the world size.
        * **Validation / selection**: each rank evaluates its slice of the clean validation set and the sums
          are all-reduced, so every rank sees the same clean-val metrics and takes the same selection and
          early-stopping decisions; ``eval_fn`` runs on rank 0 only and its result is broadcast.  Every rank
          returns the same model and an identical report.
        * **BatchNorm**: on CUDA every BatchNorm is temporarily converted to ``nn.SyncBatchNorm`` (global-batch
          statistics, exact), and converted back at the end.  On CPU torch has no SyncBatchNorm: each rank
          normalizes with its *local* slice's statistics (the gradient then differs from a single-process run)
          and the running statistics are averaged over ranks before every evaluation; this is logged as a
          warning and recorded as ``report.config["batchnorm"] = "local"``.  Models without BatchNorm (or
          on CUDA) match the single-process run within float tolerance (``tests/test_distributed_purify.py``).
        * **Checkpoints**: rank 0 writes them (``checkpoint_dir`` must be visible to every rank, e.g. one
          node); all ranks resume from the same file.  The progress bar shows on rank 0 only.
    """
    from tqdm.auto import tqdm

    t_total = time.perf_counter()
    spec = get_method(method)
    dist_mode = _check_distributed(distributed, spec.kind, spec.name)
    from fip_fast.integrations import distributed as fd

    rank, world = (fd.rank(), fd.world_size()) if dist_mode else (0, 1)
    is_main = rank == 0
    progress = bool(progress) and is_main
    dev = torch.device(device) if device is not None else model_device(model)
    # θ0's fingerprint, before anything touches the model: a resumed run must continue the same purification.
    theta0_fp = _tensor_fingerprint(sorted(model.state_dict().items())) if checkpoint_dir is not None else ""
    model.to(dev)
    loss_fn = loss_fn or F.cross_entropy

    # ---- options: method defaults < user options
    opts = dict(spec.defaults)
    for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if v is not None:
            opts[k] = v
    opts.update(options)
    loop = dict(_LOOP_DEFAULTS)
    for k, v in (("val_fraction", val_fraction), ("val_margin", val_margin), ("patience", patience),
                 ("eval_every", eval_every)):
        if v is not None:
            loop[k] = v
    if spec.kind == "loop":     # a method's defaults may carry loop options (e.g. fip: patience 0)
        for k in ("lr_schedule", "patience"):
            if k in opts:
                v = opts.pop(k)
                if not (k == "patience" and patience is not None):   # an explicit argument wins
                    loop[k] = v
    if loop["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {loop['lr_schedule']!r}")

    # ---- data: purification part and clean validation part
    x_all, y_all = _as_tensors(clean_loader)
    if val_data is not None:
        x_tr, y_tr = x_all, y_all
        x_va, y_va = _as_tensors(val_data)
    elif loop["val_fraction"] and loop["val_fraction"] > 0:
        if not 0 < loop["val_fraction"] < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {loop['val_fraction']}")
        tr_idx, va_idx = _stratified_holdout(y_all, float(loop["val_fraction"]), seed)
        x_tr, y_tr, x_va, y_va = x_all[tr_idx], y_all[tr_idx], x_all[va_idx], y_all[va_idx]
    else:
        x_tr, y_tr = x_all, y_all
        x_va, y_va = x_all[:0], y_all[:0]
    if x_tr.shape[0] == 0:
        raise ValueError("no clean samples left for purification after holding out the validation part")
    has_val = x_va.shape[0] > 0

    total_params = sum(p.numel() for p in model.parameters())
    config = {"method": spec.name, "kind": spec.kind, **opts, **loop, "seed": seed, "device": str(dev),
              "n_clean_train": int(x_tr.shape[0]), "n_clean_val": int(x_va.shape[0])}
    bn_layers = [m for _, m in fd.batchnorm_modules(model)]
    bn_local = False                  # BatchNorm statistics of the local slice (CPU DDP): averaged before evals
    if dist_mode:
        bs_global = int(opts.get("batch_size", 0) or 0)
        if bs_global % world:
            raise ValueError(f"purify(distributed={dist_mode!r}): batch_size {bs_global} is not divisible by the "
                             f"world size {world} (each rank runs batch_size / world_size samples of every global "
                             "batch)")
        bn_local = bool(bn_layers) and dev.type not in ("cuda", "xpu", "hpu")
        config.update(distributed=dist_mode, world_size=world,
                      batchnorm=("local" if bn_local else "sync") if bn_layers else "none")
        if bn_local and is_main:
            logger.warning("fip_fast.pipeline: distributed=%r on %s with BatchNorm: torch's SyncBatchNorm needs "
                           "CUDA, so each rank normalizes with its local slice's statistics (not identical to a "
                           "single-process run) and running statistics are averaged over ranks before every "
                           "evaluation", dist_mode, dev.type)
    report = PurifyReport(method=spec.name, config=config, total_params=total_params)
    report.warnings = _data_warnings(y_all, int(x_tr.shape[0]), int(x_va.shape[0]), opts.get("batch_size"),
                                     val_data is not None or bool(loop["val_fraction"]), loop["val_fraction"])
    if is_main:
        for w in report.warnings:
            logger.warning("fip_fast.pipeline: %s", w)
    t_eval = 0.0
    val_shard = (rank, world) if dist_mode else None

    def evaluate(m: nn.Module) -> Dict[str, Any]:
        nonlocal t_eval
        _sync(dev)
        t0 = time.perf_counter()
        if bn_local:
            fd.average_buffers(bn_layers)
        out: Dict[str, Any] = _val_metrics(m, x_va, y_va, loss_fn, dev, shard=val_shard) if has_val else {}
        if eval_fn is not None:
            res: Any = None
            if is_main:
                modes = [(mm, mm.training) for mm in m.modules()]
                try:
                    res = eval_fn(m)
                    res = dict(res) if res is not None else {}
                except Exception as e:
                    if not dist_mode:
                        raise
                    res = _RankError(f"eval_fn raised on rank 0: {type(e).__name__}: {e}")
                finally:
                    for mm, t in modes:
                        mm.training = t
            if dist_mode:
                res = fd.broadcast_object(res)
                if isinstance(res, _RankError):
                    raise RuntimeError(res.message)
            out["eval"] = res
        _sync(dev)
        t_eval += time.perf_counter() - t0
        return out

    report.initial = evaluate(model)
    a0 = report.initial.get("val_acc", float("nan"))

    if spec.kind == "runner":
        return _run_runner(spec, model, (x_tr, y_tr), opts, report, evaluate, dev, loss_fn, seed, progress,
                           t_total, lambda: t_eval)

    # ---- loop methods
    n_steps = int(opts.pop("steps"))
    bs = int(opts.pop("batch_size"))
    if n_steps < 0 or bs < 1:
        raise ValueError(f"steps must be ≥ 0 and batch_size ≥ 1, got {n_steps}, {bs}")
    ev_every = int(loop["eval_every"] or max(1, n_steps // 10))
    config["eval_every"] = ev_every

    ckpt = None
    resuming = False
    if checkpoint_dir is not None:
        from fip_fast.io import Checkpointer

        ckpt = Checkpointer(checkpoint_dir, every=max(1, int(checkpoint_every)), prefix=f"purify-{spec.name}")
        fingerprint = _run_fingerprint(theta0_fp, config, (x_tr, y_tr, x_va, y_va))
        latest = ckpt.load_latest() if resume else None
        resuming = latest is not None
        if resuming:
            _check_resume(latest.get("extra") or {}, fingerprint, checkpoint_dir)
        if dist_mode:
            resuming = bool(fd.broadcast_object(resuming))
    elif resume:
        raise ValueError("resume=True needs checkpoint_dir")

    _sync(dev)
    t0 = time.perf_counter()
    ctx = MethodContext(x_tr, y_tr, dev, loss_fn, seed, progress, resuming=resuming, rank=rank, world_size=world)
    sig = inspect.signature(spec.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
        unknown = [k for k in opts if k not in sig]
        if unknown:
            raise TypeError(f"method {spec.name!r} does not accept option(s) {unknown}")
    purifier: Purifier = spec.fn(model, ctx, **opts)
    restore_bn: Optional[Callable[[], None]] = None
    if dist_mode:
        # After the builder (Fast FIP has reparameterized): DDP registers its hooks on the parameters that
        # require grad now.  SyncBatchNorm shares the BatchNorm tensors, so the optimizer's references stay valid.
        if bn_layers and not bn_local:
            restore_bn = fd.to_sync_batchnorm(model)
        purifier.distribute(lambda m: fd.wrap_ddp(m, device=dev))
    _sync(dev)
    report.timings["setup"] = time.perf_counter() - t0
    report.trainable_params = int(sum(p.numel() for p in purifier.params))
    opt_groups = purifier.optimizer.param_groups if purifier.optimizer is not None else []
    base_lrs = [g["lr"] for g in opt_groups]        # captured before a resume overwrites them

    start = 0
    selected: Optional[Dict[str, Tensor]] = None      # None: the current weights are the selection
    report.selected_step = 0
    below = 0
    sel_ok, sel_acc = False, -1.0      # is the current selection acceptable; its clean-val accuracy
    if resuming:
        start = ckpt.resume(model, purifier.optimizer, restore_rng=True, map_location=dev)
        if dist_mode and int(fd.broadcast_object(start)) != start:
            raise RuntimeError(f"rank {rank} resumed from step {start} but rank 0 from another step: every rank "
                               f"must see the same checkpoint directory {checkpoint_dir}")
        ex = ckpt.extra
        report.history = list(ex.get("history", []))
        report.selected_step = int(ex.get("selected_step", 0))
        below = int(ex.get("below", 0))
        sel_ok, sel_acc = bool(ex.get("sel_ok", False)), float(ex.get("sel_acc", -1.0))
        if ex.get("selected") is not None:
            selected = {k: v.to(dev) for k, v in ex["selected"].items()}
        if "initial" in ex:
            report.initial = ex["initial"]
            a0 = report.initial.get("val_acc", a0)
        report.resumed_from = start
        opt_groups = purifier.optimizer.param_groups if purifier.optimizer is not None else []  # new dicts
        logger.info("fip_fast.pipeline: resumed %s from step %d", spec.name, start)

    bar = tqdm(total=n_steps, initial=start, desc=spec.name, disable=not progress, leave=False, unit="step")
    t_loop = 0.0
    loss_sum, loss_n = 0.0, 0
    step = start
    n_tr = x_tr.shape[0]
    stop = False
    mine = None
    if dist_mode:                     # this rank's slice of every global batch
        r = fd.shard_indices(bs, rank, world)
        mine = slice(r.start, r.stop)
    try:
        for step in range(start, n_steps):
            idx = _batch_indices(n_tr, bs, seed, step)     # the global batch: the same on every rank
            if mine is not None:
                idx = idx[mine]
            xb, yb = x_tr[idx].to(dev, non_blocking=True), y_tr[idx].to(dev, non_blocking=True)
            if loop["lr_schedule"] == "cosine":
                fac = 0.5 * (1.0 + math.cos(math.pi * step / max(1, n_steps)))
                for g, b in zip(opt_groups, base_lrs):
                    g["lr"] = b * fac
            _sync(dev)
            t0 = time.perf_counter()
            loss = purifier.step(xb, yb)
            _sync(dev)
            t_loop += time.perf_counter() - t0
            if math.isfinite(loss):
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
            bar.update(1)
            done = step + 1
            if done % ev_every == 0 or done == n_steps:
                if dist_mode:         # the mean of the ranks' slice losses = the global-batch loss
                    ln = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64, device=dev)
                    torch.distributed.all_reduce(ln)
                    loss_sum, loss_n = float(ln[0]), int(ln[1])
                with purifier.unperturbed():
                    # NaN, not 0, when every step since the last evaluation had a non-finite loss.
                    rec = {"step": done, "train_loss": loss_sum / loss_n if loss_n else float("nan"),
                           **evaluate(model),
                           "elapsed_s": time.perf_counter() - t_total}
                    loss_sum, loss_n = 0.0, 0
                    acc = rec.get("val_acc", float("nan"))
                    ok = not has_val or acc >= a0 - loop["val_margin"]
                    rec["acceptable"] = bool(ok)
                    # The latest acceptable evaluation; while none is, the best clean-val accuracy so far.
                    if ok or (not sel_ok and acc >= sel_acc):
                        selected = None if done == n_steps else _state_copy(model)
                        report.selected_step, sel_ok, sel_acc = done, bool(ok), float(acc)
                    if ok:
                        below = 0
                    elif acc < a0 - 2 * loop["val_margin"]:
                        below += 1
                    else:
                        below = 0
                    report.history.append(rec)
                    bar.set_postfix(loss=f"{rec['train_loss']:.3f}",
                                    **({"val_acc": f"{acc:.3f}"} if has_val else {}))
                    if has_val and int(loop["patience"]) > 0 and below >= int(loop["patience"]):
                        report.stopped_early = True
                        stop = True
            if ckpt is not None and (done % ckpt.every == 0 or stop):
                if bn_local:
                    fd.average_buffers(bn_layers)
                if is_main:           # every rank holds the same state (DDP): rank 0 writes it
                    with purifier.unperturbed():
                        ckpt.save(done, model, purifier.optimizer, extra={
                            "fingerprint": fingerprint, "history": report.history, "selected_step": report.selected_step, "below": below,
                            "sel_ok": sel_ok, "sel_acc": sel_acc, "selected": selected, "initial": report.initial})
                if dist_mode:
                    fd.barrier()
            if stop:
                break
        else:
            step = n_steps - 1 if n_steps > start else start - 1
    finally:
        bar.close()
    report.steps_run = (step + 1) if n_steps > start else start
    report.timings["loop"] = t_loop
    report.skipped_steps = purifier.skipped_steps

    # ---- finish: unperturbed, selected weights, merged
    t0 = time.perf_counter()
    if dist_mode:
        purifier.distribute(None)     # drop the DDP wrapper; the model itself is identical on every rank
        if restore_bn is not None:
            restore_bn()              # the original BatchNorm modules (they share the current tensors)
        if bn_local:
            fd.average_buffers(bn_layers)
    with purifier.unperturbed():
        final_state = _state_copy(model) if selected is None else selected
    model.load_state_dict(final_state)
    if report.selected_step != report.steps_run:
        logger.info("fip_fast.pipeline: returning the weights of step %d (clean-val selection)", report.selected_step)
    # A lagged optimizer would re-apply its perturbation on the next step; the model is handed back here, so the
    # optimizer is dropped with the purifier.
    model = purifier.finalize(model)
    model.eval()
    report.timings["finalize"] = time.perf_counter() - t0
    report.final = evaluate(model)
    report.extra.update(purifier.info())
    report.timings["eval"] = t_eval
    report.timings["total"] = time.perf_counter() - t_total
    return model, report


class _RankError:
    """An exception on rank 0 passed to the other ranks (so that they raise too instead of waiting)."""

    def __init__(self, message: str):
        self.message = message


def _check_distributed(distributed: Optional[str], kind: str, name: str) -> Optional[str]:
    """Validate ``purify(distributed=…)``; returns ``None`` (single process) or ``"ddp"``."""
    if distributed is None or distributed is False or distributed == "none":
        return None
    if distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed must be None or 'ddp', got {distributed!r}")
    if distributed == "fsdp":
        raise NotImplementedError(
            "purify(distributed='fsdp') is not implemented: the loop's selection copies, evaluation and merge need "
            "the full weights.  Use DDP (distributed='ddp'), or FSDP2 through fip_fast.integrations.distributed (shard_fsdp, "
            "shard_fisher, fip_for_fsdp, save_checkpoint) as in examples/torchrun_purify.py --parallel fsdp")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "purify(distributed='ddp') needs an initialized torch.distributed process group: launch the script "
            "with torchrun (e.g. torchrun --nproc_per_node=2 script.py) and call "
            "fip_fast.integrations.distributed.init_from_env() before purify()")
    if kind != "loop":
        raise ValueError(f"method {name!r} is a kind='runner' method (its own loop): it cannot run under "
                         "purify(distributed=…); only kind='loop' methods (fip, fast_fip, …) can")
    return "ddp"


def _run_runner(spec: MethodSpec, model: nn.Module, clean: Tuple[Tensor, Tensor], opts: Dict[str, Any],
                report: PurifyReport, evaluate: Callable, dev: torch.device, loss_fn: LossFn, seed: int,
                progress: bool, t_total: float, t_eval: Callable[[], float]) -> Tuple[nn.Module, PurifyReport]:
    """Run a ``kind="runner"`` method (the :mod:`fip_fast.baselines` convention) and wrap its info."""
    params = inspect.signature(spec.fn).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kw = dict(opts)
    common = dict(seed=seed, device=dev, loss_fn=loss_fn, progress=progress)
    kw.update({k: v for k, v in common.items() if var_kw or k in params})
    if "lr" in kw and not (var_kw or "lr" in params):
        kw.pop("lr")
    _sync(dev)
    t0 = time.perf_counter()
    out = spec.fn(model, clean, **kw)
    _sync(dev)
    report.timings["loop"] = time.perf_counter() - t0
    model, info = out if isinstance(out, tuple) else (out, {})
    info = dict(info or {})
    report.extra.update(info)
    report.steps_run = int(info.get("steps", kw.get("steps", 0)) or 0)
    report.selected_step = report.steps_run
    report.trainable_params = int(info.get("trainable_params", 0) or 0)
    report.skipped_steps = int(info.get("skipped_steps", 0) or 0)
    model.eval()
    report.final = evaluate(model)
    report.timings["eval"] = t_eval()
    report.timings["total"] = time.perf_counter() - t_total
    return model, report
