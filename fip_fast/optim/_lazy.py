"""The lazy perturbation of the ``"lagged"`` suppressor (docs/method.md "Closure-free suppressor") and its
schedule.

A step that precedes a lagged suppressor call stores e (``state["pert"]``); e is applied — θ ← θ + e — at the first
training forward after the step, by a forward pre-hook, and the next step restores θ inside the fused kernel, so
between steps the parameters hold θ.  :class:`_LazyPerturbation` is that machinery (discovery of the module to
hook, apply / remove / suspend, the shift itself); :func:`lagged_counters`, :func:`next_is_suppressor` and
:func:`advance` are the schedule, kept on the device so that no step synchronizes with the host.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from fip_fast import _plan, ops
from fip_fast.optim._slices import _on

if TYPE_CHECKING:
    from fip_fast.optim import FIP

logger = logging.getLogger("fip_fast")


# ---------------------------------------------------------------------------------------------- the schedule
def lagged_counters(group: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    """(non-skipped lagged steps, 1 when the stored perturbation is a scheduled one) — 0-dim fp32 device
    tensors kept in the group (saved with it), so that the lagged schedule needs no host sync."""
    if "lagged_calls" not in group:
        group["lagged_calls"] = torch.zeros((), dtype=torch.float32, device=device)
        group["lagged_pert_on"] = torch.zeros((), dtype=torch.float32, device=device)
    return group["lagged_calls"], group["lagged_pert_on"]


def next_is_suppressor(h: dict, device: torch.device) -> Any:
    """1 when the call after this one is a lagged suppressor call, else 0 — a number where the schedule is
    trivial, a 0-dim device tensor from the non-skipped-step counter otherwise (no host sync)."""
    if h["eta_F"] <= 0:
        return 0.0
    if h["trace_every"] == 1:
        return 1.0
    calls = _on(lagged_counters(h, device)[0], device)
    return (torch.remainder(calls + 1.0, float(h["trace_every"])) == 0).float()


def advance(h: dict, device: torch.device, found_inf: Tensor) -> None:
    """After a step of the lagged group ``h``: count it unless it was skipped (``found_inf``), and record
    whether the perturbation it stored is a scheduled one (a skipped step keeps the e it had stored)."""
    calls, on = lagged_counters(h, device)
    ok = torch.rsub(_on(found_inf, calls.device), 1.0)
    sched = next_is_suppressor(h, calls.device)
    on.mul_(torch.rsub(ok, 1.0)).add_(ok * sched)
    calls.add_(ok)


# ---------------------------------------------------------------------------------------------- the perturbation
def _no_optimizer() -> None:
    return None


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

    def __init__(self, opt: Optional["FIP"]) -> None:
        # weak: the process-wide hook must not keep the optimizer alive; None: a hook that belongs to no optimizer
        self._opt = weakref.ref(opt) if opt is not None else _no_optimizer
        self.pending = False           # a stored e waits to be applied
        self.applied = False           # the parameters hold θ + e
        self.suspended = False         # inside unperturbed(), the applied e is taken off
        self._global = None
        self._roots: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._warned = False

    def __reduce__(self) -> tuple:
        # A module pickled or deep-copied with this hook on it (torch.save(model) after lagged steps): the copy
        # belongs to no optimizer, so its hook is a detached one that never applies anything.
        return (_LazyPerturbation, (None,))

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

    # ------------------------------------------------------------------ θ + e and back
    @torch.no_grad()
    def apply(self) -> None:
        """θ ← θ + e if e is pending and not applied yet (:meth:`FIP.apply_perturbation`)."""
        if not self.pending or self.applied:
            return
        self.shift(1.0)
        self.disarm()
        self.applied = True

    @torch.no_grad()
    def remove(self) -> None:
        """θ ← θ − e where applied, then e ← 0 for good (:meth:`FIP.remove_perturbation`)."""
        if self.applied:
            self.shift(-1.0)
        self.zero()
        self.applied = self.suspended = False
        self.disarm()

    def discard_unapplied(self) -> None:
        """A step with a pending but never-applied perturbation: its gradient was taken at θ, so there is
        nothing to restore; drop e (this step is a plain one)."""
        self.unapplied_at_step()
        self.zero()
        self.pending = False

    def reset(self, lagged: bool) -> None:
        """After a state dict is loaded: nothing applied; the loaded e pending where a group is ``lagged``."""
        self.applied = self.suspended = False
        self.disarm()
        if lagged:
            self.arm()

    def zero(self) -> None:
        """e ← 0 for every parameter, and no scheduled perturbation stored."""
        opt = self._opt()
        for group in opt.param_groups:
            if "lagged_pert_on" in group:
                group["lagged_pert_on"].zero_()
        for st in opt.state.values():
            if "pert" in st:
                st["pert"].zero_()

    @contextlib.contextmanager
    def unperturbed(self):
        """θ inside the block (:meth:`FIP.unperturbed`): the applied e is taken off and put back at the end,
        unless :meth:`remove` dropped it inside."""
        if not self.applied:
            yield
            return
        self.shift(-1.0)
        self.applied, self.suspended = False, True
        try:
            yield
        finally:
            if self.suspended:          # not dropped inside the block by remove_perturbation()
                self.shift(1.0)
                self.applied = True
            self.suspended = False

    @torch.no_grad()
    def shift(self, sign: float) -> None:
        """θ ← θ + sign·e for every lagged group (skipped on the device where the stored e is not scheduled)."""
        opt = self._opt()
        for group in opt.param_groups:
            plan = opt._plans.get(id(group))
            if (plan is not None and plan.pert_complete and plan.structure == _plan.structure_of(opt._epoch, group)
                    and plan.unmoved()):     # its tables hold the parameters' addresses: none may have moved
                parts = [(dp.device, dp.ps, dp.pert, ((dp.uid, "ps,pert"), ())) for dp in plan.devices]
            else:
                by_dev = defaultdict(list)
                for p in group["params"]:
                    if "pert" in opt.state.get(p, {}):
                        by_dev[p.device].append(p)
                parts = [(dev, ps, [opt.state[p]["pert"] for p in ps], None) for dev, ps in by_dev.items()]
            for dev, ps, pert, key in parts:
                off = torch.rsub(_on(lagged_counters(group, dev)[1], dev), 1.0)
                ops.perturb_(ps, pert, sign, off, impl=opt._impl_of(dev), cache_key=key)
