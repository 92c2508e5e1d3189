"""Per-sample gradient rules of :class:`fip_fast._fisher_capture._HookCapture` for layers other than Linear.

Each rule turns one call's layer input x (batch-first, detached) and output gradient g = ∂ℓ/∂y into the
per-sample gradients of one parameter, shape (N, *parameter.shape) — the layer's own backward formula, kept
per sample instead of summed over the batch:

* convolution (``nn.Conv1d`` / ``nn.Conv2d``, zero padding): G_n = g_nᵀ·unfold(x_n) per group — g (N, C_out, L)
  against the im2col columns (N, C_in/groups·K, L), as BackPACK and Opacus do, computed by one weight-gradient
  convolution with the samples as groups; bias Σ_L g;
* normalization with per-sample statistics or fixed running ones (``nn.BatchNorm*`` in eval, ``nn.LayerNorm``,
  ``nn.GroupNorm``): weight Σ_positions g ⊙ x̂, bias Σ_positions g, x̂ the normalized input;
* ``nn.Embedding``: row v of sample n gets Σ_{t: idx_nt = v} g_nt — done sparsely by
  :func:`embedding_sq` (index-add over the (sample, row) pairs present), never as (N, V, D).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layer_kind(m: nn.Module) -> str | None:
    """The rule that covers module ``m``'s weight and bias, or ``None`` (left to torch.func).

    Exact types only (a subclass may change ``forward``).  Not covered, because the per-sample gradient is not
    the module's plain formula: circular/reflect padding, embeddings with ``max_norm`` (renormalizes the weight
    in the forward), ``scale_grad_by_freq`` (couples the samples), ``sparse`` gradients; BatchNorm without running
    statistics (batch statistics couple the samples); layers carrying an in-place spectral δ (their output taps
    change the output).
    """
    if hasattr(m, "spectral_delta"):
        return None
    t = type(m)
    if t in (nn.Conv1d, nn.Conv2d):
        return "conv" if m.padding_mode == "zeros" else None
    if t is nn.Embedding:
        ok = m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
        return "embedding" if ok else None
    if t in _BN:
        return "batchnorm" if m.affine and m.running_mean is not None and m.running_var is not None else None
    if t is nn.LayerNorm:
        return "layernorm" if m.elementwise_affine else None
    if t is nn.GroupNorm:
        return "groupnorm" if m.affine else None
    return None


def input_ok(kind: str, m: nn.Module, x: Tensor, n: int) -> str:
    """Why the rule of ``kind`` can't treat this call (input x) as batch-first with ``n`` samples; "" if it can."""
    want = {"conv": 3 if type(m) is nn.Conv1d else 4}.get(kind)
    if x.dim() == 0 or x.shape[0] != n:
        return f"its layer ran on an input of shape {tuple(x.shape)} whose first dimension is not the batch ({n})"
    if want is not None and x.dim() != want:
        return f"its layer ran on an unbatched input of shape {tuple(x.shape)}"
    if kind == "layernorm" and x.dim() <= len(m.normalized_shape):
        return f"its layer ran on an unbatched input of shape {tuple(x.shape)}"
    if kind == "batchnorm" and m.training:
        return "its BatchNorm ran in train mode (batch statistics couple the samples)"
    return ""


def _positions(t: Tensor, keep: int) -> Tensor:
    """Sum (N, C, *spatial) over its spatial dimensions (dims ≥ ``keep``)."""
    return t.flatten(keep).sum(keep) if t.dim() > keep else t


def _conv_weight(m: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (N, *weight.shape) of a convolution: one weight-gradient convolution with the
    samples as groups (x as (1, N·C_in, ...), g as (1, N·C_out, ...), N·groups groups) — the im2col-and-GEMM
    per sample of BackPACK / Opacus, done by torch's own kernel.  Zero padding as the layer's (also "same")."""
    nd, n = x.dim() - 2, x.shape[0]
    pad = m.padding
    if isinstance(pad, str):
        if pad == "same":   # total d·(k−1) per dim, the odd extra on the right (as torch's own forward)
            tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            x = F.pad(x, [q for t in reversed(tot) for q in (t // 2, t - t // 2)])
        pad = (0,) * nd
    shape = (n * m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    _, gw, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]), x.reshape(1, -1, *x.shape[2:]), x.new_empty(shape), None,
        list(m.stride), list(pad), list(m.dilation), False, [0] * nd, n * m.groups, [False, True, False])
    return gw.reshape(n, *m.weight.shape)


def per_sample(kind: str, role: str, m: nn.Module, x: Tensor, g: Tensor, dt: torch.dtype) -> Tensor:
    """Per-sample gradients (N, *p.shape) of ``m``'s parameter ``role`` ("weight" | "bias") for one call, in
    dtype ``dt``, from its input x and output gradient g (both batch-first, N samples)."""
    g = g.to(dt)
    if kind == "conv":
        if role == "bias":
            return _positions(g, 2)
        return _conv_weight(m, x.to(dt), g)
    if kind == "layernorm":
        nd = len(m.normalized_shape)
        keep = list(range(1, g.dim() - nd))                                # token dims between N and the shape
        t = g if role == "bias" else g * F.layer_norm(x.to(dt), m.normalized_shape, None, None, m.eps)
        return t.sum(keep) if keep else t
    if role == "bias":
        return _positions(g, 2)
    x = x.to(dt)
    if kind == "batchnorm":
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xh = (x - m.running_mean.to(dt).view(shape)) * torch.rsqrt(m.running_var.to(dt).view(shape) + m.eps)
    elif kind == "groupnorm":
        xh = F.group_norm(x, m.num_groups, None, None, m.eps)
    else:
        raise ValueError(f"no per-sample rule for {kind!r}")
    return _positions(g * xh, 2)


def cols_per_sample(kind: str, m: nn.Module, x: Tensor) -> int:
    """Elements per sample that :func:`per_sample` forms besides its result (the im2col columns of a conv),
    for sizing the chunks of samples."""
    if kind != "conv":
        return x[0].numel()
    return x[0].numel() * math.prod(m.kernel_size)


def embedding_sq(recs, n: int, weight: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_n (∂ℓ_n/∂E)², Σ_n ∂ℓ_n/∂E and Σ_n ‖∂ℓ_n/∂E‖² of an embedding E (V, D) from its calls' (idx, g).

    Per sample and row, Σ_calls Σ_{t: idx = v} g_t by one index-add over the (sample, row) pairs present, then
    squared and added into (V, D): O(N·T·D), never (N, V, D).  Tokens equal to ``padding_idx`` get no gradient.
    """
    v = weight.shape[0]
    keys, rows = [], []
    for m, idx, g in recs:
        idx = idx.reshape(n, -1)
        g = g.reshape(n, idx.shape[1], -1).to(dt)
        key = idx + v * torch.arange(n, device=idx.device).unsqueeze(1)
        if m.padding_idx is not None:
            live = idx != m.padding_idx
            key, g = key[live], g[live]
        keys.append(key.reshape(-1))
        rows.append(g.reshape(-1, g.shape[-1]))
    key, rows = torch.cat(keys), torch.cat(rows)
    uniq, inv = torch.unique(key, return_inverse=True)
    per = torch.zeros(uniq.numel(), weight.shape[1], dtype=dt, device=rows.device).index_add_(0, inv, rows)
    sq = torch.zeros(weight.shape, dtype=dt, device=rows.device).index_add_(0, uniq % v, per.pow(2))
    s = torch.zeros(weight.shape, dtype=dt, device=rows.device).index_add_(0, key % v, rows)
    return sq, s, per.pow(2).sum()
