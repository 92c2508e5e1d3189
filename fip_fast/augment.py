"""Augmentation of the defender's clean set: random shifts (pad + random crop) and horizontal flips.

The defender's clean set is small (1–10 % of the training data); drawing every purification batch through
random shifts (and flips, where the data allow them) is what the authors' code does (``RandomCrop(32,
padding=4)`` + ``RandomHorizontalFlip``) and what every strong fine-tuning defense does.  It is applied on the
fly, per batch, so every step sees new views of the same few images.

An augmentation here is a callable ``augment(x, generator) -> x`` on a batch ``x`` of shape ``(N, C, H, W)``;
its random draws come from ``generator`` (a CPU ``torch.Generator``), so a seeded run is reproducible and a
resumed run sees the same views as an uninterrupted one.

Spellings accepted by :func:`make_augment` (``purify(..., augment=...)``):

* ``None`` / ``"none"`` / ``False`` — no augmentation;
* ``"shift"`` — random shifts by up to ``round(H / 8)`` pixels (32×32 → 4, 28×28 → 4), zero fill;
* ``"auto"`` — FIP's and Fast FIP's default: for float image inputs ``(C, H, W)``, random shifts by up to
  ``max(1, round(H / 16))`` pixels (32×32 → 2, 28×28 → 2, 224×224 → 14); no augmentation for anything else
  (flat features, signals, token ids).  Half the reach of ``"shift"``: on the fair protocol's development cells,
  with FIP's distillation, shifts of 3 pixels on 28×28 digits cost 1.7 points more clean accuracy than 2
  (docs/holding.md);
* ``"shift_flip"`` — shifts and left-right flips with probability ½ (natural images; **not** digits or text);
* an :class:`Augment` (choose ``shift`` / ``flip`` yourself), a dict of its fields (``{"shift": 3}``: the
  spelling for ``--set`` and JSON), or any callable ``(x, generator) -> x``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "AugmentFn", "make_augment", "describe_augment", "AUGMENT_CHOICES"]

#: ``augment(x, generator) -> x``: a batch ``(N, C, H, W)`` in, the same shape out.
AugmentFn = Callable[[Tensor, torch.Generator], Tensor]

AUGMENT_CHOICES = ("none", "shift", "shift_flip", "auto")


@dataclass(frozen=True)
class Augment:
    """Random shift by up to ``shift`` pixels in each direction (zero-padded crop) and, if ``flip``, a
    left-right flip with probability ½.  Input and output ``(N, C, H, W)``, any float dtype, any device."""

    shift: int = 4
    flip: bool = False

    def __post_init__(self):
        if not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"Augment.shift must be an int ≥ 0 (pixels), got {self.shift!r}")

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"augmentation needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        if self.shift > 0:
            p = self.shift
            # Draw on the CPU generator (reproducible on every device), index on x's device.
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
            xp = F.pad(x, (p, p, p, p))
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]      # (N, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]      # (N, 1, W)
            x = xp[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # (N, H, W, C)
            x = x.permute(0, 3, 1, 2).contiguous()
        if self.flip:
            m = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(m[:, None, None, None], x.flip(-1), x)
        return x


def make_augment(spec: Any, example: Optional[Tensor] = None) -> Optional[AugmentFn]:
    """The augmentation for ``spec`` (see the module docstring), or ``None`` for no augmentation.

    ``example``: clean inputs — one sample ``(C, H, W)`` or a batch ``(N, C, H, W)``; a 3-dim tensor is read as one
    sample, so pass one sample when the inputs may be 1-d signals ``(N, C, T)`` — used to size the shift
    (``round(H / 8)``, at least 1; ``"auto"``: ``round(H / 16)``, and no augmentation for non-image data) and to
    refuse image augmentation (a named spelling or an :class:`Augment`) of
    non-image data.  A plain callable is returned as it is."""
    if spec is None or spec is False or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, dict):
        try:
            spec = Augment(**spec)
        except TypeError as e:
            raise TypeError(f"augment: {e} (fields: shift, flip)") from None
    if not isinstance(spec, Augment):
        if callable(spec) and not isinstance(spec, str):
            return spec
        if spec not in AUGMENT_CHOICES:
            raise ValueError(f"augment must be one of {AUGMENT_CHOICES}, an Augment or a callable "
                             f"(x, generator) -> x, got {spec!r}")
    is_image = example is not None and example.dim() in (3, 4) and example.is_floating_point()
    if isinstance(spec, str) and spec == "auto":
        return Augment(shift=max(1, round(int(example.shape[-2]) / 16))) if is_image else None
    if example is not None and not is_image:
        raise ValueError(f"augment={spec!r} needs float image inputs, (C, H, W) per sample / (N, C, H, W) per "
                         f"batch; the clean inputs have shape {tuple(example.shape)} and dtype {example.dtype} — "
                         "pass augment='none'")
    if isinstance(spec, Augment):
        return spec
    h = int(example.shape[-2]) if example is not None else 32
    return Augment(shift=max(1, round(h / 8)), flip=spec == "shift_flip")


def describe_augment(fn: Optional[AugmentFn]) -> str:
    """A readable name of an augmentation (``report.config["augment"]``): ``"none"``, ``"shift(4)"``,
    ``"shift(4)+flip"``, or ``"callable(<qualified name>)"``."""
    if fn is None:
        return "none"
    if isinstance(fn, Augment):
        parts = ([f"shift({fn.shift})"] if fn.shift else []) + (["flip"] if fn.flip else [])
        return "+".join(parts) or "none"
    return f"callable({getattr(fn, '__qualname__', type(fn).__qualname__)})"
