"""The clean set: materialized as tensors, split into a purification and a clean-validation part, sampled.

* :func:`_as_tensors` — any clean-data form (a ``(x, y)`` pair, a ``Dataset``, an iterable of batches) as one
  ``(x, y)`` pair of tensors (the clean set is small by design, ≈1 % of the training data);
* :func:`split_clean` — the class-stratified, seeded split into a purification part and a clean-validation part
  (:class:`CleanSplit`);
* :func:`batch_indices` — the seeded with-replacement sampler: batch ``t`` depends only on ``(seed, t)``, so a
  resumed (or distributed) run sees exactly the batches of the uninterrupted single-process one;
* :func:`augment_generator` — the generator of batch ``t``'s augmentation, a function of ``(seed, t)`` too;
* :func:`val_metrics` — clean-validation loss and accuracy (optionally sharded over ranks);
* :func:`data_warnings` — degradations of the inputs that let a run go on but weaken it silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fip_fast._utils import split_batch

__all__ = ["CleanSplit", "split_clean", "resolve_val_fraction", "AUTO_VAL_FRACTION", "batch_indices",
           "augment_generator", "val_metrics", "data_warnings", "LossFn"]

#: ``loss_fn(output, y) -> scalar tensor`` (mean over the batch).
LossFn = Callable[[Tensor, Tensor], Tensor]


def _as_tensors(clean: Any) -> Tuple[Tensor, Tensor]:
    """The clean set as one ``(x, y)`` pair of tensors (CPU or wherever they are)."""
    if isinstance(clean, (tuple, list)) and len(clean) == 2 and all(isinstance(t, Tensor) for t in clean):
        x, y = clean
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"clean data: {x.shape[0]} inputs but {y.shape[0]} labels")
        return x, y
    batches: Iterable[Any] = clean
    if isinstance(clean, torch.utils.data.DataLoader):
        batches = clean
    elif isinstance(clean, torch.utils.data.Dataset) and hasattr(clean, "__len__"):
        batches = torch.utils.data.DataLoader(clean, batch_size=256, shuffle=False)
    xs, ys = [], []
    for b in batches:
        x, y = split_batch(b)
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("the clean data yielded no samples")
    return torch.cat(xs), torch.cat(ys)


def _stratified_holdout(y: Tensor, fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """(train_idx, val_idx): ``fraction`` of every class (at least one sample of classes with ≥ 2) held out."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    tr, va = [], []
    yc = y.cpu()
    if yc.dim() != 1 or yc.is_floating_point():
        perm = torch.randperm(yc.shape[0], generator=g)
        k = int(round(fraction * yc.shape[0]))
        return perm[k:], perm[:k]
    for c in torch.unique(yc).tolist():
        idx = torch.nonzero(yc == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(fraction * idx.numel()))
        if fraction > 0 and k == 0 and idx.numel() >= 2:
            k = 1
        va.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Batch ``step``: ``batch_size`` indices drawn with replacement; a function of (seed, step) only."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2 ** 62))
    return torch.randint(n, (batch_size,), generator=g)


