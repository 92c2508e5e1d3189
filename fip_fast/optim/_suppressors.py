"""The four suppressor estimators of :class:`fip_fast.FIP` (``trace_estimator``; the module docstring of
:mod:`fip_fast.optim` says what each computes), one object each with one job: on the slices of its groups, set
what the fused step needs to take d = g + c·(g' − g) instead of the plain d = g.

A step (:func:`fip_fast.optim._step.run`) asks each group's estimator whether this call is a suppressor call
(:meth:`Suppressor.scheduled`, a host decision: it says whether the closure runs twice), runs the first closure,
builds the slices and norms, then calls :meth:`Suppressor.direction` of each estimator — ``fd``, ``batch``,
``exact``, ``lagged``, in this order — on its slices, the fused step of every slice, and
:meth:`Suppressor.finish`.  The per-tensor arithmetic stays in :mod:`fip_fast.ops` (its contract
:mod:`fip_fast.reference`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor

from fip_fast import _plan, ops
from fip_fast.optim import _lazy
from fip_fast.optim._slices import _TINY, _global_norm, _Slice, raise_flag, share_flag
from fip_fast.reference import mix_coefficient

if TYPE_CHECKING:
    from fip_fast.optim import FIP


@dataclass
class StepCall:
    """One :meth:`FIP.step` call as the estimators see it."""

    opt: "FIP"
    slices: list                      # every slice of the step (all groups, all devices)
    closure: Optional[Callable]
    trace: Optional[Tensor] = None    # "exact": the second value the closure returned


class Suppressor:
    """One estimator.  ``direction`` gets the slices of its groups on their suppressor calls (with
    ``every_step``: on every call); ``finish`` the same slices after their fused steps."""

    name = ""
    graph = False          # the closure of a suppressor call must keep the graph of the gradient
    every_step = False     # direction() runs on every call, not only on scheduled ones

    def scheduled(self, group: dict) -> bool:
        """Whether this call of ``group`` is a suppressor call, decided on the host before the closure runs:
        calls 0, k, 2k, … (k = ``trace_every``), skipped calls included."""
        return group["eta_F"] > 0 and group["calls"] % group["trace_every"] == 0

    def is_call(self, group: dict) -> bool:
        """:meth:`FIP.is_suppressor_call` for ``group``."""
        return self.scheduled(group)

    def direction(self, call: StepCall, mine: list[_Slice]) -> None:
        raise NotImplementedError

    def finish(self, call: StepCall, mine: list[_Slice]) -> None:
        pass


class FdSuppressor(Suppressor):
    """Finite difference: θ + e with e = ρ·g/‖g‖, the closure a second time, then (in the fused step) θ back
    and d = g + c·(g' − g), c = min(2·η_F·‖g‖/ρ, max_mix)."""

    name = "fd"

    def direction(self, call: StepCall, mine: list[_Slice]) -> None:
        for sl in mine:
            h = sl.group
            sl.restore = h["rho"] / sl.gnorm.clamp_min(_TINY)
            ops.perturb_(sl.ps, sl.g, sl.restore, sl.found_inf, impl=sl.impl, cache_key=sl.key("ps,g", sl.gptrs))
            sl.mix = mix_coefficient(h["eta_F"], sl.gnorm, h["rho"], h["max_mix"])
        for sl, gp in zip(mine, self._second_pass(call, mine)):
            sl.gp = gp
        inf2 = share_flag(mine, [_global_norm(sl.gp, sl.impl, sl.key("gp", _plan.pointers(sl.gp)))[1]
                                 for sl in mine])
        for sl, f2 in zip(mine, inf2):
            # A non-finite perturbed gradient with a finite first one: undo θ + e now (the fused step will skip).
            ops.perturb_(sl.ps, sl.g, -sl.restore, (1.0 - f2) + sl.found_inf, impl=sl.impl,
                         cache_key=sl.key("ps,g", sl.gptrs))
        raise_flag(call.slices, inf2[0])

    @staticmethod
    def _second_pass(call: StepCall, mine: list[_Slice]) -> list[list[Tensor]]:
        """The gradients at θ + e of ``mine``'s parameters (zeros where the closure left none)."""
        opt = call.opt
        # Every group's gradient at θ is set aside: the second pass then writes only fresh tensors, so no group
        # steps with a gradient taken at θ + e, whatever the closure does (zero_grad(set_to_none=False) included).
        saved = [(p, p.grad) for g in opt.param_groups for p in g["params"]]
        for p, _ in saved:
            p.grad = None
        opt.perturbed_pass = True
        try:
            opt._call_closure(call.closure)
            return [[p.grad if p.grad is not None else torch.zeros_like(p) for p in sl.ps] for sl in mine]
        except BaseException:
            for sl in mine:       # put θ back before the error propagates
                ops.perturb_(sl.ps, sl.g, -sl.restore, sl.found_inf, impl=sl.impl, cache_key=sl.key("ps,g", sl.gptrs))
            raise
        finally:
            opt.perturbed_pass = False
            for p, g in saved:    # p.grad is the gradient at θ again, as after a plain step
                p.grad = g


class _GraphSuppressor(Suppressor):
    """The double-backward estimators: d = g + η_F·∇T exactly (no ``max_mix`` cap: there is no
    finite-difference extrapolation to guard)."""

    @staticmethod
    def _set_direction(sl: _Slice, grad_T) -> None:
        eta = sl.group["eta_F"]
        sl.gp = [g.detach().float() + eta * (t.float() if t is not None else 0.0) for g, t in zip(sl.g, grad_T)]
        sl.mix = 1.0

    @staticmethod
    def _done(call: StepCall, mine: list[_Slice]) -> None:
        """Keep every p.grad as a plain tensor (the graph of the gradient is no longer needed) and raise the
        step-wide flag where a direction is non-finite."""
        for sl in call.slices:
            for p in sl.ps:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()
            sl.g = [p.grad for p in sl.ps]
        flags = share_flag(mine, [_global_norm(sl.gp, sl.impl)[1] for sl in mine])
        raise_flag(call.slices, flags[0])


class BatchSuppressor(_GraphSuppressor):
    """T = ‖∇ℓ‖², its gradient 2·H·ḡ by double backward through the graph of the gradient."""

    name = "batch"
    graph = True

    def direction(self, call: StepCall, mine: list[_Slice]) -> None:
        with torch.enable_grad():
            for sl in mine:
                if not all(g.requires_grad for g in sl.g):
                    raise ValueError("trace_estimator='batch' needs the graph of the gradient: call "
                                     "opt.backward(loss) (or loss.backward(create_graph=opt.create_graph)) in the "
                                     "closure")
                T = sum(g.float().pow(2).sum() for g in sl.g)
                self._set_direction(sl, torch.autograd.grad(T, sl.ps, allow_unused=True))
        self._done(call, mine)


class ExactSuppressor(_GraphSuppressor):
    """T = (1/B)·Σ‖∇ℓ_n‖² from per-sample gradients: the closure returns ``(loss, trace)``; one backward of
    ``trace`` serves every exact group."""

    name = "exact"

    def direction(self, call: StepCall, mine: list[_Slice]) -> None:
        trace = call.trace
        if trace is None or not isinstance(trace, Tensor) or not trace.requires_grad:
            raise ValueError("trace_estimator='exact' needs a closure returning (loss, trace) with a "
                             "differentiable trace, e.g. fip_fast.reference.trace_exact(model, x, y)")
        with torch.enable_grad():
            grads = torch.autograd.grad(trace, [p for sl in mine for p in sl.ps], allow_unused=True)
        k = 0
        for sl in mine:
            self._set_direction(sl, grads[k:k + len(sl.ps)])
            k += len(sl.ps)
        self._done(call, mine)


class LaggedSuppressor(Suppressor):
    """One pass: every step of a lagged group stores e = r·g/‖g‖ for the next call (r = min(2·η_F·‖g‖,
    max_mix·ρ) where that call is a suppressor call, else 0); e is applied lazily (:mod:`._lazy`) and the next
    step restores θ inside the fused kernel.  The schedule counts non-skipped steps on the device."""

    name = "lagged"
    every_step = True

    def scheduled(self, group: dict) -> bool:
        return False       # never a second closure call: the schedule lives on the device

    def is_call(self, group: dict) -> bool:
        """Whether the stored perturbation is a scheduled one (reads a device flag: syncs)."""
        return group["eta_F"] > 0 and bool(group.get("lagged_pert_on", torch.zeros(())).item())

    def direction(self, call: StepCall, mine: list[_Slice]) -> None:
        state = call.opt.state
        for sl in mine:
            h = sl.group
            sl.lagged = True
            sl.pert = sl.plan.pert if sl.plan is not None else [state[p]["pert"] for p in sl.ps]
            if h["eta_F"] <= 0:
                continue
            # r = min(2·η_F·‖g‖, max_mix·ρ) = c·ρ with c the fd mix coefficient; the kernel scales g by r/‖g‖.
            sl.mix = mix_coefficient(h["eta_F"], sl.gnorm, h["rho"], h["max_mix"]) * (
                h["rho"] / sl.gnorm.clamp_min(_TINY)) * _lazy.next_is_suppressor(h, sl.device)

    def finish(self, call: StepCall, mine: list[_Slice]) -> None:
        """Take e off where a step was skipped, advance the schedule, arm the lazy perturbation."""
        lazy = call.opt._lazy
        for sl in mine:
            if lazy.applied and (sl.found_inf.device.type != "cpu" or float(sl.found_inf.numpy()) != 0.0):
                # A skipped step wrote nothing: take off the e its gradient was taken at, so that between steps
                # the parameters hold θ (e stays stored and is applied again at the next training forward).  (A
                # CPU flag is read on the host for free; a device flag is read by the kernel.)
                ops.perturb_(sl.ps, sl.pert, -1.0, sl.ok, impl=sl.impl, cache_key=sl.key("ps,pert"))
        done = set()
        for sl in mine:
            if id(sl.group) not in done:
                done.add(id(sl.group))
                _lazy.advance(sl.group, sl.device, sl.found_inf)
        lazy.arm()


#: the estimators by ``trace_estimator``, in the order a step runs their ``direction``
SUPPRESSORS: dict[str, Suppressor] = {s.name: s for s in (FdSuppressor(), BatchSuppressor(), ExactSuppressor(),
                                                         LaggedSuppressor())}


def is_suppressor_call(group: dict) -> Any:
    """:meth:`FIP.is_suppressor_call`: whether the next call applies ``group``'s suppressor."""
    return SUPPRESSORS[group["trace_estimator"]].is_call(group)
