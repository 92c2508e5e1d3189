"""The δ-gradient taps: a forward hook records the projected input (or keeps the input, on the weight side) and
routes the layer output through an identity autograd function whose backward returns ∂ℓ/∂δ (and ∂ℓ/∂O with
mixing); the forward pre-hook that brings the weight up to date; the per-sample collection."""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from fip_fast.spectral._adapters import _adapter_for
from fip_fast.spectral._state import _STATE, _groups, _has_mix, _Spectral

#: the taps compute ∂ℓ/∂δ outside autograd (from the recorded projections): a backward that builds a graph of it
#: would differentiate a constant, so it is refused rather than silently wrong
_NO_DOUBLE_BACKWARD = (
    "Fast FIP in place does not support double backward (create_graph=True through a reparameterized layer, "
    "e.g. FIP(trace_estimator='batch' or 'exact') on its δ): use trace_estimator='fd' or 'lagged', or the "
    "module-swapping fip_fast.spectral_reference")


class _Call:
    """One forward call of a module using a reparameterized weight: the projected input ``a`` (N, P, k) — or, on
    the weight side (:func:`_weight_side`), the input ``x`` itself and its version — ∂relu(s)/∂δ at the δ of the
    forward (``jac``; None under FSDP2, computed in the backward), and, once the backward reaches the call's
    output, the output gradient.  A slotted class: one is made per tapped call."""

    __slots__ = ("sp", "module", "a", "x", "x_version", "unbatched", "g", "jac")

    def __init__(self, sp: _Spectral, module: nn.Module, a: Optional[Tensor], x: Optional[Tensor] = None,
                 x_version: int = 0, unbatched: bool = False, jac: Optional[Tensor] = None):
        self.sp, self.module, self.a, self.x, self.x_version = sp, module, a, x, x_version
        self.unbatched = unbatched                # a convolution called on one sample: g gets a batch of one too
        self.g: Optional[Tensor] = None
        self.jac = jac

    def capture(self, g: Tensor) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        self.g = g.unsqueeze(0) if self.unbatched else g

    def jacobian(self) -> Tensor:
        """∂relu(s)/∂δ at the δ this call's weight was derived from (:func:`._state._jacobians`)."""
        return self.sp.jacobian() if self.jac is None else self.jac

    def c(self, g: Tensor) -> Tensor:
        """The projected output gradient (N, P, k)."""
        o = self.sp.owner
        return _adapter_for(self.module).project_grad(self.module, g, o.spectral_U, o.spectral_Vh)

    def _input(self) -> Tensor:
        if self.x._version != self.x_version:
            raise RuntimeError(
                f"the input of a reparameterized {type(self.module).__name__} was modified by an in-place operation "
                "after its forward; Fast FIP's weight-side δ-gradient needs it (as full FIP's weight gradient "
                "would): make that operation out of place")
        return self.x

    @property
    def weight_side(self) -> bool:
        return self.a is None and self.sp.sink is None

    def projected(self) -> Tensor:
        """``a`` = the projected input x·Vhᵀ (computed now from the kept input on the weight side)."""
        if self.a is None:
            o = self.sp.owner
            with torch.no_grad():
                self.a = _adapter_for(self.module).project(self.module, self._input(), o.spectral_U,
                                                                 o.spectral_Vh)
        return self.a

    def dw_v(self, g: Tensor, acc: torch.dtype) -> Tensor:
        """dW·Vhᵀ (m, k): the dense weight gradient of this call projected on the right (the order autograd's
        chain rule through W = W0 + U·diag(·)·Vh takes: its rounding, not a different one)."""
        dw = _adapter_for(self.module).weight_grad(self.module, self._input(), g)
        return dw.to(acc) @ self.sp.owner.spectral_Vh.t().to(acc)

    def delta_grad(self, c: Optional[Tensor] = None, cross: Optional[Tensor] = None) -> Tensor:
        """∂ℓ/∂δ of this call, and the per-sample values into the sink while :func:`collect_per_sample` runs.
        ``c``: the projected output gradient, ``cross``: Σ cᵀ·a (k×k), when the caller has them already."""
        sp = self.sp
        if self.g is None:                      # the output took no part in the loss
            return torch.zeros_like(sp.delta)
        U = sp.owner.spectral_U
        acc = torch.promote_types(U.dtype, torch.float32)                          # fp32 math; fp64 stays fp64
        if cross is not None and sp.sink is None:
            self.g = None
            return torch.diagonal(cross) * self.jacobian()
        if self.weight_side:                    # diag(Uᵀ·dW·Vhᵀ)
            dwv = self.dw_v(self.g, acc)
            self.g = None
            return (dwv * U.to(acc)).sum(0) * self.jacobian()
        c = self.c(self.g) if c is None else c
        a = self.projected()
        self.g = None
        if sp.sink is None:                     # no per-sample values wanted: one reduction over samples and positions
            return (a.to(acc) * c.to(acc)).sum((0, 1)) * self.jacobian()
        per_sample = (a.to(acc) * c.to(acc)).sum(1) * self.jacobian()                 # (N, k)
        sp.sink.append(per_sample.detach())
        return per_sample.sum(0)


