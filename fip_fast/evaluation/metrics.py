"""Purification metrics (docs/method.md, "Measuring purification").

* ACC — accuracy on the clean test set.
* ASR — attack success rate: among triggered test inputs whose true class is not the target, the fraction
  classified as the target.
* RA  — robust accuracy: among the same inputs, the fraction classified as their true class.

All functions run the model in eval mode (restoring each module's previous mode afterwards), without autograd,
in mini-batches on the model's device, and return Python floats in ``[0, 1]`` (``nan`` for an empty set).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from fip_fast._utils import model_device

__all__ = ["eval_mode", "predict", "accuracy", "attack_success_rate", "robust_accuracy", "evaluate"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each module's own ``training`` flag on exit.

    Restoring per module (not ``model.train(was_training)``) keeps deliberately frozen sub-modules frozen.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512, device: Optional[torch.device] = None) -> Tensor:
    """Predicted classes ``(N,)`` (int64, on CPU) for inputs ``x`` ``(N, ...)``, in eval mode, batched."""
    dev = torch.device(device) if device is not None else model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    out = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device=dev, dtype=dtype if x.is_floating_point() else None)
            out.append(model(xb).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _rate(hits: Tensor) -> float:
    return float(hits.float().mean()) if hits.numel() else float("nan")


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of ``x`` ``(N, ...)`` classified as ``y`` ``(N,)``."""
    return _rate(predict(model, x, batch_size) == y.cpu())


def _non_target(x_trig: Tensor, y_true: Tensor, target: int) -> Tuple[Tensor, Tensor]:
    # triggered_test() already drops target-class samples; filter again so that hand-built sets count right.
    keep = y_true != target
    return x_trig[keep.to(x_trig.device)], y_true[keep]


def attack_success_rate(model: nn.Module, x_trig: Tensor, y_true: Tensor, target: int,
                        batch_size: int = 512) -> float:
    """ASR: among triggered inputs with true class ≠ ``target``, the fraction predicted as ``target``."""
    xk, yk = _non_target(x_trig, y_true, target)
    return _rate(predict(model, xk, batch_size) == target)


def robust_accuracy(model: nn.Module, x_trig: Tensor, y_true: Tensor, target: int, batch_size: int = 512) -> float:
    """RA: among triggered inputs with true class ≠ ``target``, the fraction predicted as their true class."""
    xk, yk = _non_target(x_trig, y_true, target)
    return _rate(predict(model, xk, batch_size) == yk.cpu())


def evaluate(model: nn.Module, clean: Tuple[Tensor, Tensor], triggered: Tuple[Tensor, Tensor], target: int,
             batch_size: int = 512) -> Dict[str, float]:
    """``{"acc", "asr", "ra"}`` for a clean test set ``(x, y)`` and a triggered one ``(x_trig, y_true)``.

    ASR and RA share one forward pass over the triggered set.
    """
    acc = accuracy(model, clean[0], clean[1], batch_size)
    xk, yk = _non_target(triggered[0], triggered[1], target)
    pred = predict(model, xk, batch_size)
    return {"acc": acc, "asr": _rate(pred == target), "ra": _rate(pred == yk.cpu())}
