"""``fip_fast.FIP``: the FIP optimizer (docs/method.md "One optimizer step"), a ``torch.optim.Optimizer``.

This module orchestrates; the arithmetic of a step lives in the kernel-level ops reached through
:mod:`fip_fast.ops` (reference / foreach / Triton / CUDA), whose contract is
:func:`fip_fast.reference.fip_step_`.

Suppressor estimators (``trace_estimator``), applied on every ``trace_every``-th call of :meth:`FIP.step`
(other calls are plain steps d = g):

``"fd"`` (default)
    Finite difference, two forward/backward passes: the closure runs at θ, the optimizer perturbs
    θ + e (e = ρ·g/‖g‖, ‖g‖ the global norm over the whole parameter group, across devices), calls the closure
    again, then the fused step restores θ and uses d = g + c·(g' − g), c = min(2·η_F·‖g‖/ρ, max_mix).  Needs a
    closure on suppressor calls.  Every group steps with its gradient at θ, whatever the closure does with the
    gradients of the others (they are set aside during the second pass and put back).
    While the optimizer runs the closure at θ + e, :attr:`FIP.perturbed_pass` is ``True``: a closure over a model
    with BatchNorm should run that pass inside :func:`frozen_running_stats` (batch statistics are still used, the
    running estimates are not updated), as SAM implementations do — otherwise every step folds the statistics of
    the *perturbed* network into the running mean/var that evaluation uses (measured on the demo CNN: clean
    accuracy fell by up to 10 points at the end of a cosine schedule whose lr was already ≈ 0).
``"lagged"``
    One pass (docs/method.md "Closure-free suppressor"): a step that precedes a suppressor call stores
    e = r·g/‖g‖, r = min(2·η_F·‖g‖, max_mix·ρ); e is applied **lazily**, by a forward pre-hook, at the first
    forward of a module holding these parameters that runs in training mode with gradients enabled; the next
    step restores θ inside the fused kernel.  So *between steps the parameters always hold the unperturbed θ*:
    evaluation under ``no_grad``, ``model.state_dict()``, checkpoints and the end of training see θ without any
    callback.  Works without a closure (Hugging Face ``Trainer``, ``torch.amp.GradScaler``).  Forwards that do not
    go through ``nn.Module.__call__`` can call :meth:`FIP.apply_perturbation` themselves; a step whose
    perturbation was never applied uses its plain gradient (logged once).
``"batch"``
    T = ‖∇ℓ‖², gradient 2·H·ḡ by double backward.  On suppressor calls the closure must build the graph of the
    gradient: call ``opt.backward(loss)`` (or ``loss.backward(create_graph=opt.create_graph)``) in it.
``"exact"``
    T = (1/B)·Σ‖∇ℓ_n‖² with per-sample gradients.  The closure returns ``(loss, trace)`` where ``trace`` is a
    differentiable scalar, e.g. :func:`fip_fast.reference.trace_exact` ``(model, x, y)``.  Reference only.

For ``"batch"`` and ``"exact"`` the direction is d = g + η_F·∇T exactly (no ``max_mix`` cap: there is no
finite-difference extrapolation to guard).

The suppressor schedule: ``group["calls"]`` counts the :meth:`step` calls of a group (a host integer, so that
deciding whether to run the closure twice needs no device sync); for ``"fd"``/``"batch"``/``"exact"`` calls
0, k, 2k, … are suppressor calls, skipped calls included (a skip does not shift the schedule).  The lagged
schedule counts *non-skipped* steps on the device (``group["lagged_calls"]``), so a skipped step — FIP's own or
one that ``GradScaler`` never passes on — is, for the schedule too, as if the batch had never been seen.

Non-finite gradients: a step whose gradients (either pass, any group, any device) contain NaN/Inf writes
nothing — parameters and every state tensor keep their bits — and is counted in :attr:`FIP.skipped_steps` (a
warning is logged once).  The one exception to bit-identity: on an ``"fd"`` suppressor call whose *first*
gradient is finite but whose perturbed gradient is not, θ was already moved to θ + e and is put back as
(θ + e) − e, the same rounding every suppressor step has (likewise a lagged step taken at θ + e).  The flag is
read on the device: :meth:`FIP.step` never synchronizes with the host on CUDA (the skip warning is read from an
asynchronous copy).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import numbers
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from fip_fast import _plan, ops
from fip_fast.backends import host
from fip_fast.reference import mix_coefficient

logger = logging.getLogger("fip_fast")

TRACE_ESTIMATORS = ("fd", "lagged", "batch", "exact")
PRECONDITIONERS = (None, "fisher")
STATE_KEYS = ("step", "momentum_buffer", "fisher", "anchor", "fisher0", "pert")
HYPER_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "eta_F", "eta_r", "rho", "trace_every",
              "trace_estimator", "beta", "precondition", "damping", "max_mix", "calls")
_TINY = 1e-12


@contextlib.contextmanager
def frozen_running_stats(module: torch.nn.Module):
    """Inside the block, BatchNorm layers of ``module`` in train mode normalize with the batch statistics as usual
    but do not update ``running_mean`` / ``running_var`` / ``num_batches_tracked``.  For the second (perturbed)
    forward pass of FIP's ``"fd"`` suppressor and of SAM (see :attr:`FIP.perturbed_pass`)."""
    bns = [m for m in module.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False     # train-mode forward: batch stats, no running-stat update
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


# ---------------------------------------------------------------------------------------------- validation
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _real(name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
          tensor_ok: bool = False) -> None:
    """``v`` is a finite real number in the interval (a one-element floating tensor where ``tensor_ok``)."""
    if isinstance(v, Tensor) and tensor_ok:
        _check(v.numel() == 1 and v.is_floating_point(), f"{name} as a tensor must be one floating-point element, "
               f"got shape {tuple(v.shape)} {v.dtype}")
        v = float(v.detach().cpu())
    _check(isinstance(v, numbers.Real) and not isinstance(v, bool),
           f"{name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    _check(math.isfinite(v), f"{name} must be finite, got {v}")
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    _check(ok, f"{name} must be in {lb}{lo:g}, {hi:g}{rb}, got {v}")


def validate_hyperparameters(h: dict) -> None:
    """Raise ``ValueError`` naming the first bad hyper-parameter of the (merged) group ``h``."""
    _real("lr", h["lr"], 0.0, tensor_ok=True)
    _real("momentum", h["momentum"], 0.0, 1.0, hi_open=True)
    _check(isinstance(h["nesterov"], bool), f"nesterov must be a bool, got {h['nesterov']!r}")
    _check(not h["nesterov"] or h["momentum"] > 0, "nesterov needs momentum > 0")
    _real("weight_decay", h["weight_decay"], 0.0)
    _real("eta_F", h["eta_F"], 0.0)
    _real("eta_r", h["eta_r"], 0.0)
    _real("rho", h["rho"], 0.0, lo_open=True)
    te = h["trace_every"]
    _check(isinstance(te, int) and not isinstance(te, bool) and te >= 1,
           f"trace_every must be an int ≥ 1, got {te!r}")
    _check(h["trace_estimator"] in TRACE_ESTIMATORS,
           f"trace_estimator must be one of {TRACE_ESTIMATORS}, got {h['trace_estimator']!r}")
    _real("beta", h["beta"], 0.0, 1.0, hi_open=True)
    _check(h["precondition"] in PRECONDITIONERS,
           f"precondition must be one of {PRECONDITIONERS}, got {h['precondition']!r}")
    _real("damping", h["damping"], 0.0, lo_open=True)
    _real("max_mix", h["max_mix"], 0.0, lo_open=True)
    c = h.get("calls", 0)
    _check(isinstance(c, int) and not isinstance(c, bool) and c >= 0, f"calls must be an int ≥ 0, got {c!r}")


# ---------------------------------------------------------------------------------------------- step records
@dataclass
class _Slice:
    """The parameters of one group on one device that have a gradient, and what one step computes for them."""

    group: dict
    sup: bool                          # a suppressor call for this group
    ps: list
    g: list
    impl: str
    device: torch.device
    gnorm: Optional[Tensor] = None     # ‖g‖ of the whole group (all devices), on this device
    found_inf: Optional[Tensor] = None  # the step-wide non-finite flag, on this device
    gp: Optional[list] = None          # the second gradient (fd: at θ + e; batch/exact: g + η_F·∇T)
    restore: Optional[Tensor] = None   # fd: ρ/‖g‖ (θ + e − restore·g = θ)
    mix: Optional[Any] = None
    plan: Optional[_plan.DevicePlan] = None   # the step plan of these tensors (None: no plan, no cache keys)
    gptrs: tuple = ()                  # the data_ptr of each tensor of ``g``: the moving part of the cache keys

    def key(self, what: str, *moving: Optional[tuple]) -> Optional[tuple]:
        """The backends' ``cache_key`` for the call ``what`` on this slice's tensors (None without a plan): the
        stable part (the plan's uid: its parameters and state) and the pointers of the lists that may move
        between steps (the gradients), one tuple per such list (see :mod:`fip_fast._plan`)."""
        return None if self.plan is None else ((self.plan.uid, what), moving)

    def gp_key(self, what: str) -> Optional[tuple]:
        """The key of a call on ``g`` and ``gp`` (fresh tensors on every suppressor call: read here, each time)."""
        if self.plan is None:
            return None
        return self.key(what, self.gptrs, None if self.gp is None else _plan.pointers(self.gp))


def _on(t: Tensor, dev: torch.device) -> Tensor:
    return t if t.device == dev else t.to(dev, non_blocking=True)


def _global_norm(tensors: list, impl: str, cache_key=None) -> tuple[Tensor, Tensor]:
    """(‖tensors‖₂, found_inf) as plain 0-dim tensors: the norm of FSDP2 (DTensor) gradients comes back as a
    DTensor, whose full value the step's scalar bookkeeping needs (``full_tensor`` reduces a partial norm)."""
    norm, found = ops.global_norm(tensors, impl=impl, cache_key=cache_key)
    if hasattr(norm, "full_tensor"):
        norm, found = norm.full_tensor(), found.full_tensor()
    return norm, found


class _SkipCounter:
    """Counts skipped steps on the device; warns once without blocking the host (an asynchronous copy on CUDA,
    read when its event has completed; CPU tensors are read directly, which is no synchronization)."""

    def __init__(self) -> None:
        self.count: Optional[Tensor] = None
        self.warned = False
        self._host: Optional[Tensor] = None
        self._event = None

    def add(self, flag: Tensor) -> None:
        if self.count is None:
            self.count = flag.detach().clone()
        else:
            self.count.add_(_on(flag, self.count.device))
        if not self.warned:
            self._poll()

    def total(self) -> int:
        return 0 if self.count is None else int(self.count.item())

    def _poll(self) -> None:
        c = self.count
        if c.device.type != "cuda":
            seen = float(c.numpy())       # host memory already: not a device sync
        else:
            seen = 0.0
            if self._event is not None and self._event.query():
                seen, self._event = float(self._host.numpy()), None
            if self._event is None:
                self._host = self._host if self._host is not None else torch.empty((), pin_memory=True)
                self._host.copy_(c, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
        if seen > 0:
            self.warned = True
            logger.warning("fip_fast.FIP: skipped a step with non-finite gradients (parameters and state left "
                           "untouched); opt.skipped_steps counts them. This warning is shown once.")


class _LazyPerturbation:
    """Applies the stored lagged perturbation e at the first training forward after a step (docs/method.md
    "Closure-free suppressor", made lazy so that between steps the parameters hold θ).

    The optimizer knows its parameters, not the model.  So the first time e is pending, a process-wide forward
    pre-hook waits for the first module call that runs in training mode with gradients enabled and holds one of
    the parameters — the outermost module the training loop calls (the model, a DDP wrapper, a
    ``torch.compile`` wrapper) — applies e, registers an ordinary forward pre-hook on that module and removes
    itself.  From then on only that module's own hook is consulted (no global hook, nothing traced by dynamo).
    If a step finds e still unapplied (the loop called another module, or a forward bypassed
    ``nn.Module.__call__``), the step uses its plain gradient, a warning is logged once, and discovery runs
    again."""

    def __init__(self, opt: "FIP") -> None:
        self._opt = weakref.ref(opt)
        self.pending = False           # a stored e waits to be applied
        self.applied = False           # the parameters hold θ + e
        self._global = None
        self._roots: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._warned = False

    def arm(self) -> None:
        self.pending, self.applied = True, False
        if not self._roots:
            self._discover_next()

    def disarm(self) -> None:
        self.pending = False
        if self._global is not None:
            self._global.remove()
            self._global = None

    def _discover_next(self) -> None:
        if self._global is None:
            self._global = nn.modules.module.register_module_forward_pre_hook(self._discover)

    def _owner(self, module: nn.Module) -> Optional["FIP"]:
        opt = self._opt()
        if opt is None or not (module.training and torch.is_grad_enabled()):
            return None
        ids = opt._param_ids()
        return opt if any(id(p) in ids for p in module.parameters()) else None

    def _discover(self, module: nn.Module, args: Any) -> None:
        opt = self._owner(module)
        if opt is None:
            if self._opt() is None:
                self.disarm()
            return
        if module not in self._roots:
            # prepend: before the module's own pre-hooks — FSDP2's all-gather must see the perturbed shards
            self._roots[module] = module.register_forward_pre_hook(self._on_root_forward, prepend=True)
        if self._global is not None:
            self._global.remove()
            self._global = None
        opt.apply_perturbation()

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if self.pending and not self.applied:
            opt = self._owner(module)
            if opt is not None:
                opt.apply_perturbation()

    def unapplied_at_step(self) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("fip_fast.FIP(trace_estimator='lagged'): the stored perturbation was not applied "
                           "before this step (no training-mode forward with gradients through a module holding "
                           "the parameters since the last step); this step used its plain gradient. Call "
                           "opt.apply_perturbation() before a forward that bypasses nn.Module.__call__.")
        self._discover_next()


class FIP(Optimizer):
    r"""Fisher-Information-guided Purification as an optimizer.

    Minimizes J(θ) = ℓ(θ) + η_F·T(θ) + (η_r/2)·Σ F0·(θ − θ0)² with SGD + momentum, where T is the trace of the
    empirical Fisher (the *suppressor*, pushing toward flat minima) and the last term is the Fisher-weighted
    anchor (CDA) to the weights θ0 held at construction.

    The constructor's defaults are the authors' values; the settings that purify in a plain loop (and that
    ``fip_fast.purify`` uses) are the recipe :data:`fip_fast.recipes.PURIFY`:
    ``PURIFY.optimizer(model.parameters())`` and ``PURIFY.scheduler(opt)`` (``examples/optimizer_loop.py``).

    Args:
        params: iterable of parameters or of dicts (param groups with their own hyper-parameters); generators
            are fine (they are consumed once and kept as lists).
        lr: learning rate (a float, or a 0-dim tensor to avoid host syncs in the fused kernels).
        momentum: μ ∈ [0, 1).  nesterov: use d + μ·buf.
        weight_decay: L2 coefficient, added to d as wd·θ.
        eta_F: suppressor weight η_F ≥ 0 (0 disables the suppressor; the authors' argparse default 0.5 is wrong,
            by their own account — use ≤ 5e-3 with their other defaults).
        eta_r: anchor weight η_r ≥ 0; with F0 normalized to max 1 (``estimate_fisher(normalize="max")``),
            η_r ≈ 1 behaves the same across models.  Stability with SGD needs lr·η_r·max(F0) < 2·(1+μ).
        rho: perturbation radius ρ > 0 of the ``"fd"``/``"lagged"`` suppressor (in parameter units).
        trace_every: apply the suppressor on every k-th call (default 5, as the authors do).
        trace_estimator: ``"fd"`` | ``"lagged"`` | ``"batch"`` | ``"exact"`` (see the module docstring).
        beta: EMA factor β of the squared-gradient Fisher accumulated every step (``state["fisher"]``).
        precondition: ``None`` or ``"fisher"``: divide d by fisher/(1 − β^t) + damping (NGF-style), with each
            tensor's own step count t.
        damping: λ > 0 of the preconditioner.
        fisher0: mapping parameter → F0 tensor of the same shape (e.g. from :func:`fip_fast.estimate_fisher`).
            Parameters without an entry have no anchor (and no copy θ0 is kept for them).
        impl: ``"auto"`` | ``"reference"`` | ``"foreach"`` | ``"triton"`` | ``"cuda"`` (see :mod:`fip_fast.ops`).
        max_mix: cap on the fd mix coefficient c = min(2·η_F·‖g‖/ρ, max_mix); at the cap (1.0) a suppressor step
            is exactly a SAM step of radius ρ, the known-stable limit (docs/method.md "Stability").

    Every hyper-parameter is checked (a finite number in its range, the right type) when a group is added and
    when a state dict is loaded; a bad one raises ``ValueError`` naming it, and nothing is registered.

    State per parameter: ``step`` (0-dim fp32 tensor), ``momentum_buffer`` and ``fisher`` (fp32), and where F0
    was given ``anchor`` (θ0, parameter dtype) and ``fisher0`` (fp32); ``pert`` (fp32) with ``"lagged"``.

    Example::

        opt = FIP(model.parameters(), fisher0=estimate_fisher(model, clean_loader, normalize="max"))
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 5e-3, momentum: float = 0.95,
                 nesterov: bool = False, weight_decay: float = 0.0, eta_F: float = 1e-3, eta_r: float = 1.0,
                 rho: float = 0.05, trace_every: int = 5, trace_estimator: str = "fd", beta: float = 0.95,
                 precondition: Optional[str] = None, damping: float = 1e-3,
                 fisher0: Optional[dict[Tensor, Tensor]] = None, impl: str = "auto", *, max_mix: float = 1.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta_F=eta_F,
                        eta_r=eta_r, rho=rho, trace_every=trace_every, trace_estimator=trace_estimator, beta=beta,
                        precondition=precondition, damping=damping, max_mix=max_mix, calls=0)
        validate_hyperparameters(defaults)
        _check(impl == "auto" or impl in ops.IMPLS, f"impl must be 'auto' or one of {ops.IMPLS}, got {impl!r}")
        self.impl = impl
        self.create_graph = False
        #: True while :meth:`step` runs the closure at the perturbed θ + e (``"fd"`` suppressor calls).
        self.perturbed_pass = False
        self._skips = _SkipCounter()
        self._lazy = _LazyPerturbation(self)
        self._suspended = False          # inside unperturbed(), the applied perturbation is taken off
        self._ids: Optional[set] = None
        #: bumped by every structural change (groups, loaded state, new state entries): invalidates step plans
        self._epoch = 0
        self._plans: dict[int, _plan.GroupPlan] = {}
        self._resolved: dict[torch.device, str] = {}
        super().__init__(params, defaults)
        host.prepare()                   # the C++ host helper of step(): loaded if built, else built in background
        if impl not in ("auto", "reference"):
            for dev in {p.device for g in self.param_groups for p in g["params"]}:
                ops.resolve(impl, dev)   # fail now, not at the first step, if the impl can't run here
        self._init_anchor(fisher0 or {})

    # ------------------------------------------------------------------ construction and validation
    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, with the parameters materialized first (a generator is consumed once)
        and the whole group validated *before* it is registered."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params", [])
        if isinstance(params, set):
            raise TypeError("param group params must be an ordered collection (a set has no stable order)")
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        for p in group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"FIP can only optimize tensors, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError("FIP does not support complex parameters (view them as real with "
                                 "torch.view_as_real first)")
            if not p.is_floating_point():
                raise ValueError(f"FIP needs floating-point parameters, got {p.dtype}")
        validate_hyperparameters({**self.defaults, **group})
        super().add_param_group(group)
        self._ids = None
        self.invalidate_plans()

    def invalidate_plans(self) -> None:
        """Forget the step plans (:mod:`fip_fast._plan`): the next step re-reads every parameter's state.  Done
        automatically when groups are added, a state dict is loaded or state is created; call it after replacing
        state tensors by hand."""
        self._epoch += 1
        self._plans = {}

    def _param_ids(self) -> set:
        if self._ids is None:
            self._ids = {id(p) for g in self.param_groups for p in g["params"]}
        return self._ids

    @torch.no_grad()
    def _init_anchor(self, fisher0: dict[Tensor, Tensor]) -> None:
        known = self._param_ids()
        for p, f0 in fisher0.items():
            if id(p) not in known:
                raise ValueError("fisher0 has an entry for a tensor that is not among the optimizer's parameters")
            if f0.shape != p.shape:
                raise ValueError(f"fisher0 entry of shape {tuple(f0.shape)} does not match its parameter's shape "
                                 f"{tuple(p.shape)}")
            if not torch.isfinite(f0).all() or (f0 < 0).any():
                raise ValueError("fisher0 entries must be finite and ≥ 0")
            st = self.state[p]
            st["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
            st["fisher0"] = f0.detach().to(device=p.device, dtype=torch.float32).clone()
        self.invalidate_plans()

    def _lazy_state(self, p: Tensor, group: dict) -> dict:
        st = self.state[p]
        if "step" not in st or (group["trace_estimator"] == "lagged" and "pert" not in st):
            self.invalidate_plans()
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["fisher"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["trace_estimator"] == "lagged" and "pert" not in st:
            st["pert"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return st

    @staticmethod
    def _lagged_counters(group: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        """(non-skipped lagged steps, 1 when the stored perturbation is a scheduled one) — 0-dim fp32 device
        tensors kept in the group (saved with it), so that the lagged schedule needs no host sync."""
        if "lagged_calls" not in group:
            group["lagged_calls"] = torch.zeros((), dtype=torch.float32, device=device)
            group["lagged_pert_on"] = torch.zeros((), dtype=torch.float32, device=device)
        return group["lagged_calls"], group["lagged_pert_on"]

    # ------------------------------------------------------------------ public helpers
    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite gradients (syncs with the device)."""
        return self._skips.total()

    def is_suppressor_call(self, group: Optional[dict] = None) -> bool:
        """Whether the next :meth:`step` call applies the suppressor for ``group`` (default: the first).  For
        ``"lagged"``: whether the stored perturbation is a scheduled one (reads a device flag: syncs)."""
        g = group if group is not None else self.param_groups[0]
        if g["eta_F"] <= 0:
            return False
        if g["trace_estimator"] == "lagged":
            return bool(g.get("lagged_pert_on", torch.zeros(())).item())
        return g["calls"] % g["trace_every"] == 0

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, keeping the graph of the gradient when the suppressor needs double backward."""
        loss.backward(create_graph=self.create_graph)

    @property
    def is_perturbed(self) -> bool:
        """Whether the parameters hold θ + e right now (``"lagged"``: only between the first training forward
        after a step and the next step; never between steps, nor inside :meth:`unperturbed`)."""
        return self._lazy.applied

    @torch.no_grad()
    def apply_perturbation(self) -> None:
        """θ ← θ + e with the stored lagged perturbation, if one is pending (idempotent).  The forward pre-hook
        calls this at the first training-mode, grad-enabled forward after a step; call it yourself before a
        forward that does not go through ``nn.Module.__call__``."""
        if not self._lazy.pending or self._lazy.applied:
            return
        self._shift_pert(1.0)
        self._lazy.disarm()
        self._lazy.applied = True

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Drop the lagged perturbation for good: θ ← θ − e if it is applied, and e ← 0 for every parameter.

        Between steps the parameters already hold θ, so this only discards the pending e (the suppressor resumes
        at its next scheduled call).  Idempotent; a no-op for the other estimators.  θ is recovered as
        (θ + e) − e where e was applied.
        """
        if self._lazy.applied:
            self._shift_pert(-1.0)
        self._zero_pert()
        self._lazy.applied = self._suspended = False
        self._lazy.disarm()

    def _zero_pert(self) -> None:
        """e ← 0 for every parameter, and no scheduled perturbation stored."""
        for group in self.param_groups:
            if "lagged_pert_on" in group:
                group["lagged_pert_on"].zero_()
        for st in self.state.values():
            if "pert" in st:
                st["pert"].zero_()

    @contextlib.contextmanager
    def unperturbed(self):
        """Inside the block the parameters hold θ (evaluate, save, log inside).  Between steps this is already
        the case (a no-op); between a training forward and the next step the applied e is taken off and put back
        when the block ends (θ is then (θ + e) − e: one rounding of the parameter dtype)."""
        if not self._lazy.applied:
            yield
            return
        self._shift_pert(-1.0)
        self._lazy.applied, self._suspended = False, True
        try:
            yield
        finally:
            if self._suspended:          # not dropped inside the block by remove_perturbation()
                self._shift_pert(1.0)
                self._lazy.applied = True
            self._suspended = False

    @torch.no_grad()
    def _shift_pert(self, sign: float) -> None:
        """θ ← θ + sign·e for every lagged group (skipped on the device where the stored e is not scheduled)."""
        for group in self.param_groups:
            plan = self._plans.get(id(group))
            if (plan is not None and plan.pert_complete and plan.structure == _plan.structure_of(self._epoch, group)
                    and plan.unmoved()):     # its tables hold the parameters' addresses: none may have moved
                parts = [(dp.device, dp.ps, dp.pert, ((dp.uid, "ps,pert"), ())) for dp in plan.devices]
            else:
                by_dev = defaultdict(list)
                for p in group["params"]:
                    if "pert" in self.state.get(p, {}):
                        by_dev[p.device].append(p)
                parts = [(dev, ps, [self.state[p]["pert"] for p in ps], None) for dev, ps in by_dev.items()]
            for dev, ps, pert, key in parts:
                off = torch.rsub(_on(self._lagged_counters(group, dev)[1], dev), 1.0)
                ops.perturb_(ps, pert, sign, off, impl=self._impl_of(dev), cache_key=key)

    def state_dict(self) -> dict:
        """The torch state dict.  Between steps it and ``model.state_dict()`` describe the unperturbed point;
        the stored lagged perturbation (``pert``) is pending again after :meth:`load_state_dict`."""
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` after checking that ``state_dict`` is a FIP state for these parameters
        (every hyper-parameter and ``calls`` present and valid, state entries of FIP's kinds and shapes); state
        is kept in fp32 whatever the parameter dtype."""
        state_dict = dict(state_dict)
        state_dict.pop("fip_perturbed", None)     # written by fip_fast < 0.2; a loaded e is always pending
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            for k in ("momentum_buffer", "fisher", "pert", "fisher0", "step"):
                if k in st:
                    st[k] = st[k].to(device=p.device, dtype=torch.float32)
            if "anchor" in st:
                st["anchor"] = st["anchor"].to(device=p.device, dtype=p.dtype)
        lagged = False
        for group in self.param_groups:
            if "lagged_calls" in group and group["params"]:
                dev = group["params"][0].device
                for k in ("lagged_calls", "lagged_pert_on"):
                    group[k] = torch.as_tensor(group[k], dtype=torch.float32).to(dev).reshape(())
                lagged = True
        self._ids = None
        self.invalidate_plans()
        self._lazy.applied = self._suspended = False
        self._lazy.disarm()
        if lagged:
            self._lazy.arm()

    def _check_state_dict(self, sd: dict) -> None:
        _check(isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list),
               "not an optimizer state dict: it needs 'state' (a dict) and 'param_groups' (a list)")
        saved_groups = sd["param_groups"]
        _check(len(saved_groups) == len(self.param_groups), f"the state dict has {len(saved_groups)} parameter "
               f"group(s), this optimizer has {len(self.param_groups)}")
        for i, (saved, mine) in enumerate(zip(saved_groups, self.param_groups)):
            missing = [k for k in HYPER_KEYS if k not in saved]
            _check(not missing, f"param group {i} of the state dict lacks {missing}: not a FIP state dict (saved "
                   "by another optimizer?)")
            _check(len(saved["params"]) == len(mine["params"]), f"param group {i} of the state dict has "
                   f"{len(saved['params'])} parameters, this optimizer's has {len(mine['params'])}")
            try:
                validate_hyperparameters(saved)
            except ValueError as e:
                raise ValueError(f"param group {i} of the state dict: {e}") from None
        index = dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                         itertools.chain.from_iterable(g["params"] for g in self.param_groups)))
        for k, st in sd["state"].items():
            _check(k in index, f"the state dict has state for parameter {k!r}, which no param group lists")
            p = index[k]
            unknown = sorted(set(st) - set(STATE_KEYS))
            _check(not unknown, f"state of parameter {k}: unknown entries {unknown} (not a FIP state)")
            _check(("anchor" in st) == ("fisher0" in st), f"state of parameter {k}: anchor and fisher0 come together")
            for key, v in st.items():
                want = () if key == "step" else tuple(p.shape)
                _check(isinstance(v, Tensor) and v.is_floating_point(),
                       f"state[{key!r}] of parameter {k} must be a floating-point tensor")
                _check(tuple(v.shape) == want, f"state[{key!r}] of parameter {k} has shape {tuple(v.shape)}, "
                       f"its parameter needs {want}")

    # ------------------------------------------------------------------ the step
    def _gather(self, group: dict) -> dict[torch.device, list[Tensor]]:
        """Parameters of ``group`` that have a gradient, by device (one fused call per device)."""
        by_dev: dict[torch.device, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("FIP does not support sparse gradients (use nn.Embedding(sparse=False))")
            if p.grad.is_complex():
                raise RuntimeError("FIP does not support complex gradients")
            by_dev[p.device].append(p)
        return by_dev

    def _call_closure(self, closure: Callable) -> Any:
        with torch.enable_grad():
            return closure()

    def step(self, closure: Optional[Callable] = None) -> Optional[Tensor]:
        """One FIP step.  ``closure`` zeroes the gradients, runs forward and backward and returns the loss (see
        the class docstring per estimator).  Returns the loss of the first closure call (at the unperturbed θ
        for ``"fd"``; at θ + e on lagged suppressor calls), or ``None`` without a closure.

        Optimizer step hooks (``register_step_pre_hook`` / ``post``, global ones) and the profiler's
        ``Optimizer.step#FIP.step`` record work as with any torch optimizer; only when there is none of them, the
        step skips torch's wrapper (its record_function costs microseconds per call even with no profiler)."""
        if ((self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_optimizer_pre_hooks
             or _global_optimizer_post_hooks or torch.autograd._profiler_enabled())
                and type(self).step is FIP.step):    # (a subclass's own step is wrapped by torch already)
            return _profiled_step(self, closure)
        return _step_without_grad(self, closure)

    step.hooked = True       # torch's Optimizer.__init__ wraps a step without this mark (profile_hook_step)

    def _step(self, closure: Optional[Callable]) -> Optional[Tensor]:
        groups = self.param_groups
        sup = [g["eta_F"] > 0 and g["trace_estimator"] != "lagged" and g["calls"] % g["trace_every"] == 0
               for g in groups]
        if closure is None and any(sup):
            est = next(g["trace_estimator"] for s, g in zip(sup, groups) if s)
            raise ValueError(
                f"FIP(trace_estimator={est!r}) needs a closure on suppressor steps (every trace_every-th call) to "
                "evaluate the loss a second time; pass step(closure), or use trace_estimator='lagged' for a "
                "closure-free, one-pass suppressor (Hugging Face Trainer, GradScaler)")
        self.create_graph = any(s and g["trace_estimator"] == "batch" for s, g in zip(sup, groups))
        try:
            out = self._call_closure(closure) if closure is not None else None
        finally:
            self.create_graph = False
        loss, trace = (out if isinstance(out, tuple) else (out, None))
        if self._lazy.pending and not self._lazy.applied:
            self._discard_unapplied()
        slices = [sl for group, s in zip(groups, sup) for sl in self._slices(group, s)]
        self._norms(slices)
        if any(sl.sup and sl.group["trace_estimator"] == "fd" for sl in slices):
            self._fd_second_pass(slices, closure)
        if any(sl.sup and sl.group["trace_estimator"] in ("batch", "exact") for sl in slices):
            self._double_backward(slices, trace)
        self._lagged_schedule(slices)
        for sl in slices:
            self._fused_step(sl)
        self._after_step(slices)
        return loss

    def _slices(self, group: dict, sup: bool) -> list[_Slice]:
        """This step's slices of ``group``: from its step plan when the gradients sit where they sat last step
        and nothing structural changed (no per-tensor Python work beyond reading the gradients), else built anew
        (and planned for the next step)."""
        plan = self._plans.get(id(group))
        grads, ptrs, has_none = host.read_grads(group["params"], None if plan is None else plan.grad_ptrs)
        missing = _plan.missing_of(ptrs) if has_none else None
        if plan is None or not plan.matches(group, _plan.structure_of(self._epoch, group), missing):
            by_dev = self._gather(group)
            for ps in by_dev.values():
                for p in ps:
                    self._lazy_state(p, group)
            plan = self._plan_group(group, by_dev, missing)
            if plan is None:
                return [_Slice(group, sup, ps, [p.grad for p in ps], self._impl_of(dev), dev)
                        for dev, ps in by_dev.items()]
        plan.grad_ptrs = ptrs      # the next step's read returns this very tuple if no gradient moved
        return [_Slice(group, sup, dp.ps, dp.grads(grads), self._impl_of(dp.device), dp.device, plan=dp,
                       gptrs=dp.pointers(ptrs)) for dp in plan.devices]

    def _impl_of(self, device: torch.device) -> str:
        impl = self._resolved.get(device)
        if impl is None:
            impl = self._resolved[device] = ops.resolve(self.impl, device)
        return impl

    def _plan_group(self, group: dict, by_dev: dict, missing: Optional[tuple]) -> Optional[_plan.GroupPlan]:
        """The plan of ``group``'s parameters that have a gradient (``by_dev``, their state created), kept for the
        next steps; None for tensor subclasses, which step without a plan."""
        self._plans.pop(id(group), None)
        if not all(_plan.plannable(ps) for ps in by_dev.values()):
            return None
        index = {id(p): i for i, p in enumerate(group["params"])}
        full = len(by_dev) == 1 and missing is None
        devices = [_plan.device_plan(self.state, ps, None if full else [index[id(p)] for p in ps], dev)
                   for dev, ps in by_dev.items()]
        planned = {id(p) for ps in by_dev.values() for p in ps}
        # _shift_pert may use the plan only if it holds every parameter that has a stored perturbation
        pert_complete = all(id(p) in planned or "pert" not in self.state.get(p, {}) for p in group["params"])
        if group["trace_estimator"] == "lagged" and any(dp.pert is None for dp in devices):
            pert_complete = False
        plan = self._plans[id(group)] = _plan.GroupPlan(group, list(group["params"]),
                                                        _plan.structure_of(self._epoch, group), missing, devices,
                                                        pert_complete)
        return plan

    def _discard_unapplied(self) -> None:
        """A step with a pending but never-applied perturbation: its gradient was taken at θ, so there is
        nothing to restore; drop e (this step is a plain one)."""
        self._lazy.unapplied_at_step()
        self._zero_pert()
        self._lazy.pending = False

    @staticmethod
    def _share_flag(slices: list[_Slice], flags: list[Tensor]) -> list[Tensor]:
        """The step-wide non-finite flag (max over every slice), on each slice's device."""
        if len(flags) == 1:
            return flags
        dev0 = slices[0].device
        any_inf = torch.stack([_on(f, dev0) for f in flags]).amax()
        return [_on(any_inf, sl.device) for sl in slices]

    def _norms(self, slices: list[_Slice]) -> None:
        """‖g‖ per group — one global norm over all of its devices — and the step-wide found_inf flag."""
        flags = []
        for sl in slices:
            sl.gnorm, f = _global_norm(sl.g, sl.impl, sl.key("g", sl.gptrs))
            flags.append(f)
        if len(slices) == 1:          # one group on one device: nothing to combine
            slices[0].found_inf = flags[0]
            return
        parts = defaultdict(list)
        for sl in slices:
            parts[id(sl.group)].append(sl)
        for ps in parts.values():
            if len(ps) > 1:
                dev0 = ps[0].device
                total = torch.stack([_on(sl.gnorm, dev0).square() for sl in ps]).sum().sqrt()
                for sl in ps:
                    sl.gnorm = _on(total, sl.device)
        for sl, f in zip(slices, self._share_flag(slices, flags) if slices else []):
            sl.found_inf = f

    def _fd_second_pass(self, slices: list[_Slice], closure: Callable) -> None:
        sups = [sl for sl in slices if sl.sup and sl.group["trace_estimator"] == "fd"]
        for sl in sups:
            h = sl.group
            sl.restore = h["rho"] / sl.gnorm.clamp_min(_TINY)
            ops.perturb_(sl.ps, sl.g, sl.restore, sl.found_inf, impl=sl.impl, cache_key=sl.key("ps,g", sl.gptrs))
            sl.mix = mix_coefficient(h["eta_F"], sl.gnorm, h["rho"], h["max_mix"])
        # Every group's gradient at θ is set aside: the second pass then writes only fresh tensors, so no group
        # steps with a gradient taken at θ + e, whatever the closure does (zero_grad(set_to_none=False) included).
        saved = [(p, p.grad) for g in self.param_groups for p in g["params"]]
        for p, _ in saved:
            p.grad = None
        self.perturbed_pass = True
        try:
            self._call_closure(closure)
            grads_pert = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in sl.ps] for sl in sups]
        except BaseException:
            for sl in sups:       # put θ back before the error propagates
                ops.perturb_(sl.ps, sl.g, -sl.restore, sl.found_inf, impl=sl.impl, cache_key=sl.key("ps,g", sl.gptrs))
            raise
        finally:
            self.perturbed_pass = False
            for p, g in saved:    # p.grad is the gradient at θ again, as after a plain step
                p.grad = g
        for sl, gp in zip(sups, grads_pert):
            sl.gp = gp
        inf2 = self._share_flag(sups, [_global_norm(sl.gp, sl.impl, sl.key("gp", _plan.pointers(sl.gp)))[1]
                                       for sl in sups])
        for sl, f2 in zip(sups, inf2):
            # A non-finite perturbed gradient with a finite first one: undo θ + e now (the fused step will skip).
            ops.perturb_(sl.ps, sl.g, -sl.restore, (1.0 - f2) + sl.found_inf, impl=sl.impl,
                         cache_key=sl.key("ps,g", sl.gptrs))
        self._raise_flag(slices, inf2[0])

    def _raise_flag(self, slices: list[_Slice], flag: Tensor) -> None:
        """found_inf ← max(found_inf, flag) on every slice (``flag`` is already step-wide)."""
        for sl in slices:
            sl.found_inf = torch.maximum(sl.found_inf, _on(flag, sl.device))

    def _double_backward(self, slices: list[_Slice], trace: Optional[Tensor]) -> None:
        batch = [sl for sl in slices if sl.sup and sl.group["trace_estimator"] == "batch"]
        exact = [sl for sl in slices if sl.sup and sl.group["trace_estimator"] == "exact"]
        with torch.enable_grad():
            for sl in batch:
                if not all(g.requires_grad for g in sl.g):
                    raise ValueError("trace_estimator='batch' needs the graph of the gradient: call "
                                     "opt.backward(loss) (or loss.backward(create_graph=opt.create_graph)) in the "
                                     "closure")
                T = sum(g.float().pow(2).sum() for g in sl.g)
                self._set_exact_direction(sl, torch.autograd.grad(T, sl.ps, allow_unused=True))
            if exact:
                if trace is None or not isinstance(trace, Tensor) or not trace.requires_grad:
                    raise ValueError("trace_estimator='exact' needs a closure returning (loss, trace) with a "
                                     "differentiable trace, e.g. fip_fast.reference.trace_exact(model, x, y)")
                grads = torch.autograd.grad(trace, [p for sl in exact for p in sl.ps], allow_unused=True)
                k = 0
                for sl in exact:
                    self._set_exact_direction(sl, grads[k:k + len(sl.ps)])
                    k += len(sl.ps)
        # The graph of the gradient is no longer needed: keep p.grad as a plain tensor.
        for sl in slices:
            for p in sl.ps:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()
            sl.g = [p.grad for p in sl.ps]
        sups = batch + exact
        flags = self._share_flag(sups, [_global_norm(sl.gp, sl.impl)[1] for sl in sups])
        self._raise_flag(slices, flags[0])

    @staticmethod
    def _set_exact_direction(sl: _Slice, grad_T) -> None:
        eta = sl.group["eta_F"]
        sl.gp = [g.detach().float() + eta * (t.float() if t is not None else 0.0) for g, t in zip(sl.g, grad_T)]
        sl.mix = 1.0

    def _lagged_schedule(self, slices: list[_Slice]) -> None:
        """For lagged slices: r/‖g‖ of the perturbation the step stores (0 unless the next call is scheduled)."""
        for sl in slices:
            h = sl.group
            if h["trace_estimator"] != "lagged" or h["eta_F"] <= 0:
                continue
            # r = min(2·η_F·‖g‖, max_mix·ρ) = c·ρ with c the fd mix coefficient; the kernel scales g by r/‖g‖.
            sl.mix = mix_coefficient(h["eta_F"], sl.gnorm, h["rho"], h["max_mix"]) * (
                h["rho"] / sl.gnorm.clamp_min(_TINY)) * self._next_is_suppressor(h, sl.device)

    def _next_is_suppressor(self, h: dict, device: torch.device) -> Any:
        """1 when the call after this one is a lagged suppressor call, else 0 — a number where the schedule is
        trivial, a 0-dim device tensor from the non-skipped-step counter otherwise (no host sync)."""
        if h["eta_F"] <= 0:
            return 0.0
        if h["trace_every"] == 1:
            return 1.0
        calls = _on(self._lagged_counters(h, device)[0], device)
        return (torch.remainder(calls + 1.0, float(h["trace_every"])) == 0).float()

    def _fused_step(self, sl: _Slice) -> None:
        h, ps, dp = sl.group, sl.ps, sl.plan
        lagged = h["trace_estimator"] == "lagged"
        not_inf = torch.rsub(sl.found_inf, 1.0)       # 1 − found_inf (the operator form costs 3× more host time)
        if dp is not None:      # the plan's lists; one op advances every step count (views of one vector)
            f0, anchor, mom, fis, steps = dp.fisher0, dp.anchor, dp.momentum, dp.fisher, dp.steps
            pert = dp.pert if lagged else None
            dp.step_vector.add_(not_inf)
        else:
            st = [self.state[p] for p in ps]
            f0, anchor = [s.get("fisher0") for s in st], [s.get("anchor") for s in st]
            mom, fis, steps = [s["momentum_buffer"] for s in st], [s["fisher"] for s in st], [s["step"] for s in st]
            pert = [s["pert"] for s in st] if lagged else None
            torch._foreach_add_(steps, not_inf) if len(steps) > 1 else steps[0].add_(not_inf)
        ops.fip_step_(
            ps, sl.g, sl.gp, f0, anchor, mom, fis, pert, impl=sl.impl,
            cache_key=sl.gp_key("step"),
            lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"], weight_decay=h["weight_decay"],
            eta_r=h["eta_r"], beta=h["beta"], mix=sl.mix if sl.gp is not None else None,
            restore_scale=sl.restore,   # set by the fd second pass only
            precondition=h["precondition"] == "fisher", damping=h["damping"], step=steps,
            next_pert_scale=sl.mix if lagged else None, found_inf=sl.found_inf)
        if lagged and self._lazy.applied and (sl.found_inf.device.type != "cpu" or float(sl.found_inf.numpy()) != 0.0):
            # A skipped step wrote nothing: take off the e its gradient was taken at, so that between steps the
            # parameters hold θ (e stays stored and is applied again at the next training forward).  (A CPU flag
            # is read on the host for free; a device flag is read by the kernel.)
            ops.perturb_(ps, pert, -1.0, not_inf, impl=sl.impl, cache_key=sl.key("ps,pert"))

    def _after_step(self, slices: list[_Slice]) -> None:
        """Count the call and a skip (on the device), advance the lagged schedule, arm the lazy perturbation."""
        for group in self.param_groups:
            group["calls"] += 1
        if not slices:
            return
        self._skips.add(slices[0].found_inf)
        done = set()
        for sl in slices:
            h = sl.group
            if h["trace_estimator"] != "lagged" or id(h) in done:
                continue
            done.add(id(h))
            calls, on = self._lagged_counters(h, sl.device)
            ok = torch.rsub(_on(sl.found_inf, calls.device), 1.0)
            sched = self._next_is_suppressor(h, calls.device)
            on.mul_(torch.rsub(ok, 1.0)).add_(ok * sched)     # a skipped step keeps the e it had stored
            calls.add_(ok)
        if done:
            self._lazy.arm()


def _step_without_grad(opt: FIP, closure: Optional[Callable]) -> Optional[Tensor]:
    """``FIP._step`` under no_grad (set directly: the context manager's objects cost microseconds per step)."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        return opt._step(closure)
    finally:
        torch._C._set_grad_enabled(prev)


#: the step as torch's wrapper runs it: the profiler record and the optimizer step hooks around it
_profiled_step = Optimizer.profile_hook_step(_step_without_grad)