class _Tap(torch.autograd.Function):
    """Identity on the layer output that puts δ into the graph; its backward sees the output gradient g_out and
    returns ∂ℓ/∂δ from the recorded projection (or, on the weight side, from this call's dense weight gradient,
    where that is the cheaper GEMM) — no W(δ) in the graph, no dW for autograd to keep.  The output is returned as
    ``out.detach()``: the same storage, no copy, and not a view, so in-place operations on it stay legal (the
    layers tapped here never save their output for backward)."""

    @staticmethod
    def forward(ctx, out, delta, call):
        ctx.call = call
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        ctx.call.capture(g)
        return g, ctx.call.delta_grad(), None


class _TapMix(torch.autograd.Function):
    """:class:`_Tap` for a layer with singular-vector mixing (:func:`add_mixing`): also returns ∂ℓ/∂O = Σ cᵀ·a
    (masked to the trainable off-diagonal band), c = g_out·U, a = x·Vhᵀ (= Uᵀ·dW·Vhᵀ on the weight side); δ's
    gradient is the diagonal of the same k×k product."""

    @staticmethod
    def forward(ctx, out, delta, mix, call):
        ctx.call = call
        return out.detach()

    @staticmethod
    def backward(ctx, g_out):
        call = ctx.call
        call.capture(g_out)
        g = call.g                                               # with its batch dimension
        o = call.sp.owner
        acc = torch.promote_types(o.spectral_U.dtype, torch.float32)
        if call.weight_side:                                     # Σ cᵀ·a = Uᵀ·dW·Vhᵀ
            cross = o.spectral_U.t().to(acc) @ call.dw_v(g, acc)
            c = None
        else:
            c = call.c(g)                                        # projected once, for O and for δ
            cross = _cross(c.to(acc), call.projected().to(acc))
        gm = cross * o.spectral_mix_mask
        return g_out, call.delta_grad(c, cross), gm.to(o.spectral_mix.dtype), None


def _cross(c: Tensor, a: Tensor) -> Tensor:
    """Σ over samples and positions of cᵀ·a: (N, P, k) × (N, P, k) → (k, k).  One batched GEMM per sample summed
    (2–3× faster than einsum's single reshaped GEMM on the CPU when P is large, and no copy of the transposed
    views the conv projections are) while its (N, k, k) intermediate is at most 4× the inputs; einsum otherwise."""
    N, P, k = a.shape
    if k <= 4 * P:
        return torch.matmul(c.transpose(1, 2), a).sum(0)
    return torch.einsum("npi,npj->ij", c, a)


def _pre_hook(module, args):
    """Before a forward: bring the weight up to date with δ if δ changed (then every stale weight of the group is
    updated, in one call).  Under FSDP2 the root's hook has synced the shards (see :func:`shard`)."""
    sp = module.__dict__.get(_STATE)
    if sp is not None and not sp.group.sharded and sp.stale():
        sp.group.sync()


