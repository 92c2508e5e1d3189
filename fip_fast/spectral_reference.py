"""The reference of Fast FIP's spectral reparameterization (module swap; W(δ) rebuilt by autograd).

:mod:`fip_fast.spectral` is the product (in place: no module swap, no W(δ), no dense dW); this module keeps the
readable form of the same math — a :class:`SpectralLayer` replacing the layer and computing W(δ) every forward —
for the parity tests and for the callers not yet moved to the in-place form.

Train only a shift δ of each layer's singular values.

For a selected layer with weight matrix W (Linear: out×in; Conv: out×(in/groups·k…); Embedding: num×dim;
other layer types through :func:`register_adapter`), the thin SVD W = U·diag(S)·Vh is taken once in fp32 (fp64
for an fp64 model) and

    W(δ) = U·diag(relu(S + δ))·Vh                                   (full rank, r = min(out, in))
    W(δ) = R + U_k·diag(relu(S_k + δ))·Vh_k,  R = W − U_k·diag(S_k)·Vh_k   (``rank=k``: R frozen)

With ``relative=True`` the shift is relative, s = S·(1 + δ), which puts every singular value on the same scale
(useful because singular values are O(1–10) and a common step size moves small ones too much).

``U``, ``Vh`` (and ``R``) are buffers in the parameter dtype, ``S`` an fp32 buffer, ``delta`` an fp32
parameter (both fp64 for an fp64 model): they are saved in the ``state_dict`` and moved by ``.to()``.
:func:`merge` writes W(δ) back into ordinary layers, so a purified model has no SVD left and loads into the original
architecture.

Example::

    deltas = spectral.reparameterize(model)          # model now trains δ only
    ...                                               # purify
    spectral.merge(model)                             # ordinary nn.Linear / nn.Conv2d again
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fip_fast import ops
from fip_fast.spectral import _adapters

__all__ = ["SpectralLayer", "reparameterize", "merge", "spectral_layers", "register_adapter", "Adapter"]


# ------------------------------------------------------------------------------------------- layer adapters
# One registry for both forms: an adapter registered with fip_fast.spectral.register_adapter serves here too (the
# module swap needs its ``forward``).
Adapter = _adapters.Adapter
register_adapter = _adapters.register_adapter
DEFAULT_TYPES = _adapters.DEFAULT_TYPES


def _adapter_for(layer: nn.Module) -> Adapter:
    adapter = _adapters._adapter_for(layer)
    if adapter.forward is None:
        raise TypeError(f"the spectral adapter of {type(layer).__name__} has no forward (the module swap runs the "
                        "layer with W(δ)); register one with Adapter(..., forward=...) via "
                        "fip_fast.spectral.register_adapter")
    return adapter


# ------------------------------------------------------------------------------------------- W(δ) autograd
class _SpectralWeight(torch.autograd.Function):
    """W(δ) through the dispatcher; dδ = diag(Uᵀ·dW·Vhᵀ) ⊙ ∂s/∂δ, computed as rowsum(U ⊙ (dW·Vhᵀ)) — no diag."""

    generate_vmap_rule = True

    @staticmethod
    def forward(delta, U, S, Vh, residual, relative, impl):
        return ops.spectral_weight(U, S, delta, Vh, residual, relative, impl=impl)

    @staticmethod
    def setup_context(ctx, inputs, output):   # separate from forward so torch.func (vmap/grad) can transform it
        delta, U, S, Vh, _, relative, _ = inputs
        ctx.save_for_backward(delta, U, S, Vh)
        ctx.relative = relative

    @staticmethod
    def backward(ctx, dW):
        delta, U, S, Vh = ctx.saved_tensors
        acc = torch.promote_types(torch.promote_types(dW.dtype, delta.dtype), torch.float32)  # fp64 stays fp64
        ds = (U.to(acc) * (dW.to(acc) @ Vh.to(acc).t())).sum(0)
        s = S * (1.0 + delta) if ctx.relative else S + delta
        jac = (s > 0).to(acc) * (S.to(acc) if ctx.relative else 1.0)
        return (ds * jac).to(delta.dtype), None, None, None, None, None, None


class SpectralLayer(nn.Module):
    """A layer whose weight is W(δ) = U·diag(relu(S+δ))·Vh (+ frozen residual); everything else is the original.

    Attributes:
        base: the original layer, its ``weight`` removed (bias and configuration kept).
        U (m, r), Vh (r, n): buffers in the weight dtype.  S (r,): fp32 buffer.  delta (r,): fp32
        parameter (both fp64 for an fp64 model).
        residual (m, n) or None: frozen W − U_k·diag(S_k)·Vh_k in rank-k mode.
    """

    def __init__(self, base: nn.Module, rank: Optional[int] = None, relative: bool = False,
                 svd: str = "full", impl: str = "auto"):
        super().__init__()
        if isinstance(base, nn.Embedding) and base.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalizes its weight in place; it cannot be "
                             "reparameterized")
        if svd not in ("full", "lowrank"):
            raise ValueError(f"svd must be 'full' or 'lowrank', got {svd!r}")
        adapter = _adapter_for(base)
        weight = base.weight
        acc = torch.promote_types(weight.dtype, torch.float32)      # S and δ in fp32 (fp64 for an fp64 model)
        W = adapter.to_matrix(weight.detach()).to(acc)
        m, n = W.shape
        r_full = min(m, n)
        k = r_full if rank is None else int(rank)
        if k < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        k = min(k, r_full)
        if svd == "lowrank" and k < r_full:
            U, S, V = torch.svd_lowrank(W, q=min(k + 8, r_full), niter=4)
            U, S, Vh = U[:, :k], S[:k], V[:, :k].t()
        else:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :k], S[:k].clone(), Vh[:k]   # clone: don't keep the full spectrum's storage
        residual = None
        if k < r_full:
            residual = (W - (U * S) @ Vh).to(weight.dtype)
        self.adapter = adapter
        self.weight_shape = weight.shape
        self.weight_requires_grad = weight.requires_grad
        self.relative = relative
        self.impl = impl
        self.rank = k
        self.register_buffer("U", U.to(weight.dtype).contiguous())
        self.register_buffer("S", S.contiguous())
        self.register_buffer("Vh", Vh.to(weight.dtype).contiguous())
        self.register_buffer("residual", residual)
        self.delta = nn.Parameter(torch.zeros(k, dtype=acc, device=weight.device))
        del base.weight
        self.base = base

    def spectrum(self) -> Tensor:
        """The current singular values s(δ) (fp32 — fp64 for an fp64 model —, before relu)."""
        return self.S * (1.0 + self.delta) if self.relative else self.S + self.delta

    def matrix(self) -> Tensor:
        """W(δ) as an (m, n) matrix, differentiable in δ."""
        return _SpectralWeight.apply(self.delta, self.U, self.S, self.Vh, self.residual, self.relative,
                                     self.impl)

    def weight(self) -> Tensor:
        """W(δ) in the original layer's weight shape."""
        return self.adapter.from_matrix(self.matrix(), self.weight_shape)

    def forward(self, input: Tensor) -> Tensor:         # named as torch's layers name it: fc(input=x) works
        return self.adapter.forward(self.base, input, self.weight())

    def extra_repr(self) -> str:
        return (f"{type(self.base).__name__}, rank={self.rank}, shape={tuple(self.weight_shape)}, "
                f"relative={self.relative}")

    @torch.no_grad()
    def to_base(self) -> nn.Module:
        """The original layer with W(δ) baked in as an ordinary parameter."""
        w = self.weight().detach().to(self.U.dtype)
        self.base.weight = nn.Parameter(w.contiguous().clone(), requires_grad=self.weight_requires_grad)
        return self.base


