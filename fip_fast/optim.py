"""``fip_fast.FIP``: the FIP optimizer (METHOD.md "One optimizer step"), a ``torch.optim.Optimizer``.

This module orchestrates; the arithmetic of a step lives in the kernel-level ops reached through
:mod:`fip_fast.ops` (reference / foreach / Triton / CUDA), whose contract is
:func:`fip_fast.reference.fip_step_`.

Suppressor estimators (``trace_estimator``), applied on every ``trace_every``-th call of :meth:`FIP.step`
(calls 0, k, 2k, … of each parameter group; other calls are plain steps d = g):

``"fd"`` (default)
    Finite difference, two forward/backward passes: the closure runs at θ, the optimizer perturbs
    θ + e (e = ρ·g/‖g‖, global norm over the group), calls the closure again, then the fused step restores θ and
    uses d = g + c·(g' − g), c = min(2·η_F·‖g‖/ρ, max_mix).  Needs a closure on suppressor steps.
    While the optimizer runs the closure at θ + e, :attr:`FIP.perturbed_pass` is ``True``: a closure over a model
    with BatchNorm should run that pass inside :func:`frozen_running_stats` (batch statistics are still used, the
    running estimates are not updated), as SAM implementations do — otherwise every step folds the statistics of
    the *perturbed* network into the running mean/var that evaluation uses (measured on the demo CNN: clean
    accuracy fell by up to 10 points at the end of a cosine schedule whose lr was already ≈ 0).
``"lagged"``
    One pass (METHOD.md "Closure-free suppressor"): at the end of the call before a suppressor call, the
    perturbation e = r·g/‖g‖, r = min(2·η_F·‖g‖, max_mix·ρ), is applied in place; the next forward/backward runs
    at θ + e; the next step restores θ inside the fused kernel.  Works without a closure (Hugging Face
    ``Trainer``, ``torch.amp.GradScaler``).  Between such steps the model holds perturbed weights: evaluate or
    save inside ``with opt.unperturbed(): …``.
``"batch"``
    T = ‖∇ℓ‖², gradient 2·H·ḡ by double backward.  On suppressor calls the closure must build the graph of the
    gradient: call ``opt.backward(loss)`` (or ``loss.backward(create_graph=opt.create_graph)``) in it.
``"exact"``
    T = (1/B)·Σ‖∇ℓ_n‖² with per-sample gradients.  The closure returns ``(loss, trace)`` where ``trace`` is a
    differentiable scalar, e.g. :func:`fip_fast.reference.trace_exact` ``(model, x, y)``.  Reference only.

For ``"batch"`` and ``"exact"`` the direction is d = g + η_F·∇T exactly (no ``max_mix`` cap: there is no
finite-difference extrapolation to guard).

Non-finite gradients: a step whose gradients (either pass) contain NaN/Inf writes nothing — parameters and every
state tensor keep their bits — and is counted in :attr:`FIP.skipped_steps` (a warning is logged once).  The one
exception to bit-identity: on an ``"fd"`` suppressor call whose *first* gradient is finite but whose perturbed
gradient is not, θ was already moved to θ + e and is put back as (θ + e) − e, the same rounding every suppressor
step has.  The check of ``found_inf`` happens on the device; the optimizer syncs with the host to log the warning
only on CPU tensors or once every ``_SKIP_CHECK_EVERY`` calls on accelerators.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .reference import mix_coefficient

logger = logging.getLogger("fip_fast")

TRACE_ESTIMATORS = ("fd", "lagged", "batch", "exact")
PRECONDITIONERS = (None, "fisher")
_SKIP_CHECK_EVERY = 50
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


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class FIP(Optimizer):
    r"""Fisher-Information-guided Purification as an optimizer.

    Minimizes J(θ) = ℓ(θ) + η_F·T(θ) + (η_r/2)·Σ F0·(θ − θ0)² with SGD + momentum, where T is the trace of the
    empirical Fisher (the *suppressor*, pushing toward flat minima) and the last term is the Fisher-weighted
    anchor (CDA) to the weights θ0 held at construction.

    Args:
        params: iterable of parameters or of dicts (param groups with their own hyper-parameters).
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
        precondition: ``None`` or ``"fisher"``: divide d by fisher/(1 − β^t) + damping (NGF-style).
        damping: λ > 0 of the preconditioner.
        fisher0: mapping parameter → F0 tensor of the same shape (e.g. from :func:`fip_fast.estimate_fisher`).
            Parameters without an entry have no anchor (and no copy θ0 is kept for them).
        impl: ``"auto"`` | ``"reference"`` | ``"foreach"`` | ``"triton"`` | ``"cuda"`` (see :mod:`fip_fast.ops`).
        max_mix: cap on the fd mix coefficient c = min(2·η_F·‖g‖/ρ, max_mix); at the cap (1.0) a suppressor step
            is exactly a SAM step of radius ρ, the known-stable limit (METHOD.md "Stability").

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
        self._validate(defaults)
        _check(impl == "auto" or impl in ops.IMPLS, f"impl must be 'auto' or one of {ops.IMPLS}, got {impl!r}")
        self.impl = impl
        self.create_graph = False
        #: True while :meth:`step` runs the closure at the perturbed θ + e (``"fd"`` suppressor calls).
        self.perturbed_pass = False
        self._skipped = None             # 0-dim device tensor: number of skipped steps
        self._skip_warned = False
        self._calls_since_check = 0
        self._perturbed = False          # lagged: parameters currently hold θ + e
        self._suspended = False          # lagged: inside unperturbed(), the perturbation is taken off
        super().__init__(params, defaults)
        if impl not in ("auto", "reference"):
            for dev in {p.device for g in self.param_groups for p in g["params"]}:
                ops.resolve(impl, dev)   # fail now, not at the first step, if the impl can't run here
        self._init_anchor(fisher0 or {})

    # ------------------------------------------------------------------ construction and validation
    @staticmethod
    def _validate(h: dict) -> None:
        lr = h["lr"]
        _check(not isinstance(lr, Tensor) or lr.numel() == 1, "lr as a tensor must have one element")
        _check(float(lr) >= 0.0 if not isinstance(lr, Tensor) else True, f"lr must be ≥ 0, got {lr}")
        _check(0.0 <= h["momentum"] < 1.0, f"momentum must be in [0, 1), got {h['momentum']}")
        _check(not h["nesterov"] or h["momentum"] > 0, "nesterov needs momentum > 0")
        _check(h["weight_decay"] >= 0.0, f"weight_decay must be ≥ 0, got {h['weight_decay']}")
        _check(h["eta_F"] >= 0.0, f"eta_F must be ≥ 0, got {h['eta_F']}")
        _check(h["eta_r"] >= 0.0, f"eta_r must be ≥ 0, got {h['eta_r']}")
        _check(h["rho"] > 0.0, f"rho must be > 0, got {h['rho']}")
        te = h["trace_every"]
        _check(isinstance(te, int) and not isinstance(te, bool) and te >= 1,
               f"trace_every must be an int ≥ 1, got {te!r}")
        _check(h["trace_estimator"] in TRACE_ESTIMATORS,
               f"trace_estimator must be one of {TRACE_ESTIMATORS}, got {h['trace_estimator']!r}")
        _check(0.0 <= h["beta"] < 1.0, f"beta must be in [0, 1), got {h['beta']}")
        _check(h["precondition"] in PRECONDITIONERS,
               f"precondition must be one of {PRECONDITIONERS}, got {h['precondition']!r}")
        _check(h["damping"] > 0.0, f"damping must be > 0, got {h['damping']}")
        _check(h["max_mix"] > 0.0, f"max_mix must be > 0, got {h['max_mix']}")

    def add_param_group(self, param_group: dict) -> None:
        for p in (param_group["params"] if not isinstance(param_group["params"], Tensor)
                  else [param_group["params"]]):
            if p.is_complex():
                raise ValueError("FIP does not support complex parameters (view them as real with "
                                 "torch.view_as_real first)")
            if not p.is_floating_point():
                raise ValueError(f"FIP needs floating-point parameters, got {p.dtype}")
        super().add_param_group(param_group)
        self._validate({**self.defaults, **self.param_groups[-1]})

    @torch.no_grad()
    def _init_anchor(self, fisher0: dict[Tensor, Tensor]) -> None:
        known = {id(p): p for g in self.param_groups for p in g["params"]}
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

    def _lazy_state(self, p: Tensor, group: dict) -> dict:
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            st["fisher"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if group["trace_estimator"] == "lagged" and "pert" not in st:
            st["pert"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return st

    # ------------------------------------------------------------------ public helpers
    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of non-finite gradients (syncs with the device)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    def is_suppressor_call(self, group: Optional[dict] = None) -> bool:
        """Whether the next :meth:`step` call applies the suppressor for ``group`` (default: the first)."""
        g = group if group is not None else self.param_groups[0]
        return g["eta_F"] > 0 and g["calls"] % g["trace_every"] == 0

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, keeping the graph of the gradient when the suppressor needs double backward."""
        loss.backward(create_graph=self.create_graph)

    @property
    def is_perturbed(self) -> bool:
        """Whether the parameters currently hold θ + e (``"lagged"`` only; False inside :meth:`unperturbed`)."""
        return self._perturbed

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        """Remove the lagged perturbation for good: θ ← θ − e and e ← 0 for every parameter.

        Use it where training *ends* (before returning, evaluating or saving the model of a hand-written loop).
        The optimizer stays consistent: the next :meth:`step` has nothing to restore and the suppressor resumes
        at its next scheduled call.  Idempotent; a no-op for the other estimators.  Inside :meth:`unperturbed`
        the parameters already hold θ, so only e is zeroed.  θ is recovered as (θ + e) − e.
        """
        if self._perturbed:
            self._apply_pert(-1.0)
        for p, st in self.state.items():
            if "pert" in st:
                st["pert"].zero_()
        self._perturbed = False

    @contextlib.contextmanager
    def unperturbed(self):
        """Temporarily remove the lagged perturbation from the parameters (evaluate, save, log inside).

        A no-op for the other estimators.  Restoring is (θ + e) − e and re-applying θ + e, so values inside the
        block may differ from the true θ by one rounding of the parameter dtype.
        """
        if not self._perturbed:
            yield
            return
        self._apply_pert(-1.0)
        self._perturbed, self._suspended = False, True
        try:
            yield
        finally:
            self._apply_pert(1.0)
            self._perturbed, self._suspended = True, False

    @torch.no_grad()
    def _apply_pert(self, sign: float) -> None:
        for group in self.param_groups:
            ps = [p for p in group["params"] if "pert" in self.state[p]]
            if ps:
                ops.perturb_(ps, [self.state[p]["pert"] for p in ps], sign, impl=self._impl_for(ps[0]))

    def state_dict(self) -> dict:
        """The torch state dict.  With ``"lagged"`` it describes the *unperturbed* point: save the model inside
        ``with opt.unperturbed():``; :meth:`load_state_dict` re-applies the stored perturbation ``pert`` to the
        (unperturbed) parameters, so load the model's weights first, then the optimizer's."""
        sd = super().state_dict()
        sd["fip_perturbed"] = self._perturbed or self._suspended
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        perturbed = bool(state_dict.pop("fip_perturbed", False))
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; FIP keeps fp32 state whatever the parameter dtype.
        for p, st in self.state.items():
            for k in ("momentum_buffer", "fisher", "pert", "fisher0"):
                if k in st:
                    st[k] = st[k].to(device=p.device, dtype=torch.float32)
            if "step" in st:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            if "anchor" in st:
                st["anchor"] = st["anchor"].to(device=p.device, dtype=p.dtype)
        self._perturbed = False
        if perturbed:
            self._apply_pert(1.0)
            self._perturbed = True

    # ------------------------------------------------------------------ the step
    def _impl_for(self, p: Tensor) -> str:
        return ops.resolve(self.impl, p.device)

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

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Optional[Tensor]:
        """One FIP step.  ``closure`` zeroes the gradients, runs forward and backward and returns the loss (see
        the class docstring per estimator).  Returns the loss of the first closure call (at the unperturbed θ
        for ``"fd"``; at θ + e on lagged suppressor calls), or ``None`` without a closure."""
        groups = self.param_groups
        sup = [self.is_suppressor_call(g) for g in groups]
        needs_closure = any(s and g["trace_estimator"] in ("fd", "batch", "exact") for s, g in zip(sup, groups))
        if needs_closure and closure is None:
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

        # Per group and device: the gradient g, its norm and the non-finite flag.
        plan = []
        for group, is_sup in zip(groups, sup):
            for dev, ps in self._gather(group).items():
                impl = ops.resolve(self.impl, dev)
                for p in ps:
                    self._lazy_state(p, group)
                g = [p.grad for p in ps]
                gnorm, found_inf = ops.global_norm(g, impl=impl)
                plan.append(dict(group=group, sup=is_sup, ps=ps, g=g, gnorm=gnorm, found_inf=found_inf,
                                 impl=impl, gp=None, restore=None, mix=None))

        est_sup = {e: [it for it in plan if it["sup"] and it["group"]["trace_estimator"] == e]
                   for e in TRACE_ESTIMATORS}
        if est_sup["fd"]:
            self._fd_second_pass(est_sup["fd"], closure)
        if est_sup["batch"] or est_sup["exact"]:
            self._double_backward(est_sup["batch"], est_sup["exact"], trace, plan)

        for it in plan:
            self._fused_step(it)
        if not self._after_step(plan):
            for group in groups:   # a skipped step leaves the suppressor schedule untouched too
                group["calls"] += 1
        return loss

    def _fd_second_pass(self, items: list[dict], closure: Callable) -> None:
        for it in items:
            h = it["group"]
            it["restore"] = h["rho"] / it["gnorm"].clamp_min(_TINY)
            ops.perturb_(it["ps"], it["g"], it["restore"], it["found_inf"], impl=it["impl"])
            it["mix"] = mix_coefficient(h["eta_F"], it["gnorm"], h["rho"], h["max_mix"])
        # Keep g alive; the second backward writes fresh gradient tensors.
        for it in items:
            for p in it["ps"]:
                p.grad = None
        self.perturbed_pass = True
        try:
            self._call_closure(closure)
        finally:
            self.perturbed_pass = False
        for it in items:
            gp = [p.grad if p.grad is not None else torch.zeros_like(p) for p in it["ps"]]
            _, inf2 = ops.global_norm(gp, impl=it["impl"])
            # A non-finite perturbed gradient with a finite first one: undo θ + e now (the fused step will skip).
            ops.perturb_(it["ps"], it["g"], -it["restore"], (1.0 - inf2) + it["found_inf"], impl=it["impl"])
            it["found_inf"] = torch.maximum(it["found_inf"], inf2)
            it["gp"] = gp
            for p, g in zip(it["ps"], it["g"]):     # p.grad is the gradient at θ again, as after a plain step
                p.grad = g

    def _double_backward(self, batch_items: list[dict], exact_items: list[dict], trace: Optional[Tensor],
                         plan: list[dict]) -> None:
        with torch.enable_grad():
            for it in batch_items:
                if not all(g.requires_grad for g in it["g"]):
                    raise ValueError("trace_estimator='batch' needs the graph of the gradient: call "
                                     "opt.backward(loss) (or loss.backward(create_graph=opt.create_graph)) in the "
                                     "closure")
                T = sum(g.float().pow(2).sum() for g in it["g"])
                hg = torch.autograd.grad(T, it["ps"], allow_unused=True)
                self._set_exact_direction(it, hg)
            if exact_items:
                if trace is None or not isinstance(trace, Tensor) or not trace.requires_grad:
                    raise ValueError("trace_estimator='exact' needs a closure returning (loss, trace) with a "
                                     "differentiable trace, e.g. fip_fast.reference.trace_exact(model, x, y)")
                params = [p for it in exact_items for p in it["ps"]]
                grads = torch.autograd.grad(trace, params, allow_unused=True)
                k = 0
                for it in exact_items:
                    self._set_exact_direction(it, grads[k:k + len(it["ps"])])
                    k += len(it["ps"])
        # The graph of the gradient is no longer needed: keep p.grad as a plain tensor.
        for it in plan:
            for p in it["ps"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()
            it["g"] = [p.grad for p in it["ps"]]

    @staticmethod
    def _set_exact_direction(it: dict, grad_T) -> None:
        eta = it["group"]["eta_F"]
        it["gp"] = [g.detach().float() + eta * (t.float() if t is not None else 0.0)
                    for g, t in zip(it["g"], grad_T)]
        it["mix"] = 1.0
        _, inf2 = ops.global_norm(it["gp"], impl=it["impl"])
        it["found_inf"] = torch.maximum(it["found_inf"], inf2)

    def _fused_step(self, it: dict) -> None:
        h, ps = it["group"], it["ps"]
        st = [self.state[p] for p in ps]
        not_inf = 1.0 - it["found_inf"]
        steps = [s["step"] for s in st]
        torch._foreach_add_(steps, not_inf) if len(steps) > 1 else steps[0].add_(not_inf)
        pert = next_scale = None
        if h["trace_estimator"] == "lagged":
            pert = [s["pert"] for s in st]
            # The next call is a suppressor call: perturb along g by r = min(2·η_F·‖g‖, max_mix·ρ);
            # the kernel scales g, and r/‖g‖ = c·ρ/‖g‖ with c the fd mix coefficient.
            if h["eta_F"] > 0 and (h["calls"] + 1) % h["trace_every"] == 0:
                next_scale = mix_coefficient(h["eta_F"], it["gnorm"], h["rho"], h["max_mix"]) * (
                    h["rho"] / it["gnorm"].clamp_min(_TINY))
        ops.fip_step_(
            ps, it["g"], it["gp"], [s.get("fisher0") for s in st], [s.get("anchor") for s in st],
            [s["momentum_buffer"] for s in st], [s["fisher"] for s in st], pert, impl=it["impl"],
            lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"], weight_decay=h["weight_decay"],
            eta_r=h["eta_r"], beta=h["beta"], mix=it["mix"], restore_scale=it["restore"],   # set by the fd second pass only
            precondition=h["precondition"] == "fisher",
            damping=h["damping"], step=steps[0], next_pert_scale=next_scale, found_inf=it["found_inf"])
        if pert is not None:
            self._perturbed = True

    def _after_step(self, plan: list[dict]) -> bool:
        """Count a skip; returns whether this step was skipped when that is known on the host.

        The host must know it to keep the suppressor schedule (``group["calls"]``) unchanged by a skipped step,
        which matters only when some group has a suppressor with ``trace_every > 1``: only then (or on CPU,
        where it is free) does this sync with the device.  Otherwise the check is deferred to the warning's
        periodic sync."""
        if not plan:
            return False
        infs = [it["found_inf"] for it in plan]
        total = infs[0] if len(infs) == 1 else torch.stack([f.to(infs[0].device) for f in infs]).amax()
        self._skipped = total.clone() if self._skipped is None else self._skipped + total.to(self._skipped.device)
        self._calls_since_check += 1
        schedule = any(g["eta_F"] > 0 and g["trace_every"] > 1 for g in self.param_groups)
        skipped = bool(total.item()) if (total.device.type == "cpu" or schedule) else False
        if not self._skip_warned and (skipped or self._calls_since_check >= _SKIP_CHECK_EVERY):
            self._calls_since_check = 0
            if self._skipped.item() > 0:
                self._skip_warned = True
                logger.warning("fip_fast.FIP: skipped a step with non-finite gradients (parameters and state "
                               "left untouched); opt.skipped_steps counts them. This warning is shown once.")
        return skipped
