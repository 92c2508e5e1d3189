"""Fast FIP's spectral ops: W(δ) = U·diag(relu(s))·Vh (+ residual) and the δ-gradients of a spectral Linear.

``spectral_weight``
    One launch of a tiled ``tl.dot`` matmul, grid (⌈m/BM⌉, ⌈n/BN⌉).  The column scale relu(s) is fused into the
    load of U (no diag matrix, no scaled copy of U), the optional frozen residual of the rank-k form is added in
    the epilogue, and the result is written once in U's dtype.  fp32 math (``input_precision="ieee"``: no TF32).

``spectral_linear_grad``
    The two projections a = x·Vhᵀ and b = g_out·U are torch matmuls (cuBLAS does them better than a hand-written
    kernel; they are the same calls as the reference, so a and b agree bit for bit).  Everything after them is
    one launch: the product a ⊙ b, the sum over tokens, the Jacobian 1[s>0] (·S when relative), the per-sample
    square, and the sum over samples — the last as per-program partial sums reduced in a fixed order by the
    program that finishes last (deterministic; no memset, no atomics on floats).  Not fused: the projections
    into that kernel (a, b are materialized, N·T·r fp32 each).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt
from ._launch_count import launch

BM, BN, BK = 64, 64, 32
#: spectral_linear_grad tiles: BR singular directions × BT tokens per iteration, NB samples per program
BR, BT, NB = 32, 16, 16


@triton.jit
def _spectral_weight_kernel(U, S, D, Vh, R, W, m, n, r,
                            s_um, s_uk, s_vk, s_vn, s_rm, s_rn, s_wm, s_wn,
                            HAS_RES: tl.constexpr, RELATIVE: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """W[BM×BN tile] = Σ_k (U[:, k]·relu(s_k)) ⊗ Vh[k, :] (+ R)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    m_mask = rm < m
    n_mask = rn < n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, r, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < r
        sv = tl.load(S + rk, mask=k_mask, other=0.0).to(tl.float32)
        dv = tl.load(D + rk, mask=k_mask, other=0.0).to(tl.float32)
        if RELATIVE:
            s = sv * (1.0 + dv)
        else:
            s = sv + dv
        s = tl.maximum(s, 0.0)
        u = tl.load(U + rm[:, None] * s_um + rk[None, :] * s_uk, mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        u = u * s[None, :]                      # the diag(relu(s)) scaling, fused into the U operand
        v = tl.load(Vh + rk[:, None] * s_vk + rn[None, :] * s_vn, mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(u, v, acc, input_precision="ieee")
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(R + rm[:, None] * s_rm + rn[None, :] * s_rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(W + rm[:, None] * s_wm + rn[None, :] * s_wn, acc.to(W.dtype.element_ty), mask=mask)


def _check_float(*ts: Optional[Tensor]) -> None:
    for t in ts:
        if t is not None and t.dtype not in mt.DTYPE_CODES:
            raise TypeError(f"the Triton spectral kernels take fp32/fp16/bf16 tensors, got {t.dtype}")


@torch.no_grad()
def spectral_weight(U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor, residual: Optional[Tensor] = None,
                    relative: bool = False) -> Tensor:
    """W(δ) = U·diag(relu(s))·Vh (+ residual), s = S + δ (or S·(1+δ) when ``relative``), one launch.

    Shapes: U (m, r), S (r,), δ (r,), Vh (r, n), residual (m, n) or None → W (m, n) in U's dtype; any strides.
    fp32 accumulation.  Not differentiable through autograd (a kernel op; the δ-gradient is
    :func:`spectral_linear_grad` or diag(Uᵀ·dW·Vhᵀ)·1[s>0]).  See :func:`fip_fast.reference.spectral_weight`.
    """
    _check_float(U, S, delta, Vh, residual)
    m, r = U.shape
    n = Vh.shape[1]
    if Vh.shape[0] != r or S.numel() != r or delta.numel() != r:
        raise ValueError(f"shapes U {tuple(U.shape)}, S {tuple(S.shape)}, δ {tuple(delta.shape)}, "
                         f"Vh {tuple(Vh.shape)} do not chain")
    if residual is not None and tuple(residual.shape) != (m, n):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {(m, n)}")
    W = torch.empty((m, n), dtype=U.dtype, device=U.device)
    if m == 0 or n == 0:
        return W
    S_, D_ = S.contiguous(), delta.contiguous()    # 1-d, r elements: free when already contiguous
    R = residual if residual is not None else W    # placeholder pointer, never read when HAS_RES is False
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
    launch(_spectral_weight_kernel, grid, U, S_, D_, Vh, R, W, m, n, r,
           U.stride(0), U.stride(1), Vh.stride(0), Vh.stride(1), R.stride(0), R.stride(1), W.stride(0), W.stride(1),
           HAS_RES=residual is not None, RELATIVE=bool(relative), BM=BM, BN=BN, BK=BK, num_warps=4, device=U.device)
    return W


@triton.jit(do_not_specialize=["N", "T"])
def _spectral_grad_kernel(A, B, S, D, PS_SQ, PARTIAL, GRAD, counter, N, T, r, n_programs,
                          RELATIVE: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, NB: tl.constexpr):
    """Program (i, j): directions [i·BR, (i+1)·BR), samples [j·NB, (j+1)·NB).

    A, B: (N, T, r) contiguous fp32.  For each sample n: ds = Σ_t A[n,t,:]·B[n,t,:]; ps = ds·jac;
    PS_SQ[n, :] = ps²; PARTIAL[j, :] = Σ_n ps over the program's samples.  The last program to finish
    (ticket on ``counter``) writes GRAD = Σ_j PARTIAL[j, :] in order of j and resets ``counter``."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rr = pid_r * BR + tl.arange(0, BR)
    r_mask = rr < r
    sv = tl.load(S + rr, mask=r_mask, other=0.0).to(tl.float32)
    dv = tl.load(D + rr, mask=r_mask, other=0.0).to(tl.float32)
    if RELATIVE:
        s = sv * (1.0 + dv)
        jac = tl.where(s > 0, sv, 0.0)           # ∂s/∂δ = S on the active set
    else:
        s = sv + dv
        jac = tl.where(s > 0, 1.0, 0.0)
    g_acc = tl.zeros([BR], dtype=tl.float32)
    for i in range(NB):
        nn = (pid_n * NB + i).to(tl.int64)
        n_ok = nn < N
        acc = tl.zeros([BT, BR], dtype=tl.float32)
        for t0 in range(0, T, BT):
            tt = (t0 + tl.arange(0, BT)).to(tl.int64)
            msk = n_ok & (tt[:, None] < T) & r_mask[None, :]
            off = (nn * T + tt[:, None]) * r + rr[None, :]
            a = tl.load(A + off, mask=msk, other=0.0)
            b = tl.load(B + off, mask=msk, other=0.0)
            acc += a * b
        ps = tl.sum(acc, axis=0) * jac           # ∂ℓ_n/∂δ for this block of directions
        tl.store(PS_SQ + nn * r + rr, ps * ps, mask=n_ok & r_mask)
        g_acc += tl.where(n_ok, ps, 0.0)
    tl.store(PARTIAL + pid_n * r + rr, g_acc, mask=r_mask)
    ticket = tl.atomic_add(counter, 1)           # acq_rel: PARTIAL stores before, the loads below after
    if ticket == n_programs - 1:
        n_blocks = tl.num_programs(1)
        for r0 in range(0, r, BR):
            rk = r0 + tl.arange(0, BR)
            k_mask = rk < r
            tot = tl.zeros([BR], dtype=tl.float32)
            for j in range(0, n_blocks):
                tot += tl.load(PARTIAL + j * r + rk, mask=k_mask, other=0.0, cache_modifier=".cg")
            tl.store(GRAD + rk, tot, mask=k_mask)
        tl.store(counter, 0)


@torch.no_grad()
def spectral_linear_grad(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor,
                         relative: bool = False) -> tuple[Tensor, Tensor]:
    """(grad_delta (r,), per_sample_sq (N, r)) of a spectral Linear y = x·W(δ)ᵀ (+ b), fp32.

    x (N, n) or (N, T, n), grad_out (N, m) or (N, T, m) = ∂ℓ/∂y of the summed loss, U (m, r), Vh (r, n).
    grad_delta = Σ_n ∂ℓ_n/∂δ and per_sample_sq = (∂ℓ_n/∂δ)², with ∂ℓ_n/∂δ = (Σ_t a ⊙ b)·1[s>0] (·S when
    relative), a = x·Vhᵀ, b = grad_out·U.  Two torch matmuls (+ fp32 casts of non-fp32 inputs) and one Triton
    launch.  See :func:`fip_fast.reference.spectral_linear_grad`.
    """
    _check_float(x, grad_out, U, S, delta, Vh)
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    N, T = x.shape[0], x.shape[1]
    r = S.numel()
    a = (x.float() @ Vh.float().t()).contiguous()            # (N, T, r)
    b = (grad_out.float() @ U.float()).contiguous()          # (N, T, r)
    per_sample_sq = torch.empty((N, r), dtype=torch.float32, device=x.device)
    grad = torch.empty((r,), dtype=torch.float32, device=x.device)
    if r == 0:
        return grad, per_sample_sq
    n_blocks = max(1, triton.cdiv(N, NB))    # ≥ 1 program along samples: N = 0 still writes grad = 0
    partial = torch.empty((n_blocks, r), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(r, BR), n_blocks)
    launch(_spectral_grad_kernel, grid, a, b, S.contiguous(), delta.contiguous(), per_sample_sq, partial, grad,
           mt.done_counter(x.device), N, T, r, grid[0] * grid[1],
           RELATIVE=bool(relative), BR=BR, BT=BT, NB=NB, num_warps=4, device=x.device)
    return grad, per_sample_sq
