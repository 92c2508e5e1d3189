"""The records of one :meth:`FIP.step <fip_fast.FIP.step>`: a :class:`_Slice` per parameter group and device
(built from the group's step plan, :mod:`fip_fast._plan`, when it still serves), the group norms ‖g‖ and the
step-wide non-finite flag, and the device-side counter of skipped steps."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from fip_fast import _plan, ops
from fip_fast.backends import host

if TYPE_CHECKING:
    from fip_fast.optim import FIP

logger = logging.getLogger("fip_fast")

_TINY = 1e-12


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
    lagged: bool = False               # a lagged group's slice: the step stores the next perturbation in ``pert``
    pert: Optional[list] = None        # lagged: each parameter's state["pert"]
    ok: Optional[Tensor] = None        # 1 − found_inf, set by the fused step

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


# ---------------------------------------------------------------------------------------------- building slices
def gather(group: dict) -> dict[torch.device, list[Tensor]]:
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


def slices_of(opt: "FIP", group: dict, sup: bool) -> list[_Slice]:
    """This step's slices of ``group``: from its step plan when the gradients sit where they sat last step
    and nothing structural changed (no per-tensor Python work beyond reading the gradients), else built anew
    (and planned for the next step, by ``opt._plan_group``)."""
    plan = opt._plans.get(id(group))
    grads, ptrs, has_none = host.read_grads(group["params"], None if plan is None else plan.grad_ptrs)
    missing = _plan.missing_of(ptrs) if has_none else None
    if plan is None or not plan.matches(group, _plan.structure_of(opt._epoch, group), missing):
        by_dev = gather(group)
        for ps in by_dev.values():
            for p in ps:
                opt._lazy_state(p, group)
        plan = opt._plan_group(group, by_dev, missing)
        if plan is None:
            return [_Slice(group, sup, ps, [p.grad for p in ps], opt._impl_of(dev), dev)
                    for dev, ps in by_dev.items()]
    plan.grad_ptrs = ptrs      # the next step's read returns this very tuple if no gradient moved
    return [_Slice(group, sup, dp.ps, dp.grads(grads), opt._impl_of(dp.device), dp.device, plan=dp,
                   gptrs=dp.pointers(ptrs)) for dp in plan.devices]


def plan_group(opt: "FIP", group: dict, by_dev: dict, missing: Optional[tuple]) -> Optional[_plan.GroupPlan]:
    """The plan of ``group``'s parameters that have a gradient (``by_dev``, their state created), kept in
    ``opt._plans`` for the next steps; None for tensor subclasses, which step without a plan."""
    opt._plans.pop(id(group), None)
    if not all(_plan.plannable(ps) for ps in by_dev.values()):
        return None
    index = {id(p): i for i, p in enumerate(group["params"])}
    full = len(by_dev) == 1 and missing is None
    devices = [_plan.device_plan(opt.state, ps, None if full else [index[id(p)] for p in ps], dev)
               for dev, ps in by_dev.items()]
    planned = {id(p) for ps in by_dev.values() for p in ps}
    # the lazy perturbation may shift through the plan only if it holds every parameter that has a stored e
    pert_complete = all(id(p) in planned or "pert" not in opt.state.get(p, {}) for p in group["params"])
    if group["trace_estimator"] == "lagged" and any(dp.pert is None for dp in devices):
        pert_complete = False
    plan = opt._plans[id(group)] = _plan.GroupPlan(group, list(group["params"]),
                                                   _plan.structure_of(opt._epoch, group), missing, devices,
                                                   pert_complete)
    return plan


def impl_of(opt: "FIP", device: torch.device) -> str:
    """The implementation ``opt.impl`` resolves to on ``device`` (resolved once per device)."""
    impl = opt._resolved.get(device)
    if impl is None:
        impl = opt._resolved[device] = ops.resolve(opt.impl, device)
    return impl


# ---------------------------------------------------------------------------------------------- norms and flags
def share_flag(slices: list[_Slice], flags: list[Tensor]) -> list[Tensor]:
    """The step-wide non-finite flag (max over every slice), on each slice's device."""
    if len(flags) == 1:
        return flags
    dev0 = slices[0].device
    any_inf = torch.stack([_on(f, dev0) for f in flags]).amax()
    return [_on(any_inf, sl.device) for sl in slices]


def raise_flag(slices: list[_Slice], flag: Tensor) -> None:
    """found_inf ← max(found_inf, flag) on every slice (``flag`` is already step-wide)."""
    for sl in slices:
        sl.found_inf = torch.maximum(sl.found_inf, _on(flag, sl.device))


def norms(slices: list[_Slice]) -> None:
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
    for sl, f in zip(slices, share_flag(slices, flags) if slices else []):
        sl.found_inf = f


# ---------------------------------------------------------------------------------------------- skipped steps
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
