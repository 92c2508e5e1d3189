"""Recipes: the FIP settings that purify, as one object shared by the optimizer's users and the pipeline.

:data:`PURIFY` is the recipe of FIP in a plain training loop, and the base of ``fip_fast.purify(method="fip")``:
the pipeline's defaults (:data:`fip_fast.pipeline.methods.DEFAULTS`) are *read from it* but for the weight decay
(0.02 there), which was chosen together with the pipeline's own holding options (the universal perturbation's
patch: docs/holding.md) that a plain loop does not have.  A plain training loop built from
:meth:`FIPRecipe.optimizer` and :meth:`FIPRecipe.scheduler` runs the same optimizer, at the same learning rate, on
the same schedule as the pipeline.  ``FIP(...)``'s own constructor defaults are a different thing — the authors' values
(lr 5e-3, momentum 0.95, η_F 1e-3, ρ 0.05, η_r 1, suppressor every 5th step), kept for compatibility; with a
plain loop they do not remove a backdoor (``tests/test_recipes.py`` measures both).

A plain loop::

    from fip_fast.recipes import PURIFY

    opt = PURIFY.optimizer(model.parameters())
    sched = PURIFY.scheduler(opt)                 # one-cycle over PURIFY.steps
    for step in range(PURIFY.steps):
        x, y = next_batch(PURIFY.batch_size)      # clean data, drawn with replacement
        ...                                        # opt.step(closure); sched.step()

``examples/optimizer_loop.py`` is the whole loop; ``dataclasses.replace(PURIFY, steps=100)`` changes a setting.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional

if TYPE_CHECKING:       # the optimizer module is imported on use, so ``import fip_fast.recipes`` stays light
    from torch import Tensor
    from torch.optim.lr_scheduler import LambdaLR

    from fip_fast.optim import FIP

__all__ = ["FIPRecipe", "PURIFY"]

#: The learning-rate schedules a recipe may name (those of :func:`fip_fast.pipeline.loop.schedule_factor`).
SCHEDULES = ("cosine", "constant", "onecycle", "cyclic")


@dataclass(frozen=True)
class FIPRecipe:
    """The hyper-parameters of one FIP purification: the optimizer's, the batch size and the schedule.

    Attributes:
        lr: peak learning rate of the schedule (parameter units per unit gradient).
        momentum: heavy-ball momentum μ ∈ [0, 1).
        weight_decay: L2 coefficient wd (added to the update direction as wd·θ).
        eta_F: weight η_F ≥ 0 of the Fisher-trace suppressor.
        eta_r: weight η_r ≥ 0 of the Fisher anchor toward θ0 (0: no anchor, no F0 needed).
        rho: radius ρ > 0 of the finite-difference suppressor, in parameter units.
        max_mix: cap of the suppressor's mix coefficient c (1.0: a suppressor step is at most a SAM step).
        trace_every: the suppressor runs on every k-th ``step()`` call.
        trace_estimator: ``"fd"`` (needs a closure) or ``"lagged"`` (closure-free); see :class:`fip_fast.FIP`.
        steps: number of optimizer steps T (one batch each).
        batch_size: clean samples per step (drawn with replacement).
        lr_schedule: ``"onecycle"`` (linear warm-up from lr/25 over the first 10 % of the steps, then cosine to
            0), ``"cosine"``, ``"constant"`` or ``"cyclic"`` — :func:`fip_fast.pipeline.loop.schedule_factor`,
            the very function the pipeline's loop uses.
    """

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.03
    eta_F: float = 0.005
    eta_r: float = 0.0
    rho: float = 0.5
    max_mix: float = 1.0
    trace_every: int = 1
    trace_estimator: str = "fd"
    steps: int = 300
    batch_size: int = 64
    lr_schedule: str = "onecycle"

    def __post_init__(self) -> None:
        for name in ("lr", "rho"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"FIPRecipe.{name} must be a finite number > 0, got {v!r}")
        for name in ("steps", "batch_size", "trace_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FIPRecipe.{name} must be an int ≥ 1, got {v!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"FIPRecipe.lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        # the remaining optimizer hyper-parameters are checked by FIP itself, with the same messages
        from fip_fast.optim import validate_hyperparameters

        validate_hyperparameters(dict(self.optimizer_kwargs(), nesterov=False, beta=0.95, precondition=None,
                                      damping=1e-3, calls=0))

    def optimizer_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :class:`fip_fast.FIP` this recipe sets (``lr`` is the peak rate)."""
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, eta_F=self.eta_F,
                    eta_r=self.eta_r, rho=self.rho, max_mix=self.max_mix, trace_every=self.trace_every,
                    trace_estimator=self.trace_estimator)

    def pipeline_options(self) -> Dict[str, Any]:
        """The recipe as options of :func:`fip_fast.purify` (method ``"fip"``): the optimizer's keyword arguments
        plus ``steps``, ``batch_size`` and ``lr_schedule``."""
        return dict(self.optimizer_kwargs(), steps=self.steps, batch_size=self.batch_size,
                    lr_schedule=self.lr_schedule)

    def optimizer(self, params: Iterable[Any], fisher0: Optional[Mapping["Tensor", "Tensor"]] = None,
                  **overrides: Any) -> "FIP":
        """A :class:`fip_fast.FIP` over ``params`` with this recipe's hyper-parameters.

        Args:
            params: parameters or param-group dicts, as for any ``torch.optim.Optimizer``.
            fisher0: F0 per parameter (e.g. ``estimate_fisher(model, loader, normalize="max")``); used only when
                ``eta_r > 0`` — a recipe with an anchor weight and no F0 raises ``ValueError``.
            overrides: further :class:`fip_fast.FIP` keyword arguments (``impl=``, ``nesterov=``, …); a name the
                recipe sets is refused — use ``dataclasses.replace(recipe, name=value)``, which keeps
                :meth:`scheduler` and the pipeline options consistent.
        """
        from fip_fast.optim import FIP

        clash = sorted(set(overrides) & set(self.optimizer_kwargs()))
        if clash:
            raise TypeError(f"FIPRecipe.optimizer: {clash} are set by the recipe; use dataclasses.replace(recipe, "
                            f"{clash[0]}=...) instead")
        if self.eta_r > 0 and not fisher0:
            raise ValueError(f"this recipe has eta_r={self.eta_r} > 0 (a Fisher anchor) but no fisher0 was given: "
                             "pass fisher0=estimate_fisher(model, clean_loader, normalize='max')")
        f0 = dict(fisher0) if (fisher0 and self.eta_r > 0) else None
        return FIP(params, fisher0=f0, **self.optimizer_kwargs(), **overrides)

    def scheduler(self, optimizer: "FIP", steps: Optional[int] = None) -> "LambdaLR":
        """A ``LambdaLR`` that scales every group's learning rate by the pipeline's schedule factor: call its
        ``step()`` once after each ``optimizer.step()``.  ``steps``: the length T of the schedule (default
        :attr:`steps`)."""
        from torch.optim.lr_scheduler import LambdaLR

        from fip_fast.pipeline.loop import schedule_factor

        total = self.steps if steps is None else steps
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"steps must be an int ≥ 1, got {total!r}")
        name = self.lr_schedule
        if name == "constant":
            return LambdaLR(optimizer, lambda t: 1.0)
        # past the end (more scheduler steps than T) the rate stays at the schedule's last value
        return LambdaLR(optimizer, lambda t: schedule_factor(name, min(t, total - 1), total))

    def replace(self, **changes: Any) -> "FIPRecipe":
        """A copy with ``changes`` applied (``dataclasses.replace``), validated again."""
        return dataclasses.replace(self, **changes)


#: The settings of FIP in a plain loop — chosen on the development task of the fair protocol (docs/protocol.md) on
#: clean data only: lr 0.05 one-cycle over 300 steps of 64, momentum 0.9, weight decay 0.03, η_F 5e-3 with ρ 0.5 on
#: every step, and no Fisher anchor (η_r 0: there it protected the trigger).  ``purify(method="fip")`` uses it with
#: weight decay 0.02, chosen with its patch surrogate (docs/holding.md).
PURIFY = FIPRecipe()
