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

Where the code lives: this module holds :class:`FIP` (the ``torch.optim.Optimizer`` contract: hyper-parameters,
state dicts, ``step``) and the private modules hold one job each — ``_hyper`` (validation of hyper-parameters,
groups, ``fisher0`` and state dicts), ``_state`` (per-parameter state), ``_slices`` (a step's per-group, per-device
records, norms, flags, step plans), ``_suppressors`` (one object per estimator: ``FdSuppressor``,
``LaggedSuppressor``, ``BatchSuppressor``, ``ExactSuppressor``), ``_lazy`` (the lazy lagged perturbation and its
schedule) and ``_step`` (one step, in order).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

# The names re-exported below (noqa: F401) were defined in this module before it became a package.
from fip_fast import _plan, ops  # noqa: F401
from fip_fast.backends import host
from fip_fast.optim import _hyper, _lazy, _slices, _state
from fip_fast.optim._hyper import (  # noqa: F401
    HYPER_KEYS,
    PRECONDITIONERS,
    STATE_KEYS,
    TRACE_ESTIMATORS,
    _check,
    _real,
    validate_hyperparameters,
)
from fip_fast.optim._lazy import _LazyPerturbation
from fip_fast.optim._slices import _TINY, _global_norm, _on, _SkipCounter, _Slice  # noqa: F401
from fip_fast.optim._step import _profiled_step, _step_without_grad
from fip_fast.optim._step import run as _run_step
from fip_fast.optim._suppressors import is_suppressor_call
from fip_fast.reference import mix_coefficient  # noqa: F401

logger = logging.getLogger("fip_fast")


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
    ``copy.deepcopy((model, opt))`` or pickling both together gives a pair that steps as the original would;
    ``torch.save(model)`` works after lagged steps (the copy's forward hook belongs to no optimizer).

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
        _hyper.check_impl(impl)
        self._init_runtime(impl)
        super().__init__(params, defaults)
        host.prepare()                   # the C++ host helper of step(): loaded if built, else built in background
        _hyper.check_impl(impl, [p for g in self.param_groups for p in g["params"]])
        _state.init_anchor(self, fisher0 or {})

    def _init_runtime(self, impl: str) -> None:
        """What FIP keeps besides torch's ``defaults`` / ``state`` / ``param_groups``."""
        self.impl = impl
        self.create_graph = False
        #: True while :meth:`step` runs the closure at the perturbed θ + e (``"fd"`` suppressor calls).
        self.perturbed_pass = False
        self._skips = _SkipCounter()
        self._lazy = _LazyPerturbation(self)
        self._ids: Optional[set] = None
        #: bumped by every structural change (groups, loaded state, new state entries): invalidates step plans
        self._epoch = 0
        self._plans: dict[int, _plan.GroupPlan] = {}
        self._resolved: dict[torch.device, str] = {}

    def __getstate__(self) -> dict:
        """torch's (``defaults``, ``state``, ``param_groups``) plus ``impl``, the skip count and whether e is
        applied: a ``copy.deepcopy`` or an unpickled FIP rebuilds the rest and steps like the original."""
        return {**super().__getstate__(), "_fip_impl": self.impl, "_fip_skips": self._skips.count,
                "_fip_applied": self._lazy.applied}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        impl, skips, applied = (state.pop(k, d) for k, d in (("_fip_impl", "auto"), ("_fip_skips", None),
                                                              ("_fip_applied", False)))
        super().__setstate__(state)
        if "_lazy" in self.__dict__:     # torch's load_state_dict hands the loaded state and groups in here
            return
        self._init_runtime(impl)         # a copy or an unpickled optimizer: rebuild what FIP keeps
        host.prepare()
        self._skips.count = skips
        self._lazy.reset(any("lagged_calls" in g and g["params"] for g in self.param_groups))
        if applied:              # the copied parameters hold θ + e: the next step takes e off
            self._lazy.disarm()
            self._lazy.applied = True

    # ------------------------------------------------------------------ groups, state, plans
    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, with the parameters materialized first (a generator is consumed once)
        and the whole group validated *before* it is registered."""
        super().add_param_group(_hyper.param_group(param_group, self.defaults))
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

    # the step's parts, kept reachable as methods (tests replace _plan_group on an instance to step planless)
    _lazy_state = _state.lazy_state
    _plan_group = _slices.plan_group
    _impl_of = _slices.impl_of
    _norms = staticmethod(_slices.norms)
    _lagged_counters = staticmethod(_lazy.lagged_counters)
    _step = _run_step

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
        _hyper.state_dict(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        lagged = _state.place_loaded(self)
        self._ids = None
        self.invalidate_plans()
        self._lazy.reset(lagged)

    # ------------------------------------------------------------------ public helpers
    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite gradients (syncs with the device)."""
        return self._skips.total()

    def is_suppressor_call(self, group: Optional[dict] = None) -> bool:
        """Whether the next :meth:`step` call applies the suppressor for ``group`` (default: the first).  For
        ``"lagged"``: whether the stored perturbation is a scheduled one (reads a device flag: syncs)."""
        return is_suppressor_call(group if group is not None else self.param_groups[0])

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, keeping the graph of the gradient when the suppressor needs double backward."""
        loss.backward(create_graph=self.create_graph)

    @property
    def is_perturbed(self) -> bool:
        """Whether the parameters hold θ + e right now (``"lagged"``: only between the first training forward
        after a step and the next step; never between steps, nor inside :meth:`unperturbed`)."""
        return self._lazy.applied

    @property
    def _suspended(self) -> bool:
        """Inside :meth:`unperturbed`, the applied perturbation is taken off."""
        return self._lazy.suspended

    def apply_perturbation(self) -> None:
        """θ ← θ + e with the stored lagged perturbation, if one is pending (idempotent).  The forward pre-hook
        calls this at the first training-mode, grad-enabled forward after a step; call it yourself before a
        forward that does not go through ``nn.Module.__call__``."""
        self._lazy.apply()

    def remove_perturbation(self) -> None:
        """Drop the lagged perturbation for good: θ ← θ − e if it is applied, and e ← 0 for every parameter.

        Between steps the parameters already hold θ, so this only discards the pending e (the suppressor resumes
        at its next scheduled call).  Idempotent; a no-op for the other estimators.  θ is recovered as
        (θ + e) − e where e was applied.
        """
        self._lazy.remove()

    def unperturbed(self) -> contextlib.AbstractContextManager:
        """Inside the block the parameters hold θ (evaluate, save, log inside).  Between steps this is already
        the case (a no-op); between a training forward and the next step the applied e is taken off and put back
        when the block ends (θ is then (θ + e) − e: one rounding of the parameter dtype)."""
        return self._lazy.unperturbed()

    # ------------------------------------------------------------------ the step
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
