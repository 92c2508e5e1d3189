"""Mechanisms that make a purification *hold* (ours, beyond the FIP paper; docs/holding.md): options of the
``fip`` and ``fast_fip`` methods.  The universal perturbation and the distillation are on by default (``"auto"``);
the other three are off.

* ``universal_perturbation`` (:class:`UniversalPerturbation`, :mod:`fip_fast.pipeline._universal`; after I-BAU's
  and AWM's universal perturbation and SAU's shared adversarial examples): one input-shaped perturbation δ,
  L∞-bounded by ``eps``, kept across steps and moved by one signed-gradient step per batch toward what the model
  gets most wrong; a share of every training batch is replaced by x + δ *with its true label*.  Clean data never
  carry the trigger with a wrong label, so clean cross-entropy alone gives no gradient against a trigger-like
  direction; δ supplies one.  Cost: one extra forward and one input-only backward per step (``gradient="separate"``,
  the default), or only the input gradient (``"shared"``: δ's gradient from the training step's own backward).
* ``path_aware`` (:class:`PathAware`; PAM, Min et al., NeurIPS 2024, ``fine_tune/BTIDBF/sam.py`` of
  AISafety-HKUST/stable_backdoor_purification): every gradient of the step is taken at w + ρ·(θ0 − w)/‖θ0 − w‖
  (θ0: the trainable parameters where purification started; global L2 norm) and applied at w.  A purified model
  that stays on the backdoored basin's side of the path to θ0 is penalized.  No extra forward/backward.
* ``reset_units`` (:class:`UnitReset`; TSBD, Lin et al., NeurIPS 2024, linweiii/TSBD): before purification, a
  short gradient *ascent* on the clean set (on a copy of the model), rank units — output channels of convolutions,
  rows of hidden Linear layers — by their summed absolute weight change, and zero the most changed weights of the
  top ``fraction`` of units in the model (:func:`reset_units_`).  Cost: ``steps`` forward/backward passes, once.

* ``distill`` (:class:`Distill`; knowledge distillation, Hinton et al. 2015, with the model purification started
  from as the teacher): weight·T²·KL(teacher ‖ model) on the rows the universal perturbation left clean, its
  weight growing as the learning rate decays (``schedule="late"``): purification wipes the model at the peak of the
  learning rate and rebuilds it from the clean set as the rate decays; the teacher's outputs on the (augmented)
  clean images give the rebuild more than their labels.  Cost: one teacher forward on the clean rows per step
  (none at the peak), and one copy of the model.

* ``reactivation_aware`` (:class:`ReactivationAware`, :mod:`fip_fast.pipeline._reactivation`; ours): every
  gradient of the step is taken at w + ρ·g/‖g‖, g the gradient of the universal perturbation's perturbed samples
  (from that pass's own backward) — where a re-tuning on trigger-carrying data would take the model.  On the
  development cells it trades the CNN's clean accuracy for a lower re-tuned ASR.  Cost: the weight-gradient half
  of one backward per step.

Each option accepts ``None``/``False`` (off), ``True`` (the defaults), a number (the first field: ``eps``,
``rho``, ``fraction``), a dict of fields, or the dataclass; ``universal_perturbation`` also ``"auto"``
(:func:`auto_universal`), ``distill`` also ``"auto"`` (:func:`auto_distill`).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fip_fast.pipeline._distill import Distill, auto_distill, distill_term, make_teacher
from fip_fast.pipeline._reactivation import ReactivationAware, _acc, host_norm, reactivation_shift, shifted
from fip_fast.pipeline._universal import (
    Calibration,
    UniversalPerturbation,
    _positive,
    _Universal,
    auto_universal,
    calibrate_eps,
)
from fip_fast.pipeline.purifier import MethodContext, OptimizerPurifier

logger = logging.getLogger("fip_fast")

#: The builder options of this module that FIP's and Fast FIP's DEFAULTS set (benches that time the methods' own
#: step leave them out).
HOLDING_DEFAULTS = ("universal_perturbation", "distill")

__all__ = ["UniversalPerturbation", "PathAware", "UnitReset", "Distill", "ReactivationAware", "HoldingOptions",
           "Prepared", "resolve_holding", "HoldingPurifier", "make_purifier", "prepare", "reset_units_", "ResetResult",
           "auto_universal", "auto_distill", "HOLDING_DEFAULTS"]


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class PathAware:
    """rho: the distance (global L2, in parameter units) of the gradient point from w toward θ0 (PAM's 0.5).
    relative: ``True`` takes rho as a share of the way back instead (the point w + rho·(θ0 − w), 0 < rho ≤ 1) —
    ours: an absolute rho larger than ‖θ0 − w‖, as early in a purification, puts the point beyond θ0."""

    rho: float = 0.5
    relative: bool = False

    def __post_init__(self) -> None:
        _positive("path_aware.rho", self.rho)
        if self.relative and self.rho > 1:
            raise ValueError(f"path_aware.rho must be ≤ 1 with relative=True (a share of the way to θ0), got "
                             f"{self.rho!r}")


@dataclass(frozen=True)
class UnitReset:
    """fraction: share of all ranked units to reset (TSBD's n).  weight_fraction: among the weights of those
    units, the share with the largest change that is zeroed (TSBD's m, 0.7; 1.0: whole units).  steps, lr,
    batch_size: the clean gradient-ascent pass (SGD, momentum 0.9, seeded batches with replacement); it stops
    early once a batch's accuracy is ≤ stop_acc (TSBD stops at 10 % clean accuracy).  layers: ``"conv"``
    (convolutions, TSBD's default) or ``"conv_linear"`` (also every Linear layer but the last, the head)."""

    fraction: float = 0.05
    weight_fraction: float = 0.7
    steps: int = 20
    lr: float = 0.01
    batch_size: int = 64
    stop_acc: float = 0.1
    layers: str = "conv"

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"reset_units.fraction must lie in (0, 1], got {self.fraction!r}")
        if not 0 < self.weight_fraction <= 1:
            raise ValueError(f"reset_units.weight_fraction must lie in (0, 1], got {self.weight_fraction!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"reset_units.steps must be an int ≥ 1, got {self.steps!r}")
        _positive("reset_units.lr", self.lr)
        if self.batch_size < 1:
            raise ValueError(f"reset_units.batch_size must be ≥ 1, got {self.batch_size!r}")
        if self.layers not in ("conv", "conv_linear"):
            raise ValueError(f"reset_units.layers must be 'conv' or 'conv_linear', got {self.layers!r}")


def _as_option(name: str, value: Any, cls: type) -> Any:
    """None/False → None; True → cls(); a number → cls(first field); a dict → cls(**dict); an instance → itself."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, (int, float)):
        first = next(iter(cls.__dataclass_fields__))
        return cls(**{first: value})
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as e:
            raise TypeError(f"{name}: {e} (fields: {list(cls.__dataclass_fields__)})") from None
    auto = ", or 'auto'" if cls is UniversalPerturbation else ""
    raise TypeError(f"{name} must be None, a bool, a number, a dict or a {cls.__name__}{auto}, got {value!r}")


@dataclass(frozen=True)
class HoldingOptions:
    """The mechanisms of one purification, resolved (None: off)."""

    universal: Optional[UniversalPerturbation] = None
    path: Optional[PathAware] = None
    reset: Optional[UnitReset] = None
    distill: Optional[Distill] = None
    react: Optional[ReactivationAware] = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.universal, self.path, self.reset, self.distill, self.react))


def resolve_holding(universal_perturbation: Any = None, path_aware: Any = None, reset_units: Any = None,
                    distill: Any = None, reactivation_aware: Any = None, *, trace_estimator: str = "fd",
                    eta_F: float = 0.0) -> HoldingOptions:
    """Parse the options and check they fit the optimizer's suppressor.  ``path_aware`` and
    ``reactivation_aware`` shift the weights inside the closure only, so they need every gradient to be computed
    inside it: not with the ``"batch"`` / ``"exact"`` estimators (their double backward runs after the closure)
    nor ``"lagged"`` (the model holds a perturbation between steps).  ``reactivation_aware`` takes its direction
    from the universal perturbation's own pass, so it needs one with ``gradient="separate"``."""
    h = HoldingOptions(_as_option("universal_perturbation", universal_perturbation, UniversalPerturbation),
                       _as_option("path_aware", path_aware, PathAware),
                       _as_option("reset_units", reset_units, UnitReset),
                       _as_option("distill", distill, Distill),
                       _as_option("reactivation_aware", reactivation_aware, ReactivationAware))
    for name, opt in (("path_aware", h.path), ("reactivation_aware", h.react)):
        if opt is not None and eta_F > 0 and trace_estimator != "fd":
            raise ValueError(f"{name} needs trace_estimator='fd' (or eta_F=0), got trace_estimator="
                             f"{trace_estimator!r}: the gradient point is shifted inside the closure only")
    if h.react is not None and (h.universal is None or h.universal.shared):
        raise ValueError("reactivation_aware needs universal_perturbation on with gradient='separate' (its "
                         "direction is the gradient of that pass's perturbed samples), got universal_perturbation="
                         f"{universal_perturbation!r}")
    return h


# -------------------------------------------------------------------------------------------- path aware
class _Path:
    """θ0 (the trainable parameters at the start) and the per-step shift s = ρ·(θ0 − w)/‖θ0 − w‖."""

    def __init__(self, cfg: PathAware, params: Sequence[Tensor]):
        self.rho, self.relative = cfg.rho, cfg.relative
        self.params = list(params)
        self.anchor = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def shift(self) -> Optional[List[Tensor]]:
        """s at the current w (None at w = θ0: the direction is undefined, the gradient is taken at w)."""
        # fp32 math, fp64 for fp64 parameters (as the optimizer's)
        diff = [a.to(_acc(p)) - p.detach().to(_acc(p)) for a, p in zip(self.anchor, self.params)]
        norm = host_norm(diff)                  # one read from the device, not one per parameter
        if norm == 0.0 or not math.isfinite(norm):
            return None
        return [d.mul_(self.rho if self.relative else self.rho / norm) for d in diff]


def _sum_shifts(a: Optional[List[Tensor]], b: Optional[List[Tensor]]) -> Optional[List[Tensor]]:
    """The gradient point's shift from both shifted-point options (either may be None)."""
    if a is None or b is None:
        return a if b is None else b
    return [x.add_(y) for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------- unit reset
@dataclass
class ResetResult:
    """What :func:`reset_units_` did.  ranking: (module name, unit index, score) over every candidate unit, most
    changed first (score: Σ|Δw| of the unit's weights after the ascent).  reset: the units chosen (the first
    ``len(reset)`` of ``ranking``).  zeroed: weights set to 0.  ascent_steps: steps of the ascent pass run."""

    ranking: List[Tuple[str, int, float]]
    reset: List[Tuple[str, int]]
    zeroed: int
    ascent_steps: int

    def summary(self) -> Dict[str, Any]:
        return {"units_reset": len(self.reset), "units_ranked": len(self.ranking), "weights_zeroed": self.zeroed,
                "ascent_steps": self.ascent_steps}


def _unit_layers(model: nn.Module, layers: str) -> List[Tuple[str, nn.Module]]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if layers == "conv":
        out = convs
    else:
        lin = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        out = convs + lin[:-1]        # the last Linear is the head: its units are the classes
    if not out:
        raise ValueError(f"reset_units(layers={layers!r}): the model has no such layer to reset")
    return out


def _ascend(model: nn.Module, x: Tensor, y: Tensor, cfg: UnitReset, seed: int, loss_fn: Any,
            device: torch.device) -> int:
    """TSBD's clean unlearning: SGD (momentum 0.9) on −loss, seeded batches with replacement; returns steps run."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 7919)
    for t in range(cfg.steps):
        i = torch.randint(x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=g)
        xb, yb = x[i].to(device), y[i].to(device)
        out = model(xb)
        if float((out.argmax(1) == yb).float().mean()) <= cfg.stop_acc:
            return t
        opt.zero_grad(set_to_none=True)
        (-loss_fn(out, yb)).backward()
        opt.step()
    return cfg.steps


@torch.no_grad()
def reset_units_(model: nn.Module, ctx: MethodContext, cfg: UnitReset) -> ResetResult:
    """TSBD's zero reinitialization, in place on ``model``: ascend on a copy (:func:`_ascend`), rank every unit
    (a row of the weight reshaped to out × rest) by Σ|w_ascended − w0|, take the top ⌈fraction·units⌉, and zero,
    among their weights, the ``weight_fraction`` with the largest |Δw| (one threshold over all of them, as TSBD)."""
    work = copy.deepcopy(model)
    with torch.enable_grad():
        ran = _ascend(work, ctx.x_train, ctx.y_train, cfg, ctx.seed, ctx.loss_fn, ctx.device)
    mods = dict(work.named_modules())
    changes: Dict[str, Tensor] = {}
    ranking: List[Tuple[str, int, float]] = []
    for name, m in _unit_layers(model, cfg.layers):
        dw = (mods[name].weight.detach().float() - m.weight.detach().float()).abs().reshape(m.weight.shape[0], -1)
        changes[name] = dw
        ranking += [(name, i, float(s)) for i, s in enumerate(dw.sum(1).tolist())]
    ranking.sort(key=lambda r: -r[2])
    k = max(1, math.ceil(cfg.fraction * len(ranking)))
    chosen = [(n, i) for n, i, _ in ranking[:k]]
    merged = torch.cat([changes[n][i] for n, i in chosen])
    n_zero = max(1, int(round(cfg.weight_fraction * merged.numel())))
    thresh = merged.topk(n_zero).values.min()
    zeroed = 0
    for n, i in chosen:
        w = model.get_submodule(n).weight
        mask = (changes[n][i] >= thresh).reshape(w.shape[1:])
        w[i][mask] = 0.0
        zeroed += int(mask.sum())
    return ResetResult(ranking, chosen, zeroed, ran)


# ----------------------------------------------------------------------------------------------- purifier
class HoldingPurifier(OptimizerPurifier):
    """:class:`OptimizerPurifier` with the universal perturbation (batches mixed before the step) and the
    path-aware gradient point (the closure runs at w + s, the optimizer steps at w)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any, *, hold: HoldingOptions,
                 ctx: MethodContext, reset: Optional[ResetResult] = None, teacher: Optional[nn.Module] = None,
                 calibration: Optional[Calibration] = None, **kw: Any):
        super().__init__(model, optimizer, loss_fn, **kw)
        if hold.distill is not None and teacher is None:
            raise ValueError("distill needs the teacher (the model as purification found it): see prepare()")
        self.distill, self.teacher = hold.distill, teacher
        self.universal = (_Universal(hold.universal, ctx.x_train, ctx.device, ctx.world_size)
                          if hold.universal is not None else None)
        self.path = _Path(hold.path, self.params) if hold.path is not None else None
        self.react = hold.react
        self.reset, self.calibration = reset, calibration
        self._shift: Optional[List[Tensor]] = None
        self._lr_max = 0.0          # schedule "lr": the largest learning rate so far

    def step(self, x: Tensor, y: Tensor) -> float:
        u = self.universal
        ratio = self._lr_ratio()
        react = None
        if u is not None:
            if not u.cfg.shared:
                gw = u.update(self.model, x, y, self.params if self.react is not None else None)
                if gw is not None:
                    react = reactivation_shift(gw, self.params, self.react, ratio, u.world_size)
            x, y = u.mix(x, y, ratio if u.cfg.schedule == "lr" else 1.0)
        self._shift = _sum_shifts(self.path.shift() if self.path is not None else None, react)
        if self.distill is not None:
            factor = 1.0 - ratio if self.distill.schedule == "late" else 1.0
            rows = u.clean_rows if u is not None else slice(0, x.shape[0])
            self._out_loss = distill_term(self.teacher, self.distill, x, rows, factor)
        try:
            loss = super().step(x, y)
        finally:
            self._shift, self._out_loss = None, None
        if u is not None and u.cfg.shared:
            u.update_shared(x)
        return loss

    def _lr_ratio(self) -> float:
        """The current learning rate over the largest so far (first parameter group; 1 without one): the share of
        the universal perturbation's ``schedule="lr"`` and the complement of distill's ``schedule="late"``."""
        if not self.optimizer.param_groups:
            return 1.0
        lr = float(self.optimizer.param_groups[0]["lr"])
        self._lr_max = max(self._lr_max, lr)
        return lr / self._lr_max if self._lr_max > 0 else 1.0

    def _closure(self, x: Tensor, y: Tensor):
        inner = super()._closure(x, y)
        s = self._shift
        if s is None:
            return inner

        def closure():
            with shifted(self.params, s):
                return inner()
        return closure

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["lr_max"] = self._lr_max
        u = self.universal
        if u is not None:
            sd["universal_perturbation"] = {"delta": u.delta.detach().cpu().clone(), "skipped": u.skipped,
                                            "attracted": u.attracted, "lr_max": self._lr_max}
            if u.mask is not None:
                sd["universal_perturbation"].update(mask=u.mask.cpu().clone(), pattern=u.pattern.cpu().clone())
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._lr_max = float(state.get("lr_max", 0.0))
        u = self.universal
        if u is None:
            return
        saved = state.get("universal_perturbation")
        if saved is None or tuple(saved["delta"].shape) != tuple(u.delta.shape):
            raise ValueError("the checkpoint holds no universal perturbation δ of shape "
                             f"{tuple(u.delta.shape)} (it was written without the option, or by an older fip_fast): "
                             "resume=False starts afresh")
        if u.mask is not None and "mask" not in saved:
            raise ValueError("the checkpoint holds no patch surrogate (it was written without "
                             "universal_perturbation.patch): resume=False starts afresh")
        u.delta.copy_(saved["delta"])
        if u.mask is not None:
            u.mask.copy_(saved["mask"])
            u.pattern.copy_(saved["pattern"])
        u.skipped, u.attracted = int(saved["skipped"]), saved["attracted"]
        self._lr_max = float(saved.get("lr_max", self._lr_max))

    def info(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.universal is not None:
            out["universal_perturbation"] = {"eps": self.universal.cfg.eps,
                                             "linf": float(self.universal.delta.abs().max()),
                                             "skipped": self.universal.skipped,
                                             "attracted_class": self.universal.attracted}
            if self.calibration is not None:
                out["universal_perturbation"]["calibration"] = asdict(self.calibration)
            if self.universal.mask is not None:
                out["universal_perturbation"]["patch_mass"] = float(self.universal.mask.sum())
        if self.reset is not None:
            out["reset_units"] = self.reset.summary()
        return out


def make_purifier(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: MethodContext, hold: HoldingOptions,
                  reset: Optional[ResetResult] = None, teacher: Optional[nn.Module] = None,
                  calibration: Optional[Calibration] = None, **kw: Any) -> OptimizerPurifier:
    """A plain :class:`OptimizerPurifier` when no mechanism is on (the purification is then exactly the
    method's own), else a :class:`HoldingPurifier`.  ``teacher``, ``calibration``: :func:`prepare`'s
    (``distill``; ``universal_perturbation.calibrate``).  ``kw``: ``finalize``, ``penalty``."""
    if not hold.any:
        return OptimizerPurifier(model, optimizer, ctx.loss_fn, **kw)
    if reset is not None:
        logger.info("fip_fast.pipeline: reset_units zeroed %d weights in %d units (%d ascent steps)", reset.zeroed,
                    len(reset.reset), reset.ascent_steps)
    return HoldingPurifier(model, optimizer, ctx.loss_fn, hold=hold, ctx=ctx, reset=reset, teacher=teacher,
                           calibration=calibration, **kw)


@dataclass
class Prepared:
    """What :func:`prepare` hands a builder: the resolved options (δ's bound calibrated), the unit reset's result,
    the teacher, the calibration of δ's bound."""

    hold: HoldingOptions
    reset: Optional[ResetResult] = None
    teacher: Optional[nn.Module] = None
    calibration: Optional[Calibration] = None

    def purifier(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: MethodContext,
                 **kw: Any) -> OptimizerPurifier:
        return make_purifier(model, optimizer, ctx, self.hold, self.reset, self.teacher, self.calibration, **kw)


def prepare(model: nn.Module, ctx: MethodContext, o: Dict[str, Any], universal_perturbation: Any, path_aware: Any,
            reset_units: Any, distill: Any = None, reactivation_aware: Any = None) -> Prepared:
    """What a builder calls first: resolve the options against its optimizer options ``o`` (``trace_estimator``,
    ``eta_F``), copy the teacher of ``distill`` (a frozen, eval-mode copy of ``model`` as given: when resuming,
    still the model purification started from) and run the unit reset on ``model`` (also when resuming: the
    checkpoint's weights replace the model's anyway, and the path's θ0 must be the same reset model as in the
    uninterrupted run)."""
    if isinstance(universal_perturbation, str) and universal_perturbation == "auto":
        universal_perturbation = UniversalPerturbation(inputs="auto")
    auto = isinstance(distill, str) and distill == "auto"
    if auto:
        distill = auto_distill(model, ctx)       # checks the model's outputs on the way
    hold = resolve_holding(universal_perturbation, path_aware, reset_units, distill, reactivation_aware,
                           trace_estimator=o.get("trace_estimator", "fd"), eta_F=o.get("eta_F", 0.0))
    if hold.universal is not None and hold.universal.inputs == "auto" and not auto_universal(ctx.x_train):
        if hold.react is not None:          # asked for, but its direction would come from a perturbation now off
            raise ValueError("reactivation_aware needs the universal perturbation, which universal_perturbation="
                             f"'auto' turns off for inputs of dtype {ctx.x_train.dtype} and shape "
                             f"{tuple(ctx.x_train.shape)}: pass universal_perturbation=True (or a dict of its "
                             "fields) to force it on, or reactivation_aware=None")
        hold = replace(hold, universal=None)
    cal = None
    if hold.universal is not None and hold.universal.calibrate is not None:
        cal = _calibrate(model, ctx, hold.universal)
        hold = replace(hold, universal=replace(hold.universal, eps=cal.eps))
    teacher = None
    if hold.distill is not None:
        teacher = make_teacher(model, ctx, checked=auto)
    reset = reset_units_(model, ctx, hold.reset) if hold.reset is not None else None
    return Prepared(hold, reset, teacher, cal)


def _calibrate(model: nn.Module, ctx: MethodContext, cfg: UniversalPerturbation) -> Calibration:
    """:func:`calibrate_eps` on the model as given (also when resuming: the same bound as the uninterrupted run),
    on the clean data's first samples; under data-parallel purification the smallest bound of the ranks."""
    cal = calibrate_eps(model, ctx.x_train, ctx.y_train, cfg, ctx.device)
    if ctx.world_size > 1:
        import torch.distributed as dist

        t = torch.tensor([cal.eps], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        cal = replace(cal, eps=float(t))
    if cal.eps < cfg.eps:
        logger.info("fip_fast.pipeline: universal_perturbation.calibrate lowered δ's bound from %g to %g of the input "
                    "range (clean accuracy %.3f; left at the radii probed: %s)", cfg.eps, cal.eps, cal.clean_acc,
                    ", ".join(f"{r:g}: {a:.3f}" for r, a in cal.probed))
    return cal
