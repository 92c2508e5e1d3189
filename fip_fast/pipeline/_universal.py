"""The universal perturbation of :mod:`fip_fast.pipeline.holding` (docs/holding.md): its options
(:class:`UniversalPerturbation`), the persistent perturbation δ and its update (:class:`_Universal`), and the
``"auto"`` rule (:func:`auto_universal`).  After I-BAU's and AWM's universal perturbation and SAU's shared
adversarial examples; our code."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("fip_fast")

@dataclass(frozen=True)
class UniversalPerturbation:
    """eps: L∞ bound of δ, as a share of the input range (``scale="range"``: 0.2 of max − min, i.e. 0.2 for [0, 1]
    images and 0.2·(max − min) for standardized ones) or in input units (``scale="absolute"``).  step: the signed
    step per batch, in the same unit (None: eps / 10, so the bound is reached in ≈ 10 batches).  fraction: share of
    every batch replaced by x + δ (true labels; the first ⌊fraction·B⌉ samples of the already random batch).
    objective: ``"loss"`` — ascend the cross-entropy of the true labels (untargeted); ``"attract"`` — descend the
    cross-entropy toward the class that attracts the most probability mass of the wrong classes on x + δ (for a
    backdoored model, the target).  clamp: (lo, hi) range of x + δ; None: the clean set's min and max (the range
    of ``scale="range"`` is hi − lo).  gradient: where δ's gradient comes from — ``"separate"``: one extra forward
    and input-only backward before the step, in eval mode (AWM's way); ``"shared"`` (``objective="loss"`` only):
    the training step's own backward (the perturbed samples are a leaf of the batch; no extra pass, δ moves after
    the step, train mode) — cheaper, and on the development cells 0.5–0.8 point less accurate.  placement:
    ``"replace"`` — the perturbed samples take the place of the batch's first ones; ``"append"`` — perturbed copies
    of the first ⌊fraction·B⌉ samples are added to the batch (the clean samples all stay; the batch grows).
    schedule: ``"lr"`` — the share follows the learning rate (fraction × lr / the largest lr so far, rounded, so the
    last steps of a decaying schedule train on clean samples only; on the development cells this kept one point
    more clean accuracy with the 2 % clean set at the same ASR); ``"constant"`` — the same share every step.
    inputs: ``"any"`` — perturb whatever the inputs are; ``"auto"`` — only floating-point inputs with ≥ 2 dimensions
    per sample (:func:`auto_universal`; off otherwise).  The string ``"auto"`` is ``UniversalPerturbation(inputs=
    "auto")``; a dict with ``"inputs": "auto"`` changes fields and keeps the rule (Fast FIP's default).
    patch: a second, local surrogate beside δ (None: off) — a mask m over the input's positions (H×W for images,
    shared by the channels) and a pattern p (the shape of one input): (1 − m)·x + m·p, after Neural Cleanse's
    trigger model.  ``patch`` is the mask's budget Σm, as a share of the positions (0.04: 31 of 28×28 pixels);
    an L∞ ball of eps cannot hold a saturated patch such as BadNets', the mask can.  The separate pass updates m
    and p on half of its batch (m by its gradient over the gradient's largest entry, projected back onto
    0 ≤ m ≤ 1, Σm ≤ budget; p by signed steps of a tenth of the range) and the step trains on ⌊patch_fraction·k⌉
    patched copies of clean samples appended to the batch (k: the number of x + δ samples; true labels).  Needs
    ``gradient="separate"`` and inputs with ≥ 2 dimensions per sample.
    calibrate: the share q of the starting model's clean accuracy that sets δ's bound from the data
    (:func:`calibrate_eps`, once before the loop; None: eps as given): eps becomes 2·r, r the largest of eps/2, eps/4,
    eps/8, eps/16 at which a universal perturbation that may not use the class it attracts most (a backdoor's target)
    leaves at least q of the clean accuracy — eps is the largest bound, never exceeded.  On the bundled digits
    r = eps/2 passes (the bound stays 0.2); on the same digits over colour textures, where strokes have a fraction of
    the contrast, a bound of 0.2 erases the digits' own evidence, and training on x + δ at that bound cost FIP 23
    points of clean accuracy on the development cells (docs/holding.md, "calibrate: the bound from the data")."""

    eps: float = 0.2
    step: Optional[float] = None
    fraction: float = 0.5
    objective: str = "loss"
    clamp: Optional[Tuple[float, float]] = None
    gradient: str = "separate"
    scale: str = "range"
    placement: str = "replace"
    schedule: str = "lr"
    inputs: str = "any"
    patch: Optional[float] = None
    patch_fraction: float = 0.5
    calibrate: Optional[float] = 0.5

    def __post_init__(self) -> None:
        _positive("universal_perturbation.eps", self.eps)
        if self.step is not None:
            _positive("universal_perturbation.step", self.step)
        if not 0 < self.fraction <= 1:
            raise ValueError(f"universal_perturbation.fraction must lie in (0, 1], got {self.fraction!r}")
        if self.objective not in ("loss", "attract"):
            raise ValueError(f"universal_perturbation.objective must be 'loss' or 'attract', got {self.objective!r}")
        if self.clamp is not None and (len(self.clamp) != 2 or not self.clamp[0] < self.clamp[1]):
            raise ValueError(f"universal_perturbation.clamp must be (lo, hi) with lo < hi, got {self.clamp!r}")
        if self.gradient not in ("shared", "separate"):
            raise ValueError(f"universal_perturbation.gradient must be 'shared' or 'separate', got {self.gradient!r}")
        if self.gradient == "shared" and self.objective != "loss":
            raise ValueError("universal_perturbation.gradient='shared' needs objective='loss' (the training "
                             f"backward only gives the true labels' loss gradient), got objective={self.objective!r}")
        if self.scale not in ("range", "absolute"):
            raise ValueError(f"universal_perturbation.scale must be 'range' or 'absolute', got {self.scale!r}")
        if self.placement not in ("replace", "append"):
            raise ValueError(f"universal_perturbation.placement must be 'replace' or 'append', got {self.placement!r}")
        if self.schedule not in ("constant", "lr"):
            raise ValueError(f"universal_perturbation.schedule must be 'constant' or 'lr', got {self.schedule!r}")
        if self.inputs not in ("any", "auto"):
            raise ValueError(f"universal_perturbation.inputs must be 'any' or 'auto', got {self.inputs!r}")
        if self.patch is not None:
            _positive("universal_perturbation.patch", self.patch)
            if self.patch > 1:
                raise ValueError(f"universal_perturbation.patch (the mask's budget, a share of the positions) must "
                                 f"lie in (0, 1], got {self.patch!r}")
            if self.shared:
                raise ValueError("universal_perturbation.patch needs gradient='separate' (the mask and the pattern "
                                 "are updated in that pass), got gradient='shared'")
        _positive("universal_perturbation.patch_fraction", self.patch_fraction)
        if self.calibrate is not None:
            _positive("universal_perturbation.calibrate", self.calibrate)
            if self.calibrate >= 1:
                raise ValueError("universal_perturbation.calibrate (the share of the clean accuracy the calibrating "
                                 f"perturbation must leave) must lie in (0, 1), got {self.calibrate!r}")

    @property
    def shared(self) -> bool:
        """Whether δ's gradient comes from the training step's own backward (see ``gradient``)."""
        return self.gradient == "shared"


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


# -------------------------------------------------------------------------------- universal perturbation
class _Universal:
    """The persistent perturbation δ (shape of one input, fp32) and its per-batch update."""

    def __init__(self, cfg: UniversalPerturbation, x_train: Tensor, device: torch.device, world_size: int = 1):
        self.cfg = cfg
        self.world_size = world_size     # > 1: δ's gradient is summed over the ranks, so every rank keeps one δ
        lo, hi, unit = _input_range(cfg, x_train)
        self.lo, self.hi = lo, hi
        self.eps = cfg.eps * unit                                     # in input units from here on
        self.step_size = (cfg.step if cfg.step is not None else cfg.eps / 10) * unit
        self.delta = torch.zeros(x_train.shape[1:], dtype=torch.float32, device=device)
        self.mask: Optional[Tensor] = None      # patch: the mask (1, *positions) in [0, 1] and the pattern
        self.pattern: Optional[Tensor] = None
        if cfg.patch is not None:
            if x_train.dim() < 3:
                raise ValueError("universal_perturbation.patch needs inputs with ≥ 2 dimensions per sample (a channel "
                                 f"and positions), got inputs of shape {tuple(x_train.shape)}: pass patch=None")
            self.mask = torch.zeros((1,) + tuple(x_train.shape[2:]), dtype=torch.float32, device=device)
            # A seeded CPU draw: the same pattern on every rank and device, whatever the global RNG state.
            g = torch.Generator().manual_seed(0)
            self.pattern = (lo + (hi - lo) * torch.rand(x_train.shape[1:], generator=g)).to(device)
            self.budget = cfg.patch * self.mask.numel()
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)   # a tensor: no host sync per step
        self.attracted: Optional[int] = None    # the last "attract" class
        self._clean: Optional[Tensor] = None    # "shared": the clean originals of the last perturbed rows
        self._rows: Optional[slice] = None      # ... and where they sit in the mixed batch
        self.clean_rows = slice(0, 0)           # set by mix(): the rows of the last batch left unperturbed

    def perturb(self, x: Tensor, delta: Optional[Tensor] = None) -> Tensor:
        d = self.delta if delta is None else delta
        return (x + d.to(x.dtype)).clamp(self.lo, self.hi)

    def patched(self, x: Tensor, mask: Optional[Tensor] = None, pattern: Optional[Tensor] = None) -> Tensor:
        """(1 − m)·x + m·p (the patch surrogate; ``patch`` on)."""
        m = (self.mask if mask is None else mask).to(x.dtype)
        p = (self.pattern if pattern is None else pattern).to(x.dtype)
        return x + m * (p - x)

    def update(self, model: nn.Module, x: Tensor, y: Tensor,
               params: Optional[Sequence[Tensor]] = None) -> Optional[List[Optional[Tensor]]]:
        """One signed-gradient step of δ on the batch (x, y), the model in eval mode (BatchNorm's running statistics
        untouched, as AWM does) and only δ's gradient computed; a non-finite gradient leaves δ as it was.
        ``params``: also return the objective's gradient with respect to them (at the δ before the step; None
        for a parameter the objective does not reach) — the reactivation-aware direction
        (:mod:`fip_fast.pipeline._reactivation`), from the same backward."""
        was = model.training
        model.eval()
        wrt = list(params) if params is not None else []
        n = x.shape[0]
        kp = n // 2 if self.mask is not None else 0      # the patch takes the batch's second half
        try:
            d = self.delta.clone().requires_grad_(True)
            leaves = [d]
            with torch.enable_grad():
                xin = self.perturb(x[:n - kp], d)
                if kp:
                    m, p = self.mask.clone().requires_grad_(True), self.pattern.clone().requires_grad_(True)
                    leaves += [m, p]
                    xin = _cat_like([xin, self.patched(x[n - kp:], m, p)], x)
                out = model(xin).float()
                obj = self._objective(out, y)
                grads = torch.autograd.grad(obj, leaves + wrt, allow_unused=True)
        finally:
            model.train(was)
        g_in = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        with torch.no_grad():
            self._steps(self._reduce(g_in))
        return list(grads[len(leaves):]) if params is not None else None

    def _reduce(self, gs: List[Tensor]) -> List[Tensor]:
        """Under data-parallel purification, the sum of every rank's gradients, in place (one collective; the same
        steps everywhere)."""
        if self.world_size > 1:
            _all_reduce(gs)
        return gs

    def _objective(self, out: Tensor, y: Tensor) -> Tensor:
        """What δ ascends: the true labels' cross-entropy, or minus the cross-entropy toward the class with the
        most wrong-class probability mass (the samples of that class left out)."""
        if self.cfg.objective == "loss":
            return F.cross_entropy(out, y)
        c = self.attracted = _attracted_class(out, y)
        keep = y != c
        if not bool(keep.any()):
            return out.sum() * 0.0
        return -F.cross_entropy(out[keep], torch.full_like(y[keep], c))

    def mix(self, x: Tensor, y: Tensor, share: float = 1.0) -> Tuple[Tensor, Tensor]:
        """``(x, y)`` with k = ⌊share·fraction·B⌉ samples perturbed (at least one at ``share`` 1): the first ones
        replaced by x + δ, or perturbed copies of them appended (``placement``); with ``patch``, ⌊patch_fraction·k⌉
        patched copies of the next samples appended after all of them; labels unchanged.  With a shared gradient
        the batch is a leaf that requires grad: the step's backward leaves ∂loss/∂(x + δ) in its ``.grad`` for
        :meth:`update_shared`."""
        k = int(round(share * self.cfg.fraction * x.shape[0]))
        k = max(1, k) if share >= 1.0 else k
        self._clean, self._rows = None, None
        self.clean_rows = slice(0, x.shape[0])      # where the unperturbed samples sit in the mixed batch
        if k == 0:
            return x, y
        n, pert = x.shape[0], self.perturb(x[:k])
        kp = int(round(self.cfg.patch_fraction * k)) if self.mask is not None else 0
        # patched copies of the clean samples after the perturbed ones (wrapping around the batch), last
        src = torch.arange(k, k + kp, device=x.device) % n if kp else None
        extra_x, extra_y = ([self.patched(x[src])], [y[src]]) if kp else ([], [])
        if self.cfg.placement == "append":
            out, y_out = _cat_like([x, pert, *extra_x], x), torch.cat([y, y[:k], *extra_y])
            rows = slice(n, n + k)
        else:       # the whole batch written once: perturbed rows, the rest, the patched copies
            out, y_out = _cat_like([pert, x[k:], *extra_x], x), (torch.cat([y, *extra_y]) if kp else y)
            rows = slice(0, k)
            self.clean_rows = slice(k, n)
        if self.cfg.shared:
            self._clean, self._rows = x[:k], rows
            out.requires_grad_(True)
        return out, y_out

    def update_shared(self, mixed: Tensor) -> None:
        """The signed step of δ from the gradient the training step left on ``mixed`` (the output of :meth:`mix`):
        ∂loss/∂δ = Σ over the perturbed samples of ∂loss/∂(x + δ), where the clamp passes it.  Every closure call of
        the step adds to it (FIP's fd suppressor: at w and at w + e).  No gradient (a step the optimizer skipped
        before any backward) or a non-finite one leaves δ as it was."""
        g_in, clean, rows = mixed.grad, self._clean, self._rows
        self._clean = self._rows = None
        with torch.no_grad():
            if g_in is None or clean is None:   # a zero gradient still joins the ranks' sum (no rank may skip it)
                g = torch.zeros_like(self.delta)
            else:
                z = clean.float() + self.delta
                g = (g_in[rows].float() * ((z >= self.lo) & (z <= self.hi))).sum(0)
            g, = self._reduce([g])
            if g_in is None or clean is None:
                self._skipped += int(clean is not None)     # no perturbed sample this step is not a skip
                return
            self._steps([g])

    def _steps(self, gs: List[Tensor]) -> None:
        """δ ← clip(δ + step·sign(g)) and, with ``patch``, the mask's and the pattern's steps (gradients in that
        order) — or none of them (and one more skip) when a gradient is not finite: decided on the device, without
        reading anything back to the host."""
        ok = torch.stack([torch.isfinite(g).all() for g in gs]).all()
        moved = (self.delta + self.step_size * gs[0].sign()).clamp_(-self.eps, self.eps)
        self.delta.copy_(torch.where(ok, moved, self.delta))
        self._skipped += (~ok).long()
        if len(gs) == 3:
            gm, gp = gs[1], gs[2]
            top = gm.abs().max()
            m = _project_mask(self.mask + _MASK_STEP * gm / torch.where(top > 0, top, 1.0), self.budget)
            p = (self.pattern + 0.1 * (self.hi - self.lo) * gp.sign()).clamp_(self.lo, self.hi)
            self.mask.copy_(torch.where(ok, m, self.mask))
            self.pattern.copy_(torch.where(ok, p, self.pattern))

    @property
    def skipped(self) -> int:
        """Updates left out for a non-finite gradient (or a step without one)."""
        return int(self._skipped)

    @skipped.setter
    def skipped(self, n: int) -> None:
        self._skipped.fill_(int(n))


def _input_range(cfg: UniversalPerturbation, x: Tensor) -> Tuple[float, float, float]:
    """(lo, hi): the range of x + δ (``clamp``, or the clean inputs' min and max), and the unit of ``eps`` and
    ``step`` in input units (hi − lo for ``scale="range"``, 1 for ``"absolute"``)."""
    lo, hi = cfg.clamp if cfg.clamp is not None else (float(x.min()), float(x.max()))
    if not hi > lo:
        raise ValueError(f"universal_perturbation: the clean inputs are constant ({lo!r}), so x + δ has no range "
                         "to move in; pass universal_perturbation=None or a clamp=(lo, hi)")
    return lo, hi, (hi - lo) if cfg.scale == "range" else 1.0


def _attracted_class(out: Tensor, y: Tensor) -> int:
    """The class with the most wrong-class probability mass over the batch (the true class of each sample left out
    of its row): for a backdoored model under a universal perturbation, the target.  One read back to the host."""
    with torch.no_grad():
        p = out.softmax(1)
        p[torch.arange(p.shape[0], device=p.device), y] = 0.0
        return int(p.mean(0).argmax())


def _all_reduce(ts: List[Tensor]) -> None:
    """Sum ``ts`` over the ranks in place: one collective over the flattened tensors (one per tensor when their
    dtypes differ)."""
    import torch.distributed as dist

    if len({t.dtype for t in ts}) > 1:
        for t in ts:
            dist.all_reduce(t)
        return
    flat = torch.cat([t.reshape(-1) for t in ts])
    dist.all_reduce(flat)
    for t, part in zip(ts, flat.split([t.numel() for t in ts])):
        t.copy_(part.view_as(t))


def _cat_like(parts: Sequence[Tensor], x: Tensor) -> Tensor:
    """``torch.cat(parts)`` (batches of ``x``'s samples) written into one buffer with ``x``'s per-sample strides
    where ``x`` is dense: the concatenation of elementwise results picks NCHW strides for one-channel images even
    when ``x``'s are channels_last — and oneDNN runs a CNN's step markedly slower in that layout
    (``bench holding_cost``: 1.87× the plain loop instead of 1.29×)."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return torch.cat(parts)
    out = torch.empty_strided((sum(t.shape[0] for t in parts),) + tuple(x.shape[1:]), x.stride(),
                              dtype=parts[0].dtype, device=parts[0].device)
    i = 0
    for t in parts:         # a slice assignment: autograd follows it (CopySlices), as it follows torch.cat
        out[i:i + t.shape[0]] = t
        i += t.shape[0]
    return out


#: The mask's step: its gradient over the gradient's largest entry, times this (the mask's unit is 1).
_MASK_STEP = 0.1


def _project_mask(m: Tensor, budget: float) -> Tensor:
    """m clipped to [0, 1] and, where its sum exceeds ``budget``, lowered by the τ ≥ 0 with Σ max(c − τ, 0) =
    budget (c the clipped m; for c in [0, 1] the upper clip of c − τ never binds) — the sorted-threshold
    projection (Duchi et al., ICML 2008): one sort and a cumulative sum on the device, no loop, no host read."""
    c = m.clamp(0.0, 1.0)
    srt = c.flatten().sort(descending=True).values
    cs = srt.cumsum(0)
    j = torch.arange(1, srt.numel() + 1, device=m.device, dtype=c.dtype)
    k = (srt - (cs - budget) / j > 0).sum().clamp(min=1)        # how many entries stay above τ
    tau = ((cs.gather(0, (k - 1).view(1)) - budget) / k.to(c.dtype)).clamp(min=0.0)
    return torch.where(c.sum() > budget, (c - tau).clamp(min=0.0), c)


#: calibrate_eps: the probed radii are eps/2 … eps/2^RUNGS; at each, STEPS signed steps of radius/4 on at most
#: BATCH clean samples (a few percent of a 100-step purification's passes where the first radius passes).
_CAL_RUNGS, _CAL_STEPS, _CAL_BATCH = 4, 8, 128


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate_eps` found: the bound it set (a share of the input range, like ``eps``), the clean
    accuracy of the starting model on the calibration batch, and the accuracy left at each radius it probed."""

    eps: float
    clean_acc: float
    probed: Tuple[Tuple[float, float], ...]


def calibrate_eps(model: nn.Module, x: Tensor, y: Tensor, cfg: UniversalPerturbation,
                  device: Optional[torch.device] = None) -> Calibration:
    """δ's bound from the data (``calibrate``): the bound must stay below the radius at which a universal
    perturbation erases the data's own class evidence, or training on x + δ with true labels is adversarial
    training at a budget that costs clean accuracy.  The starting model is backdoored, and its trigger's shortcut
    makes it look fragile; so the probing perturbation may not use the class it attracts most (that class's logit
    is left out, and its samples too), which leaves the radius of the clean features.

    For r = eps/2, eps/4, …, eps/2^4 (shares of the range, largest first): run ``_CAL_STEPS`` signed steps of r/4 on
    the first ``_CAL_BATCH`` samples of ``(x, y)`` (the model in eval mode), and stop at the first r where the
    accuracy left (the left-out class excluded) is ≥ ``calibrate`` × the model's clean accuracy there; the bound is
    2·r (eps where r = eps/2 passes, eps/16 where none does).  Deterministic; only input gradients.

    Args:
        model: the starting model; x ``(N, …)``, y ``(N,)``: the clean purification data (its min and max are the
            range, as for δ); device: where the batch goes (default: x's).
    """
    if cfg.calibrate is None:
        raise ValueError("calibrate_eps needs universal_perturbation.calibrate (the share of the clean accuracy)")
    was = model.training
    model.eval()
    n = min(int(x.shape[0]), _CAL_BATCH)
    xb, yb = x[:n].to(device or x.device), y[:n].to(device or x.device)
    lo, hi, unit = _input_range(cfg, x)
    try:
        with torch.no_grad():
            acc0 = float((model(xb).argmax(1) == yb).float().mean())
        probed: List[Tuple[float, float]] = []
        for k in range(1, _CAL_RUNGS + 1):
            r = cfg.eps / 2 ** k
            probed.append((r, _excluded_accuracy(model, xb, yb, r * unit, lo, hi)))
            if probed[-1][1] >= cfg.calibrate * acc0:
                break
        return Calibration(2 * probed[-1][0], acc0, tuple(probed))
    finally:
        model.train(was)


def _excluded_accuracy(model: nn.Module, x: Tensor, y: Tensor, radius: float, lo: float, hi: float) -> float:
    """Accuracy left on (x, y) after a universal perturbation of L∞ ``radius`` (input units) that ascends the
    cross-entropy with the most attracted wrong class left out of the logits and of the samples."""
    d = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
    for _ in range(_CAL_STEPS):
        d.requires_grad_(True)
        with torch.enable_grad():
            logits, keep = _excluded_logits(model((x + d.to(x.dtype)).clamp(lo, hi)).float(), y)
            if not bool(keep.any()):
                return 0.0
            g, = torch.autograd.grad(F.cross_entropy(logits, y[keep]), d)
        with torch.no_grad():
            d = (d + radius / 4 * g.sign()).clamp_(-radius, radius)
    with torch.no_grad():
        logits, keep = _excluded_logits(model((x + d.to(x.dtype)).clamp(lo, hi)).float(), y)
        return float((logits.argmax(1) == y[keep]).float().mean()) if bool(keep.any()) else 0.0


def _excluded_logits(out: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """The logits of the samples not of class c, with c's logit pushed out of reach (c: the class with the most
    wrong-class probability mass, as ``objective="attract"`` finds it), and which samples those are."""
    c = _attracted_class(out, y)
    keep = y != c
    return out[keep].index_fill(1, torch.tensor([c], device=out.device), -1e4), keep


def per_sample_array(x_train: Tensor) -> bool:
    """Whether the inputs ``(N, …)`` are floating point with at least two dimensions per sample (images, signals):
    where the ``"auto"`` holding options apply."""
    return bool(x_train.is_floating_point()) and x_train.dim() >= 3


def auto_universal(x_train: Tensor) -> bool:
    """``universal_perturbation="auto"`` (FIP's and Fast FIP's default): on for floating-point inputs with at least
    two dimensions per sample — images (C, H, W), signals (C, T) — and off for flat feature vectors (N, D) and for
    integer inputs (token ids, where adding δ means nothing).  Flat features are off because one L∞ budget over
    heterogeneous features has no common unit (a share of the global min–max range is a different perturbation for
    every feature); on the MLP of examples/own_model (20 features) forcing it on with FIP cost 0.5 point of clean
    accuracy and took the ASR from 47 to 39 % — neither removes that backdoor at the defaults."""
    on = per_sample_array(x_train)
    if not on:
        logger.info("fip_fast.pipeline: universal_perturbation='auto' is off for inputs of dtype %s and shape %s "
                    "(it perturbs floating-point inputs with ≥ 2 dimensions per sample)", x_train.dtype,
                    tuple(x_train.shape))
    return on
