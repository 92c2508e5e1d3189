"""Small helpers shared across the package (pipeline, fisher, metrics, train, baselines, backends, kernels)."""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def split_batch(batch: Any) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` from a tuple/list batch or a dict with ``x``/``y`` or ``input_ids``/``labels``."""
    if isinstance(batch, dict):
        x = batch["input_ids"] if "input_ids" in batch else batch["x"]
        y = batch["labels"] if "labels" in batch else batch["y"]
        return x, y
    return batch[0], batch[1]


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense (ATen's ``is_non_overlapping_and_dense``, which Python lacks): the elements fill
    ``numel`` consecutive slots from ``data_ptr()`` in some order of the dimensions, so an elementwise kernel may
    walk them in memory order."""
    if t.is_contiguous():
        return True
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True
