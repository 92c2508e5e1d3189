"""K-FAC curvature of :mod:`fip_fast.baselines.ngf` (Martens & Grosse 2015; convolutions as in KFC, Grosse &
Martens 2016): the Kronecker factors A (input activations) and G (per-sample output gradients) of a Linear or
Conv2d layer, their exponential moving averages, the damped inverses and the natural-gradient direction
V = (G + λ_G I)⁻¹ · ∇W̃ · (A + λ_A I)⁻¹.  The definitions are in the docstring of :mod:`fip_fast.baselines.ngf`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast.baselines._common import upcast

__all__ = ["KFAC", "kfac_factors_explicit"]


def _conv_args(m: nn.Conv2d) -> dict:
    if m.groups != 1:
        raise NotImplementedError("K-FAC here supports Conv2d with groups=1 only")
    if m.padding_mode != "zeros":
        raise NotImplementedError("K-FAC here supports Conv2d with padding_mode='zeros' only")
    if isinstance(m.padding, str):
        raise NotImplementedError("K-FAC here needs numeric Conv2d padding (not 'same'/'valid')")
    return dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)


def _activations(m: nn.Module, x: Tensor) -> Tensor:
    """Rows ā (with the bias column when the layer has a bias), shape (B·L, D), fp32; L = locations per sample."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(upcast(x), **_conv_args(m))                 # (B, C·kh·kw, L)
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        a = upcast(x).reshape(-1, x.shape[-1])
    if m.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


def _out_grads(m: nn.Module, go: Tensor) -> Tensor:
    """Rows of output gradients, shape (B·L, out), fp32."""
    if isinstance(m, nn.Conv2d):
        return upcast(go).permute(0, 2, 3, 1).reshape(-1, go.shape[1])
    return upcast(go).reshape(-1, go.shape[-1])


def _grad_matrix(m: nn.Module) -> Tensor:
    gw = upcast(m.weight.grad).reshape(m.weight.shape[0], -1)
    if m.bias is not None:
        gw = torch.cat([gw, upcast(m.bias.grad).unsqueeze(1)], dim=1)
    return gw


