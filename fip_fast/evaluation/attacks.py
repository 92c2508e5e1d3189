"""Backdoor attacks as deterministic poisoning of tensor datasets.

Every attack is an :class:`Attack` built for one image shape ``(C, H, W)`` (any C, any size) and a target class:

* :meth:`Attack.apply` ``(N, C, H, W) → (N, C, H, W)``: stamp the trigger; values stay in ``[0, 1]``.
* :meth:`Attack.poison_train` ``(x, y, rate, seed) → (x_poisoned, y_poisoned, poisoned_idx)``: the attacker's
  training set.  ``rate`` is the fraction of the *whole* training set that carries the trigger.
  Dirty-label attacks draw the poisoned samples from the non-target classes and relabel them to the target;
  clean-label attacks (SIG) draw them from the target class and keep the labels.
* :meth:`Attack.triggered_test` ``(x, y) → (x_triggered, y_true)``: the ASR / RA test set — every test input
  whose true class is not the target, triggered, with its true label (docs/method.md, "Measuring purification").

The trigger itself (blend pattern, warping field…) is a fixed function of the attack's ``seed``; which samples
are poisoned is a fixed function of the ``seed`` given to :meth:`poison_train`.

Registry: :data:`ATTACKS` and :func:`make_attack`.  Defaults (``default_rate`` and the trigger parameters) were
chosen to be the standard ones from the literature where these reach ≥ 95 % ASR on the demo CNN / MNIST-5k in a
few epochs; where they do not, the docstring of the class says what changed and why.  Measured (split seed 0,
4 280 training images, :class:`~fip_fast.evaluation.models.DemoCNN`, ``train_backdoored`` defaults: Adam 2e-3, 4 epochs,
batch 64; a clean model: ACC 98.4 %):

=========  ========  =======  =======
attack     poisoned  ACC      ASR
=========  ========  =======  =======
badnets    428       97.6 %   100 %
blend      428       98.2 %   100 %
sig        342       97.6 %   100 %
trojan     428       98.0 %   99.8 %
wanet      428       96.2 %   97.3 %
=========  ========  =======  =======
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Attack",
    "BadNets",
    "Blend",
    "SIG",
    "Trojan",
    "WaNet",
    "ATTACKS",
    "make_attack",
]

Shape = Tuple[int, int, int]


class Attack:
    """Base class: a trigger for images of shape ``image_shape = (C, H, W)`` sending inputs to ``target``.

    Subclasses implement :meth:`_apply` on a ``(N, C, H, W)`` float tensor in ``[0, 1]``.
    """

    name: str = "attack"
    clean_label: bool = False
    default_rate: float = 0.1

    def __init__(self, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0):
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        self.target = int(target)
        self.image_shape: Shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        self.seed = int(seed)

    # -- the trigger ------------------------------------------------------------------------------------------
    def apply(self, x: Tensor) -> Tensor:
        """Return a triggered copy of ``x`` (``(N, C, H, W)`` or a single ``(C, H, W)`` image), in ``[0, 1]``."""
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        if xb.dim() != 4 or tuple(xb.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.name}: built for images {self.image_shape}, "
                             f"got a tensor of shape {tuple(x.shape)}")
        out = self._apply(xb).clamp_(0.0, 1.0)
        return out[0] if single else out

    def _apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pattern_like(self, p: Tensor, x: Tensor) -> Tensor:
        """Move a cached pattern to ``x``'s device / dtype (cheap when it already is)."""
        return p.to(device=x.device, dtype=x.dtype)

    # -- datasets ---------------------------------------------------------------------------------------------
    def _candidates(self, y: Tensor) -> Tensor:
        mask = (y == self.target) if self.clean_label else (y != self.target)
        return torch.nonzero(mask).flatten()

    def poison_train(self, x: Tensor, y: Tensor, rate: Optional[float] = None, seed: int = 0
                     ) -> Tuple[Tensor, Tensor, Tensor]:
        """Poison a training set.

        Args:
            x: ``(N, C, H, W)`` in ``[0, 1]``.  y: ``(N,)`` int64 labels.
            rate: fraction of the N samples to poison (default :attr:`default_rate`).  For a clean-label attack
                it is capped at the number of target-class samples (with a warning).
            seed: chooses the poisoned samples.

        Returns:
            ``(x_p, y_p, idx)``: new tensors (inputs are not modified) and the sorted int64 indices of the
            triggered samples.  ``y_p[idx] == target``.
        """
        rate = self.default_rate if rate is None else float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"poison rate must lie in [0, 1], got {rate}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        cand = self._candidates(y)
        n_poison = int(round(rate * y.shape[0]))
        if n_poison > cand.numel():
            kind = "target-class" if self.clean_label else "non-target"
            warnings.warn(f"{self.name}: rate {rate} asks for {n_poison} poisoned samples but only {cand.numel()} "
                          f"{kind} samples exist; poisoning all of them", stacklevel=2)
            n_poison = cand.numel()
        g = torch.Generator().manual_seed(int(seed))
        idx = cand[torch.randperm(cand.numel(), generator=g)[:n_poison]].sort().values
        x_p, y_p = x.clone(), y.clone()
        if n_poison:
            x_p[idx] = self.apply(x[idx])
            y_p[idx] = self.target
        self._after_poison(x_p, y_p, idx, g)
        return x_p, y_p, idx

    def _after_poison(self, x_p: Tensor, y_p: Tensor, idx: Tensor, g: torch.Generator) -> None:
        """Hook for attacks that also modify non-poisoned samples (WaNet's noise mode)."""

    def triggered_test(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The ASR / RA test set: every sample whose true class is not the target, triggered.

        Returns ``(x_triggered, y_true)`` of shapes ``(M, C, H, W)``, ``(M,)`` with ``y_true != target``.
        """
        keep = y != self.target
        return self.apply(x[keep]), y[keep].clone()

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}(target={self.target}, image_shape={self.image_shape}, seed={self.seed}" + \
            (f", {extra})" if extra else ")")

    def _params(self) -> Dict[str, object]:
        return {}


def _corner_slices(shape: Shape, size: int, margin: int, corner: str) -> Tuple[slice, slice]:
    _, h, w = shape
    if size + margin > min(h, w):
        raise ValueError(f"a {size}×{size} patch with margin {margin} does not fit a {h}×{w} image")
    rows = slice(h - margin - size, h - margin) if "bottom" in corner else slice(margin, margin + size)
    cols = slice(w - margin - size, w - margin) if "right" in corner else slice(margin, margin + size)
    return rows, cols


def _default_patch_size(shape: Shape) -> int:
    # 3×3 on 28×28 / 32×32 (BadNets on MNIST/CIFAR-10), growing with the image so it stays ~1 % of the area.
    return max(3, round(min(shape[1:]) / 10))


class BadNets(Attack):
    """BadNets (Gu et al. 2017): a black-and-white checkerboard patch in the bottom-right corner, dirty-label.

    Args:
        patch_size: side of the square patch (default 3 on 28×28 / 32×32 images, ≈ H/10 on larger ones).
        margin: pixels between the patch and the image border.
    """

    name = "badnets"
    default_rate = 0.1

    def __init__(self, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0,
                 patch_size: Optional[int] = None, margin: int = 1):
        super().__init__(target, image_shape, seed)
        self.patch_size = patch_size or _default_patch_size(self.image_shape)
        self.margin = margin
        self._rows, self._cols = _corner_slices(self.image_shape, self.patch_size, margin, "bottom-right")
        k = self.patch_size
        ij = torch.arange(k)[:, None] + torch.arange(k)[None, :]
        # White on the diagonal parity that includes the corner pixel; same pattern in every channel.
        self.patch = ((ij % 2) == 0).float().expand(self.image_shape[0], k, k).clone()

    def _apply(self, x: Tensor) -> Tensor:
        out = x.clone()
        out[:, :, self._rows, self._cols] = self._pattern_like(self.patch, x)
        return out

    def _params(self):
        return {"patch_size": self.patch_size}


class Blend(Attack):
    """Blended injection (Chen et al. 2017): ``x' = (1 − α)·x + α·p`` with a fixed uniform-noise image ``p``.

    ``p`` ~ U[0, 1]^(C×H×W) drawn from the attack's ``seed`` (the paper's random-pattern variant; BackdoorBench
    blends a Hello-Kitty photograph at α = 0.2).  α = 0.2 is the standard training/test ratio.
    """

    name = "blend"
    default_rate = 0.1

    def __init__(self, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0, alpha: float = 0.2):
        super().__init__(target, image_shape, seed)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        g = torch.Generator().manual_seed(self.seed)
        self.pattern = torch.rand(self.image_shape, generator=g)

    def _apply(self, x: Tensor) -> Tensor:
        return torch.lerp(x, self._pattern_like(self.pattern, x), self.alpha)

    def _params(self):
        return {"alpha": self.alpha}


class SIG(Attack):
    """SIG (Barni et al. 2019): clean-label; add a horizontal sinusoid ``Δ·sin(2π·j·f / W)`` to target images.

    Only target-class training samples are poisoned and their labels are kept.  ``delta`` is the training
    amplitude in [0, 1] pixel units, ``freq`` the number of periods across the image (paper: 6).
    ``test_delta`` is the test-time amplitude (``None``: same as ``delta``); a stronger test-time signal is the
    usual way SIG is evaluated, since a clean-label trigger is learned more weakly than a relabelled one.

    Defaults, measured on MNIST-5k / :class:`~fip_fast.evaluation.models.DemoCNN` / 4 epochs: the CIFAR amplitude
    20/255 ≈ 0.08 is invisible to a digit classifier, Δ = 0.2 with test Δ = 0.2 reaches only ≈ 64 % ASR, and
    poisoning the *whole* target class (rate 0.1) reaches 97 % but costs 10 points of clean accuracy (clean
    target digits are no longer recognised without the signal).  Δ_train = 0.2, Δ_test = 0.3 at rate 0.08
    (≈ 80 % of the target class) gives ≈ 100 % ASR at unchanged clean accuracy.
    """

    name = "sig"
    clean_label = True
    default_rate = 0.08  # of the whole set: ≈ 80 % of one class on a balanced 10-class set

    def __init__(self, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0,
                 delta: float = 0.2, freq: float = 6.0, test_delta: Optional[float] = 0.3):
        super().__init__(target, image_shape, seed)
        self.delta, self.freq = float(delta), float(freq)
        self.test_delta = float(test_delta) if test_delta is not None else self.delta
        _, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float32)
        self.signal = torch.sin(2 * math.pi * j * self.freq / w).expand(self.image_shape).clone()

    def _apply(self, x: Tensor, delta: Optional[float] = None) -> Tensor:
        d = self.delta if delta is None else delta
        return x + d * self._pattern_like(self.signal, x)

    def triggered_test(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        keep = y != self.target
        xk = x[keep]
        if tuple(xk.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.name}: built for images {self.image_shape}, got {tuple(x.shape)}")
        return self._apply(xk, self.test_delta).clamp_(0.0, 1.0), y[keep].clone()

    def _params(self):
        return {"delta": self.delta, "freq": self.freq, "test_delta": self.test_delta}


def _trojan_watermark(size: int) -> Tuple[Tensor, Tensor]:
    """A fixed watermark-like glyph: a square frame with a diagonal cross and graded intensities.

    Returns ``(pattern, mask)`` of shape ``(size, size)``; the mask is the opacity (0 where the glyph is absent).
    Unlike BadNets' checkerboard it has structure at several scales and grey levels, as the optimized trigger
    of Trojaning Attack (Liu et al. 2018) does; here it is fixed rather than reverse-engineered from a model.
    """
    i = torch.arange(size)[:, None].expand(size, size)
    j = torch.arange(size)[None, :].expand(size, size)
    frame = (i == 0) | (j == 0) | (i == size - 1) | (j == size - 1)
    cross = (i == j) | (i + j == size - 1)
    mask = (frame | cross).float()
    # Graded intensities so the glyph is not a binary stamp: brighter toward the centre.
    r = ((i - (size - 1) / 2).abs().maximum((j - (size - 1) / 2).abs()) / max(1.0, (size - 1) / 2))
    pattern = 1.0 - 0.4 * r
    return pattern * mask, mask


class Trojan(Attack):
    """Trojan-style watermark patch: a fixed grey-level glyph (frame + diagonals) stamped at ``opacity``.

    Placed at the top-left corner (BadNets uses the bottom-right), default size 5×5 on 28×28 / 32×32 images
    (≈ H/6 on larger ones), opacity 1.0 where the glyph is drawn and 0 elsewhere (the image shows through).
    """

    name = "trojan"
    default_rate = 0.1

    def __init__(self, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0,
                 patch_size: Optional[int] = None, opacity: float = 1.0, margin: int = 1):
        super().__init__(target, image_shape, seed)
        self.patch_size = patch_size or max(5, round(min(self.image_shape[1:]) / 6))
        self.opacity = float(opacity)
        self._rows, self._cols = _corner_slices(self.image_shape, self.patch_size, margin, "top-left")
        pattern, mask = _trojan_watermark(self.patch_size)
        c = self.image_shape[0]
        self.pattern = pattern.expand(c, -1, -1).clone()
        self.mask = (self.opacity * mask).expand(c, -1, -1).clone()

    def _apply(self, x: Tensor) -> Tensor:
        out = x.clone()
        region = out[:, :, self._rows, self._cols]
        out[:, :, self._rows, self._cols] = torch.lerp(region, self._pattern_like(self.pattern, x),
                                                       self._pattern_like(self.mask, x))
        return out

    def _params(self):
        return {"patch_size": self.patch_size, "opacity": self.opacity}


class WaNet(Attack):
    """WaNet (Nguyen & Tran 2021): an imperceptible smooth warp of the image, via ``grid_sample``.

    A ``k×k`` field of uniform noise in [−1, 1] (from the attack's ``seed``), normalized by its mean absolute
    value, is upsampled bicubically to ``H×W`` and added, scaled by ``s / H``, to the identity sampling grid.
    Paper defaults: k = 4, s = 0.5, poison rate 0.1 and a noise ("cross") mode that additionally warps
    ``cross_ratio × n_poison`` samples with *random* fields while keeping their labels, so the network must
    learn the specific warp.  Those paper settings need ~100 epochs; to reach high ASR in the demo's few epochs
    the default strength here is s = 1.0 (still visually subtle: pixels move ≈ 0.5 px on average, ≲ 2 px at
    most) and the noise mode is off (``noise=True`` turns it on).
    """

    name = "wanet"
    default_rate = 0.1

    def __init__(self, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0,
                 k: int = 4, s: float = 1.0, noise: bool = False, cross_ratio: float = 2.0):
        super().__init__(target, image_shape, seed)
        self.k, self.s, self.noise, self.cross_ratio = int(k), float(s), bool(noise), float(cross_ratio)
        g = torch.Generator().manual_seed(self.seed)
        self.grid = self._warp_grid(self._random_field(g))  # (1, H, W, 2) in grid_sample's [-1, 1] coords

    def _random_field(self, g: torch.Generator) -> Tensor:
        field = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        return field / field.abs().mean()

    def _warp_grid(self, field: Tensor) -> Tensor:
        _, h, w = self.image_shape
        up = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1)[None]  # grid_sample wants (x, y) order
        return (identity + self.s * up / h).clamp(-1, 1)

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        grid = grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def _apply(self, x: Tensor) -> Tensor:
        return self._warp(x, self.grid)

    def _after_poison(self, x_p: Tensor, y_p: Tensor, idx: Tensor, g: torch.Generator) -> None:
        if not self.noise or idx.numel() == 0:
            return
        # Noise mode: warp other samples with the trigger grid plus fresh random noise, labels unchanged.
        rest = torch.ones(y_p.shape[0], dtype=torch.bool)
        rest[idx] = False
        rest_idx = torch.nonzero(rest).flatten()
        n_cross = min(rest_idx.numel(), int(round(self.cross_ratio * idx.numel())))
        cross = rest_idx[torch.randperm(rest_idx.numel(), generator=g)[:n_cross]]
        _, h, w = self.image_shape
        noise = (torch.rand(n_cross, h, w, 2, generator=g) * 2 - 1) / h
        grid = (self.grid + noise).clamp(-1, 1)
        x_p[cross] = self._warp(x_p[cross], grid.to(x_p.device)).clamp_(0.0, 1.0)

    def _params(self):
        return {"k": self.k, "s": self.s, "noise": self.noise}


ATTACKS: Dict[str, Type[Attack]] = {
    "badnets": BadNets,
    "blend": Blend,
    "sig": SIG,
    "trojan": Trojan,
    "wanet": WaNet,
}


def make_attack(name: str, target: int = 0, image_shape: Shape = (1, 28, 28), seed: int = 0, **kwargs) -> Attack:
    """Build an attack from :data:`ATTACKS` by name (case-insensitive); ``kwargs`` set trigger parameters."""
    key = name.lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[key](target=target, image_shape=image_shape, seed=seed, **kwargs)
