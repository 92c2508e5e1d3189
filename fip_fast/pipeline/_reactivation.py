"""The reactivation-aware gradient point of :mod:`fip_fast.pipeline.holding` (ours, beyond the FIP paper;
docs/holding.md): the purification's gradient is taken where a re-tuning on trigger-like inputs would take the
model, and applied at w.

A re-tuning attack (a few fine-tuning steps on data that carry the trigger) moves the weights along the gradient
that makes trigger-carrying inputs misclassified.  The universal perturbation δ is our stand-in for the trigger, and
its own pass (``gradient="separate"``) already runs the model on x + δ: asking that backward for the weights'
gradient as well gives g = ∂CE(f(x + δ; w), y)/∂w, the direction in which the perturbed samples' true labels are
lost fastest.  The step's closure then runs at w + ρ·g/‖g‖ (global L2 norm) — SAM's step (Foret et al., ICLR
2021), but along the backdoor's reactivation direction instead of the clean loss's — so the purification is
rewarded for weights whose perturbed samples stay correct after that move.  The form of the shifted gradient point
follows PAM (Min et al., NeurIPS 2024), which takes it toward θ0 instead.  Cost: the weight-gradient part of one
backward per step (the forward and the input gradient are the perturbation's own).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from fip_fast.pipeline._universal import _all_reduce, _positive


@dataclass(frozen=True)
class ReactivationAware:
    """rho: the distance of the gradient point from w along the ascent of the perturbed samples' loss — in
    parameter units (global L2; SAM's ρ, 0.05 its default), or with ``relative=True`` as a share of ‖w‖ (the
    trainable parameters' global L2 norm: the same ρ means the same relative move on models whose weights differ
    in scale).  schedule: ``"constant"``, or ``"lr"`` — ρ × the learning rate over the largest so far, so the
    point returns to w as a decaying schedule ends (the rebuild of the last steps is the plain one)."""

    rho: float = 0.05
    relative: bool = False
    schedule: str = "constant"

    def __post_init__(self) -> None:
        _positive("reactivation_aware.rho", self.rho)
        if self.schedule not in ("constant", "lr"):
            raise ValueError(f"reactivation_aware.schedule must be 'constant' or 'lr', got {self.schedule!r}")


def reactivation_shift(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor], cfg: ReactivationAware,
                       lr_ratio: float = 1.0, world_size: int = 1) -> Optional[List[Tensor]]:
    """s = r·g/‖g‖ in each parameter's shape (fp32 math, fp64 for fp64 parameters), r = ρ (× ‖w‖ when relative,
    × ``lr_ratio`` with ``schedule="lr"``), from the perturbed samples' gradients ``grads`` (None: the parameter
    took no part).  Under data-parallel purification the gradients are summed over the ranks first, so every rank
    shifts alike.  None when g is zero or not finite, or r is 0 (the step's gradient is then taken at w)."""
    # copies: the shift is built in place and must not write into the caller's gradients
    g = [torch.zeros_like(p, dtype=_acc(p)) if gi is None else gi.detach().to(_acc(p), copy=True)
         for gi, p in zip(grads, params)]
    if world_size > 1:
        _all_reduce(g)
    r = cfg.rho * (lr_ratio if cfg.schedule == "lr" else 1.0)
    if cfg.relative:
        r *= host_norm([p.detach().to(_acc(p)) for p in params])
    norm = host_norm(g)
    if norm == 0.0 or not math.isfinite(norm) or r == 0.0:
        return None
    return [t.mul_(r / norm) for t in g]


def host_norm(tensors: Sequence[Tensor]) -> float:
    """The global L2 norm of ``tensors`` as a Python float, with one read from the device: each tensor's sum of
    squares in its own dtype, the total in fp64 (as summing the per-tensor Python floats did, one read each)."""
    return math.sqrt(float(torch.stack([t.pow(2).sum().to(torch.float64) for t in tensors]).sum()))


@contextlib.contextmanager
def shifted(params: Sequence[Tensor], s: Sequence[Tensor]) -> Iterator[None]:
    """Inside: every parameter p + s; after: p exactly as before (a saved copy, not a subtraction)."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, si in zip(params, s):
            p.add_(si.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def _acc(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)