def kfac_factors_explicit(m: nn.Module, x: Tensor, per_sample_out_grads: Tensor) -> tuple[Tensor, Tensor]:
    """The batch factors (Â, Ĝ) of the definitions in :mod:`fip_fast.baselines.ngf`, by explicit loops over
    samples and locations.

    Slow and obvious — the reference the hooks of :class:`KFAC` are tested against.  ``per_sample_out_grads`` are
    ∂ℓ_n/∂s_n (each sample's own loss), shaped like the layer's output.
    """
    B = x.shape[0]
    dt = torch.float64
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        sh, sw = m.stride
        ph, pw = m.padding
        dh, dw = m.dilation
        xp = F.pad(x.to(dt), (pw, pw, ph, ph))
        Ho, Wo = per_sample_out_grads.shape[2:]
        D = m.in_channels * kh * kw + (m.bias is not None)
        A = torch.zeros(D, D, dtype=dt)
        G = torch.zeros(m.out_channels, m.out_channels, dtype=dt)
        for n in range(B):
            for i in range(Ho):
                for j in range(Wo):
                    patch = xp[n, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
                    a = patch.reshape(-1)
                    if m.bias is not None:
                        a = torch.cat([a, a.new_ones(1)])
                    A += torch.outer(a, a)
                    g = per_sample_out_grads[n, :, i, j].to(dt)
                    G += torch.outer(g, g)
        return A / (B * Ho * Wo), G / B
    xs = x.to(dt).reshape(B, -1, x.shape[-1])
    gs = per_sample_out_grads.to(dt).reshape(B, -1, per_sample_out_grads.shape[-1])
    L = xs.shape[1]
    D = x.shape[-1] + (m.bias is not None)
    A = torch.zeros(D, D, dtype=dt)
    G = torch.zeros(gs.shape[-1], gs.shape[-1], dtype=dt)
    for n in range(B):
        for t in range(L):
            a = xs[n, t]
            if m.bias is not None:
                a = torch.cat([a, a.new_ones(1)])
            A += torch.outer(a, a)
            G += torch.outer(gs[n, t], gs[n, t])
    return A / (B * L), G / B


class KFAC:
    """K-FAC curvature for ``nn.Linear`` / ``nn.Conv2d`` modules, captured by hooks during ordinary backward passes.

    Args:
        modules: the layers (each with ``weight`` and optional ``bias``).
        ema: ε of the factor moving averages (the first update initializes the factors).
        damping: λ > 0 (see the module docstring for how it is split between the factors).
        pi_split: balance the damping between A and G by π.
        inv_every: recompute the damped inverses every this many factor updates (the first update always does).
        grad_scale: the hooks see ∂ℓ/∂s of the loss that was back-propagated; per-sample gradients are
            ``grad_scale · ∂ℓ/∂s``.  ``None`` (default) means ``B`` — right for a batch-*mean* loss.

    Protocol: forward + backward with the hooks active (``capture`` is True), then :meth:`update` (factors, and
    inverses when due), then :meth:`precondition` → ``{param: V}``.  Call :meth:`remove` when done.
    """

    def __init__(self, modules: Sequence[nn.Module], ema: float = 0.95, damping: float = 1e-3,
                 pi_split: bool = False, inv_every: int = 10, grad_scale: Optional[float] = None):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if not (isinstance(inv_every, int) and inv_every >= 1):
            raise ValueError(f"inv_every must be an int ≥ 1, got {inv_every!r}")
        self.modules = list(modules)
        for m in self.modules:
            if isinstance(m, nn.Conv2d):
                _conv_args(m)
            elif not isinstance(m, nn.Linear):
                raise NotImplementedError(f"K-FAC supports nn.Linear and nn.Conv2d, got {type(m).__name__}")
        self.ema, self.damping, self.pi_split, self.inv_every = ema, damping, pi_split, inv_every
        self.grad_scale = grad_scale
        self.capture = True
        self.state: dict[nn.Module, dict[str, Any]] = {m: {"updates": 0} for m in self.modules}
        self._a: dict[nn.Module, Tensor] = {}
        self._g: dict[nn.Module, Tensor] = {}
        self._batch: dict[nn.Module, int] = {}
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]

    def _forward_hook(self, m: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not (self.capture and torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()
        self._a[m] = x
        self._batch[m] = x.shape[0]

        def save_grad(go: Tensor, m=m) -> None:
            self._g[m] = go.detach()

        # A tensor hook fires with ∂ℓ/∂(this value) even if a later in-place op (ReLU(inplace=True)) rewrites it.
        output.register_hook(save_grad)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def batch_factors(self, m: nn.Module) -> tuple[Tensor, Tensor]:
        """(Â, Ĝ) of the last captured batch for ``m`` (fp32)."""
        if m not in self._a or m not in self._g:
            raise RuntimeError("no captured forward/backward for this layer (hooks inactive or no backward yet)")
        x, go = self._a[m], self._g[m]
        B = self._batch[m]
        a = _activations(m, x)
        g = _out_grads(m, go) * (B if self.grad_scale is None else self.grad_scale)
        A = a.t() @ a / a.shape[0]
        G = g.t() @ g / B
        return A, G

    @torch.no_grad()
    def update(self) -> None:
        """Fold the last batch into the moving averages; recompute the inverses when due."""
        for m in self.modules:
            A_hat, G_hat = self.batch_factors(m)
            st = self.state[m]
            if st["updates"] == 0:
                st["A"], st["G"] = A_hat.clone(), G_hat.clone()
            else:
                st["A"].mul_(self.ema).add_(A_hat, alpha=1 - self.ema)
                st["G"].mul_(self.ema).add_(G_hat, alpha=1 - self.ema)
            if st["updates"] % self.inv_every == 0:
                self._invert(m)
            st["updates"] += 1
        self._a.clear()
        self._g.clear()

    def dampings(self, m: nn.Module) -> tuple[float, float]:
        """(λ_A, λ_G) added to the current factors of ``m``."""
        st = self.state[m]
        pi = 1.0
        if self.pi_split:
            A, G = st["A"], st["G"]
            ta = float(A.diagonal().mean())
            tg = float(G.diagonal().mean())
            if ta > 0 and tg > 0:
                pi = math.sqrt(ta / tg)
        return pi * self.damping, self.damping / pi

    def _invert(self, m: nn.Module) -> None:
        st = self.state[m]
        la, lg = self.dampings(m)
        A, G = st["A"].double(), st["G"].double()
        eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        st["A_inv"] = torch.cholesky_inverse(torch.linalg.cholesky(A + la * eye_a)).to(st["A"].dtype)
        st["G_inv"] = torch.cholesky_inverse(torch.linalg.cholesky(G + lg * eye_g)).to(st["G"].dtype)

    @torch.no_grad()
    def precondition(self) -> dict[Tensor, Tensor]:
        """``{param: V}`` with V = G_inv · [∇W, ∇b] · A_inv split back into the weight's and the bias's shapes."""
        out: dict[Tensor, Tensor] = {}
        for m in self.modules:
            st = self.state[m]
            if "A_inv" not in st:
                raise RuntimeError("precondition() before the first update()")
            V = st["G_inv"] @ _grad_matrix(m) @ st["A_inv"]
            if m.bias is not None:
                out[m.bias] = V[:, -1].clone()
                V = V[:, :-1]
            out[m.weight] = V.reshape(m.weight.shape)
        return out

    def params(self) -> list[Tensor]:
        return [p for m in self.modules for p in (m.weight, m.bias) if p is not None]