def augment_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of batch ``step``'s augmentation: a function of (seed, step) only, like
    :func:`batch_indices` (and seeded apart from it)."""
    return torch.Generator().manual_seed((int(seed) * 2_654_435_761 + int(step) * 104_729 + 1_299_709) % (2 ** 62))


@torch.no_grad()
def val_metrics(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, device: torch.device,
                 batch_size: int = 512, shard: Optional[Tuple[int, int]] = None) -> Dict[str, float]:
    """Clean-validation loss and accuracy, in eval mode (every module's own flag restored).

    ``shard=(rank, world)``: this rank evaluates its contiguous block of the N samples
    (:func:`fip_fast.integrations.distributed.shard_indices`) and the sums (loss·samples, correct, samples) are
    all-reduced, so every rank returns the same numbers — the metrics of all N samples."""
    if x.shape[0] == 0:
        return {"val_loss": float("nan"), "val_acc": float("nan")}
    lo, hi = 0, x.shape[0]
    if shard is not None:
        from fip_fast.integrations.distributed import shard_indices

        r = shard_indices(x.shape[0], *shard)
        lo, hi = r.start, r.stop
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        tot, correct, n = 0.0, 0, 0
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            xb, yb = x[i:j].to(device), y[i:j].to(device)
            out = model(xb)
            tot += float(loss_fn(out, yb)) * yb.shape[0]
            if out.dim() == 2 and yb.dim() == 1:
                correct += int((out.argmax(1) == yb).sum())
            n += yb.shape[0]
    finally:
        for m, t in modes:
            m.training = t
    if shard is not None:
        import torch.distributed as dist

        sums = torch.tensor([tot, float(correct), float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        tot, correct, n = float(sums[0]), int(sums[1]), int(sums[2])
    return {"val_loss": tot / n, "val_acc": correct / n}



@dataclass
class CleanSplit:
    """The clean set, split: ``x_train``/``y_train`` (purification part: sampled by the loop, F0) and
    ``x_val``/``y_val`` (clean validation: selection and early stopping).  ``y_all``: every clean label (the
    purification part and the held-out part together; for :func:`data_warnings`)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    y_all: Tensor

    @property
    def has_val(self) -> bool:
        return self.x_val.shape[0] > 0

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x_train, self.y_train, self.x_val, self.y_val


#: The share ``val_fraction="auto"`` holds out when the clean set is large enough (:func:`resolve_val_fraction`).
AUTO_VAL_FRACTION = 0.2


def resolve_val_fraction(val_fraction: Any, n_clean: int, val_margin: float) -> float:
    """The held-out share for ``val_fraction``; ``"auto"`` (the default) means :data:`AUTO_VAL_FRACTION` when the
    held-out part would resolve the selection margin — ``AUTO_VAL_FRACTION · n_clean ≥ 2 / val_margin``, i.e. the
    margin is at least two validation samples wide (≥ 334 clean samples at the default margin 0.03) — and 0
    otherwise (no validation part: every sample trains, the last step is returned).  A margin ≤ 0 (strict
    selection) keeps the hold-out.

    Why: the selection compares clean-val accuracies to within ``val_margin``.  With 80 clean samples (2 % of a
    4 000-image pool) the held-out part has 20 images, one error is 5 points, and the selection returned an
    early, less purified step in 18 of the fair protocol's 60 such cells (ASR 33 % against 14 % for the last step,
    at no better clean accuracy); on its development cells at that size, training on every sample instead gave
    4.7 % ASR at −4.7 points where the 20 % hold-out gave 13.3 % at −5.8 (docs/protocol.md)."""
    if isinstance(val_fraction, str):
        if val_fraction != "auto":
            raise ValueError(f"val_fraction must be a number in [0, 1) or 'auto', got {val_fraction!r}")
        if float(val_margin) <= 0:      # strict selection asked for: no tolerance to resolve, keep the hold-out
            return AUTO_VAL_FRACTION
        return AUTO_VAL_FRACTION if AUTO_VAL_FRACTION * n_clean >= 2.0 / float(val_margin) else 0.0
    return float(val_fraction or 0.0)


def split_clean(clean: Any, val_data: Any, val_fraction: Any, seed: int, val_margin: float = 0.03) -> CleanSplit:
    """``val_data`` given: all of ``clean`` is the purification part.  Otherwise ``val_fraction`` of every class
    is held out (seeded; ``"auto"``: :func:`resolve_val_fraction` with ``val_margin``); ``val_fraction`` 0 / None:
    no validation part (the last step is returned)."""
    x_all, y_all = _as_tensors(clean)
    val_fraction = resolve_val_fraction(val_fraction, int(x_all.shape[0]), val_margin) if val_data is None else 0.0
    if val_data is not None:
        x_tr, y_tr = x_all, y_all
        x_va, y_va = _as_tensors(val_data)
    elif val_fraction and val_fraction > 0:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        tr_idx, va_idx = _stratified_holdout(y_all, float(val_fraction), seed)
        x_tr, y_tr, x_va, y_va = x_all[tr_idx], y_all[tr_idx], x_all[va_idx], y_all[va_idx]
    else:
        x_tr, y_tr = x_all, y_all
        x_va, y_va = x_all[:0], y_all[:0]
    if x_tr.shape[0] == 0:
        raise ValueError("no clean samples left for purification after holding out the validation part")
    return CleanSplit(x_tr, y_tr, x_va, y_va, y_all)


def data_warnings(data: CleanSplit, batch_size: Optional[int], val_requested: bool,
                  val_fraction: Any) -> List[str]:
    """Degradations that let the run go on but weaken it silently: reported in ``report.warnings``."""
    out: List[str] = []
    y_all, n_tr, n_va = data.y_all, int(data.x_train.shape[0]), int(data.x_val.shape[0])
    if y_all.dim() == 1 and not y_all.is_floating_point() and y_all.numel():
        classes = torch.unique(y_all.cpu())
        if classes.numel() == 1:
            out.append(f"the clean set holds a single class ({int(classes[0])}): purification sees no other "
                       "class and clean-val accuracy cannot tell a collapsed model from a good one")
    if batch_size and n_tr < int(batch_size):
        out.append(f"only {n_tr} clean samples are left for purification, fewer than the batch size "
                   f"{int(batch_size)}: every batch repeats samples (drawn with replacement)")
    if val_fraction == "auto" and n_va == 0:
        out.append(f"val_fraction='auto': {n_tr} clean samples are too few for a validation part that resolves the "
                   f"selection margin (20 % of them < 2 / val_margin): all of them train, no clean-val selection or "
                   "early stopping, the last step's weights are returned")
    elif val_requested and n_va == 0:
        out.append(f"the clean validation part is empty ({n_tr} clean samples, val_fraction {val_fraction}): no "
                   "clean-val selection or early stopping, the last step's weights are returned")
    return out
