"""One :meth:`FIP.step <fip_fast.FIP.step>`, under ``no_grad``: the first closure call, the slices and norms
(:mod:`._slices`), each estimator's direction (:mod:`._suppressors`), one fused step per slice
(:func:`fip_fast.ops.fip_step_`), and the bookkeeping after it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from fip_fast import ops
from fip_fast.optim._slices import _Slice, slices_of
from fip_fast.optim._suppressors import SUPPRESSORS, StepCall

if TYPE_CHECKING:
    from fip_fast.optim import FIP

_ORDER = tuple(SUPPRESSORS.values())


def run(opt: "FIP", closure: Optional[Callable]) -> Optional[Tensor]:
    """The body of :meth:`FIP.step` (``FIP._step``); returns the loss of the first closure call."""
    groups = opt.param_groups
    ests = [SUPPRESSORS[g["trace_estimator"]] for g in groups]
    sup = [e.scheduled(g) for e, g in zip(ests, groups)]
    if closure is None and any(sup):
        est = next(e.name for s, e in zip(sup, ests) if s)
        raise ValueError(
            f"FIP(trace_estimator={est!r}) needs a closure on suppressor steps (every trace_every-th call) to "
            "evaluate the loss a second time; pass step(closure), or use trace_estimator='lagged' for a "
            "closure-free, one-pass suppressor (Hugging Face Trainer, GradScaler)")
    opt.create_graph = any(s and e.graph for s, e in zip(sup, ests))
    try:
        out = opt._call_closure(closure) if closure is not None else None
    finally:
        opt.create_graph = False
    loss, trace = (out if isinstance(out, tuple) else (out, None))
    if opt._lazy.pending and not opt._lazy.applied:
        opt._lazy.discard_unapplied()
    slices = [sl for group, s in zip(groups, sup) for sl in slices_of(opt, group, s)]
    opt._norms(slices)
    call = StepCall(opt, slices, closure, trace)
    work = _by_estimator(slices)
    for est, mine in work:
        est.direction(call, mine)
    for sl in slices:
        fused_step(opt, sl)
    for group in groups:
        group["calls"] += 1
    if slices:
        opt._skips.add(slices[0].found_inf)     # the flag is step-wide: one slice's copy counts the step
    for est, mine in work:
        est.finish(call, mine)
    return loss


def _by_estimator(slices: list[_Slice]) -> list:
    """[(estimator, its slices that it works on this call)], in :data:`SUPPRESSORS` order, only those with any."""
    if not slices:
        return []
    out = []
    for est in _ORDER:
        mine = [sl for sl in slices if (sl.sup or est.every_step) and sl.group["trace_estimator"] == est.name]
        if mine:
            out.append((est, mine))
    return out


def fused_step(opt: "FIP", sl: _Slice) -> None:
    """The one fused update of a slice (:func:`fip_fast.reference.fip_step_`); with the non-finite flag set it
    writes nothing but the step counts' zero increment."""
    h, dp = sl.group, sl.plan
    sl.ok = not_inf = torch.rsub(sl.found_inf, 1.0)   # 1 − found_inf (the operator form costs 3× more host time)
    if dp is not None:      # the plan's lists; one op advances every step count (views of one vector)
        f0, anchor, mom, fis, steps = dp.fisher0, dp.anchor, dp.momentum, dp.fisher, dp.steps
        dp.step_vector.add_(not_inf)
    else:
        st = [opt.state[p] for p in sl.ps]
        f0, anchor = [s.get("fisher0") for s in st], [s.get("anchor") for s in st]
        mom, fis, steps = [s["momentum_buffer"] for s in st], [s["fisher"] for s in st], [s["step"] for s in st]
        torch._foreach_add_(steps, not_inf) if len(steps) > 1 else steps[0].add_(not_inf)
    ops.fip_step_(
        sl.ps, sl.g, sl.gp, f0, anchor, mom, fis, sl.pert, impl=sl.impl,
        cache_key=sl.gp_key("step"),
        lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"], weight_decay=h["weight_decay"],
        eta_r=h["eta_r"], beta=h["beta"], mix=sl.mix if sl.gp is not None else None,
        restore_scale=sl.restore,   # set by the fd second pass only
        precondition=h["precondition"] == "fisher", damping=h["damping"], step=steps,
        next_pert_scale=sl.mix if sl.lagged else None, found_inf=sl.found_inf)


def _step_without_grad(opt: "FIP", closure: Optional[Callable]) -> Optional[Tensor]:
    """``FIP._step`` under no_grad (set directly: the context manager's objects cost microseconds per step)."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        return opt._step(closure)
    finally:
        torch._C._set_grad_enabled(prev)


#: the step as torch's wrapper runs it: the profiler record and the optimizer step hooks around it
_profiled_step = Optimizer.profile_hook_step(_step_without_grad)