# ------------------------------------------------------------------------------------------- model surgery
_FROZEN: "weakref.WeakKeyDictionary[nn.Module, list[tuple[weakref.ref, bool]]]" = weakref.WeakKeyDictionary()


def spectral_layers(model: nn.Module) -> list[tuple[str, SpectralLayer]]:
    """(qualified name, layer) for every spectral layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLayer)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def reparameterize(model: nn.Module, layer_types: Sequence[type] = DEFAULT_TYPES, rank: Optional[int] = None,
                   freeze_others: bool = True, *, relative: bool = False, svd: str = "full",
                   include: Optional[Callable[[str, nn.Module], bool]] = None,
                   impl: str = "auto") -> list[nn.Parameter]:
    """Replace every layer of ``layer_types`` in ``model`` (in place) by a :class:`SpectralLayer`.

    Args:
        model: the model; its selected layers are swapped for spectral ones.
        layer_types: layer classes to reparameterize (subclasses included).
        rank: ``None`` for full rank; ``k`` keeps the top-k singular directions trainable and the rest as a
            frozen residual (for large layers).
        freeze_others: set ``requires_grad=False`` on every other parameter (restored by :func:`merge`).
        relative: s = S·(1 + δ) instead of S + δ.
        svd: ``"full"`` (``torch.linalg.svd``) or ``"lowrank"`` (randomized ``torch.svd_lowrank``, rank-k only).
        include: optional predicate ``(qualified_name, layer) -> bool`` to select layers further.
        impl: kernel implementation for W(δ) (see :mod:`fip_fast.ops`).
    Returns:
        The δ parameters, in module order.
    """
    types = tuple(layer_types)
    skip = _adapters._weights_read_directly(model)         # nn.MultiheadAttention.out_proj, as in place
    targets = [(n, m) for n, m in model.named_modules()
               if n and isinstance(m, types) and not isinstance(m, SpectralLayer) and id(m) not in skip
               and not any(n.startswith(s + ".") for s, _ in spectral_layers(model))
               and isinstance(getattr(m, "weight", None), nn.Parameter)
               and (include is None or include(n, m))]
    if not targets:
        raise ValueError(f"no layer of types {[t.__name__ for t in types]} found to reparameterize")
    frozen: list[tuple[weakref.ref, bool]] = []
    if freeze_others:
        target_weights = {id(m.weight) for _, m in targets}
        for p in model.parameters():
            if id(p) not in target_weights:
                frozen.append((weakref.ref(p), p.requires_grad))
                p.requires_grad_(False)
    deltas = []
    for name, layer in targets:
        sl = SpectralLayer(layer, rank=rank, relative=relative, svd=svd, impl=impl)
        _replace(model, name, sl)
        deltas.append(sl.delta)
    _FROZEN.setdefault(model, []).extend(frozen)
    return deltas


def merge(model: nn.Module) -> nn.Module:
    """Turn every :class:`SpectralLayer` of ``model`` back into its original layer type with W(δ) baked in, and
    restore the ``requires_grad`` flags that :func:`reparameterize` changed.  Returns ``model`` (in place)."""
    for name, sl in spectral_layers(model):
        _replace(model, name, sl.to_base())
    for ref, flag in _FROZEN.pop(model, []):
        p = ref()
        if p is not None:
            p.requires_grad_(flag)
    return model