def _weight_side(sp: _Spectral, module: nn.Module, x: Tensor, out: Tensor) -> bool:
    """Whether this call's δ-gradient is cheaper from the dense weight gradient than from activations.

    In multiply-adds per call, with NP output positions, an m×n weight and rank k: from activations, projecting
    the input (NP·n·k) and the output gradient (NP·m·k) (+ NP·k² for the mixing cross product); from the weight,
    dW (NP·m·n, the GEMM full FIP pays) and Uᵀ·dW (m·n·k) (+ n·k² with mixing).  A rank-64 1024×1024 Linear
    over 1024 tokens: 134 M vs 1.1 G — activations; a full-rank 3×3 convolution C→C: 10·NP·C² vs 9·NP·C² + 9·C³
    — the weight (at full rank the input projection is a second forward).  The weight side keeps the input
    (as autograd would for dW) and never runs while per-sample gradients are collected."""
    if _adapter_for(module).weight_grad is None or sp.sink is not None or isinstance(x, (list, tuple)):
        return False
    if isinstance(getattr(module, "padding", 0), str) or not (x.is_floating_point() and x.dtype == out.dtype):
        return False
    b = sp.owner._buffers
    m, k = b["spectral_U"].shape
    n = b["spectral_Vh"].shape[1]
    npos = out.numel() // m
    mix = _has_mix(sp.owner)
    act = npos * k * (n + m) + (npos * k * k if mix else 0)
    weight = npos * m * n + m * n * k + (n * k * k if mix else 0)
    return weight < act


@functools.lru_cache(maxsize=None)
def _input_name(cls: type) -> Optional[str]:
    """The name of the first argument of ``cls.forward`` (``input`` for torch's layers), for keyword calls."""
    params = [p for p in inspect.signature(cls.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[1].name if len(params) > 1 else None


def _unbatched(module: nn.Module, x) -> bool:
    """A convolution called on one sample without its batch dimension (C, *spatial)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and isinstance(x, Tensor)
            and x.dim() == len(module.kernel_size) + 1)


def _tap_hook(module, args, kwargs, out):
    """After a forward: record the projected input (or keep the input, on the weight side) and route the output
    through the tap that returns ∂ℓ/∂δ in the backward.  The input is the first positional argument or its
    keyword (``fc(input=x)``); an unbatched convolution's input and output gradient get a batch of one."""
    sp = module.__dict__.get(_STATE)
    if sp is None or not isinstance(out, Tensor) or not torch.is_grad_enabled():
        return None
    o = sp.owner
    p = o._parameters
    delta = p["spectral_delta"]
    if not delta.requires_grad:
        return None
    x = args[0] if args else kwargs.get(_input_name(type(module)))
    if x is None:
        raise TypeError(f"a reparameterized {type(module).__name__} was called without its input "
                        f"(args={len(args)}, kwargs={sorted(kwargs)}): Fast FIP in place cannot tap it")
    unbatched = _unbatched(module, x)
    if unbatched:
        x = x.unsqueeze(0)
    jac = None if sp.group.sharded else sp.jac            # the δ of this forward (set by the pre-hook's sync)
    if _weight_side(sp, module, x, out):
        call = _Call(sp, module, None, x.detach(), x._version, unbatched, jac)
    else:
        b = o._buffers
        with torch.no_grad():
            a = _adapter_for(module).project(module, x, b["spectral_U"], b["spectral_Vh"])
        call = _Call(sp, module, a, None, 0, unbatched, jac)
    mix = p.get("spectral_mix")
    if mix is not None:
        return _TapMix.apply(out, delta, mix, call)
    return _Tap.apply(out, delta, call)


@contextlib.contextmanager
def collect_per_sample(model: nn.Module) -> Iterator[dict]:
    """Inside the block, every backward through the reparameterized layers of ``model`` also records the
    per-sample δ-gradients: the yielded dict maps each δ to the list of (N, k) fp32 tensors of its calls (sum them
    per sample, then square: the δ-Fisher of docs/method.md).  ``model`` may be the reparameterized model, a model
    containing it or a submodule of it: every δ owned by a layer of ``model`` is collected."""
    mods = {id(m) for m in model.modules()}
    items = [sp for group in _groups(model) for sp in group.items if id(sp.owner) in mods]
    out = {}
    for sp in items:
        sp.sink = out.setdefault(sp.delta, [])
    try:
        yield out
    finally:
        for sp in items:
            sp.sink = None
