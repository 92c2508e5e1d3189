"""The clean-accuracy guard of :func:`fip_fast.pipeline.purify` (:class:`AccuracyGuard`) and what its ``retries``
need: the count checked (:func:`checked_retries`) and the learning rates a retry halves (:func:`learning_rates`)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from fip_fast.pipeline.data import CleanSplit, LossFn, val_metrics
from fip_fast.pipeline.report import AccuracyCheck, PurifyReport
from fip_fast.pipeline.strategy import SingleProcess

logger = logging.getLogger("fip_fast")

__all__ = ["AccuracyGuard", "checked_retries", "learning_rates"]


class AccuracyGuard:
    """Clean accuracy before and after, on the defender's data: the clean-validation part when there is one
    (θ0's is ``report.initial["val_acc"]``), else the purification part (measured on θ0 here, before any step).
    Without it nothing but non-finite values stopped a ruined model (a learning rate of 1e6 returned a model at
    7.6 % clean accuracy without a word)."""

    def __init__(self, theta0: nn.Module, data: CleanSplit, loss_fn: LossFn, dev: torch.device,
                 strategy: SingleProcess, limit: float, initial: Dict[str, Any]):
        self.data, self.loss_fn, self.dev, self.strategy, self.limit = data, loss_fn, dev, strategy, limit
        y = data.y_val if data.has_val else data.y_train
        self.enabled = y.dim() == 1 and not y.is_floating_point() and y.numel() > 0   # class-index labels only
        self.before = float("nan")
        if self.enabled:
            self.before = float(initial["val_acc"]) if data.has_val else self._accuracy_on_train(theta0)

    def _accuracy_on_train(self, model: nn.Module) -> float:
        return float(val_metrics(model, self.data.x_train, self.data.y_train, self.loss_fn, self.dev,
                                 shard=self.strategy.val_shard)["val_acc"])

    def check(self, model: nn.Module, report: PurifyReport) -> Tuple[nn.Module, PurifyReport]:
        """Record :class:`AccuracyCheck` in ``report.accuracy``; warn when the drop exceeds the limit."""
        if not self.enabled:
            return model, report
        after = float(report.final["val_acc"]) if self.data.has_val else self._accuracy_on_train(model)
        report.accuracy = AccuracyCheck("validation" if self.data.has_val else "purification",
                                        int((self.data.y_val if self.data.has_val else self.data.y_train).numel()),
                                        self.before, after, self.limit)
        if report.accuracy.exceeded:
            w = f"{report.accuracy.describe()}: check this model before using it"
            report.warnings.append(w)
            if self.strategy.is_main:
                logger.warning("fip_fast.pipeline: %s", w)
        return model, report


#: The options :func:`purify`'s ``retries`` halves.
_LR_OPTIONS = ("lr", "lr_delta")


def checked_retries(retries: Any, opts: Dict[str, Any], checkpoint_dir: Optional[str],
                    distributed: Optional[str]) -> int:
    """``retries`` checked (an int ≥ 0), or 0 where a retry cannot run: no learning rate among the options, a
    ``checkpoint_dir`` or ``distributed``."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int ≥ 0, got {retries!r}")
    if not learning_rates(opts):
        return 0
    return 0 if checkpoint_dir is not None or distributed is not None else retries


def learning_rates(opts: Dict[str, Any]) -> Dict[str, float]:
    """The learning rates among ``opts`` (:data:`_LR_OPTIONS` with a number)."""
    return {k: float(v) for k, v in opts.items() if k in _LR_OPTIONS and _is_number(v)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
