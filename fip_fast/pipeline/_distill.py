"""The distillation of :mod:`fip_fast.pipeline.holding` (docs/holding.md): its options (:class:`Distill`), the
teacher (:func:`make_teacher`), the per-batch term (:func:`distill_term`) and the ``"auto"`` rule
(:func:`auto_distill`).  Knowledge distillation (Hinton et al., 2015) with the model purification started from as
the teacher; our code."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast.pipeline._universal import _positive, per_sample_array
from fip_fast.pipeline.purifier import MethodContext

logger = logging.getLogger("fip_fast")

_NOT_LOGITS = "distill needs the model to return class logits of shape (batch, classes); pass distill=None"


@dataclass(frozen=True)
class Distill:
    """weight: the distillation term's weight beside the cross-entropy (1: equal).  temperature: T of both
    softmaxes (the term is T²·KL, Hinton et al.'s scaling, so its gradient does not shrink as T grows).  schedule:
    ``"constant"`` — the same weight every step; ``"late"`` — weight × (1 − lr / the largest lr so far): none at
    the peak of the learning rate, where purification wipes the model, and the full weight as the rate decays and
    the model is rebuilt (docs/holding.md, "Where the accuracy goes")."""

    weight: float = 1.0
    temperature: float = 2.0
    schedule: str = "late"

    def __post_init__(self) -> None:
        _positive("distill.weight", self.weight)
        _positive("distill.temperature", self.temperature)
        if self.schedule not in ("constant", "late"):
            raise ValueError(f"distill.schedule must be 'constant' or 'late', got {self.schedule!r}")


def auto_distill(model: nn.Module, ctx: MethodContext) -> bool:
    """``distill="auto"`` (FIP's and Fast FIP's default): on where the universal perturbation's ``"auto"`` is
    (floating-point inputs with ≥ 2 dimensions per sample: where it was chosen, docs/holding.md), the loss is the
    default cross-entropy (the term's softmax KL assumes one label per sample: a loss of the user's, e.g.
    multi-label, turns it off) and the model returns class logits ``(batch, classes)`` — checked on two clean
    samples, in eval mode, without gradients."""
    if not per_sample_array(ctx.x_train):
        return False
    if ctx.loss_fn is not F.cross_entropy:
        logger.info("fip_fast.pipeline: distill='auto' is off with a loss_fn of the user's (pass distill=True to "
                    "distil anyway)")
        return False
    on = _returns_logits(model, ctx)
    if not on:
        logger.info("fip_fast.pipeline: distill='auto' is off: the model does not return class logits of shape "
                    "(batch, classes)")
    return on


def _returns_logits(model: nn.Module, ctx: MethodContext) -> bool:
    """Whether ``model`` maps two clean samples to a ``(2, classes)`` tensor (eval mode, no gradients; the model's
    mode is restored)."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(ctx.x_train[:2].to(ctx.device))
    finally:
        model.train(was_training)
    return isinstance(out, Tensor) and out.dim() == 2


def _check_logits(out: Any) -> None:
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{_NOT_LOGITS} (got {got})")


def make_teacher(model: nn.Module, ctx: MethodContext, checked: bool = False) -> nn.Module:
    """A frozen copy of ``model`` (refused with ``ValueError`` unless it returns class logits; ``checked``: the caller
    has checked that already, as :func:`auto_distill` does) in eval mode, but for
    BatchNorm, which normalizes with the batch's statistics as the student's does in its train-mode step (its
    running estimates untouched): with the running estimates, the teacher's outputs would differ from the
    student's at θ0 itself, and the term would pull the weights toward that difference instead of holding them."""
    if not checked and not _returns_logits(model, ctx):
        raise ValueError(_NOT_LOGITS)
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
    return teacher


def distill_term(teacher: nn.Module, cfg: Distill, x: Tensor, rows: slice,
                 factor: float = 1.0) -> Optional[Callable[[Tensor], Tensor]]:
    """The distillation term of the batch ``x`` (N, …), a function of the model's outputs (N, classes):
    factor·weight·T²·KL(teacher ‖ model) of the temperature-T softmaxes, mean over ``rows`` (the unperturbed
    ones).  None when ``rows`` is empty or ``factor`` is 0 (the teacher then does not run).  The teacher runs
    once, here, without gradients."""
    if rows.stop - rows.start <= 0 or factor <= 0.0:
        return None
    with torch.no_grad():
        t_out = teacher(x[rows])
    _check_logits(t_out)
    target = torch.log_softmax(t_out.float() / cfg.temperature, dim=1)
    scale = factor * cfg.weight * cfg.temperature ** 2

    def term(out: Tensor) -> Tensor:
        _check_logits(out)
        s = torch.log_softmax(out[rows].float() / cfg.temperature, dim=1)
        return scale * F.kl_div(s, target, log_target=True, reduction="batchmean")
    return term
