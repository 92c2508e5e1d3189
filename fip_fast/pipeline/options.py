"""The options of one purification, resolved: the method's defaults < the user's keyword arguments, split into
the method's own options (passed to its builder / runner) and the loop's (:class:`LoopOptions`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

from fip_fast.pipeline.registry import MethodSpec

__all__ = ["LoopOptions", "resolve_options", "loop_config"]


@dataclass
class LoopOptions:
    """Options of the purify loop (also recorded, in this order, in ``report.config``).

    val_fraction: share of every class held out for clean validation, or ``"auto"``: 0.2 when that part resolves
    ``val_margin`` (at least two samples wide), else none (:func:`fip_fast.pipeline.data.resolve_val_fraction`).
    val_margin: selection tolerance on
    clean-val accuracy.  patience: evaluations below a0 − 2·val_margin before stopping (0: never).
    eval_every: steps between evaluations (None: steps // 10, at least 1).
    lr_schedule: "cosine" | "constant" | "onecycle" | "cyclic" (:func:`fip_fast.pipeline.loop.schedule_factor`).
    augment: the augmentation of the training batches, a spelling of :func:`fip_fast.augment.make_augment`
    (None: none) — of every kind of method: the loop applies it, a runner gets it as ``augment=``.
    """

    val_fraction: Any = "auto"
    val_margin: float = 0.03
    patience: int = 3
    eval_every: Optional[int] = None
    lr_schedule: str = "cosine"
    augment: Any = None


def resolve_options(spec: MethodSpec, *, steps: Optional[int], batch_size: Optional[int], lr: Optional[float],
                    options: Dict[str, Any], val_fraction: Optional[float], val_margin: Optional[float],
                    patience: Optional[int], eval_every: Optional[int], augment: Any = None
                    ) -> Tuple[Dict[str, Any], LoopOptions]:
    """``(method options, loop options)``: defaults, then the arguments of :func:`purify` that are not None."""
    opts = dict(spec.defaults)
    for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if v is not None:
            opts[k] = v
    opts.update(options)
    loop = LoopOptions()
    explicit = {"val_fraction": val_fraction, "val_margin": val_margin, "patience": patience,
                "eval_every": eval_every, "augment": augment}
    # A method's defaults may carry loop options (e.g. fip: patience 0); a runner keeps its own lr_schedule and
    # patience, but augment is always the loop's (purify passes it on to a runner itself).
    for k in ("lr_schedule", "patience", "augment") if spec.kind == "loop" else ("augment",):
        if k in opts:
            setattr(loop, k, opts.pop(k))
    for k, v in explicit.items():       # an explicit argument wins
        if v is not None:
            setattr(loop, k, v)
    from fip_fast.pipeline.loop import SCHEDULES

    if loop.lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {loop.lr_schedule!r}")
    return opts, loop


def loop_config(loop: LoopOptions, augment_fn: Any) -> Dict[str, Any]:
    """The loop options as recorded in ``report.config`` (``augment``: readable, e.g. ``"shift(4)"``)."""
    from fip_fast.augment import describe_augment

    return {**{f.name: getattr(loop, f.name) for f in fields(loop)}, "augment": describe_augment(augment_fn)}
