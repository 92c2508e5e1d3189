"""``impl="foreach"``: the kernel contracts of :mod:`fip_fast.reference` with ``torch._foreach_*`` ops.

Works on every device and dtype (the CPU default).  Math in fp32: low-precision parameters are read into fp32
copies and written back once.  Scalars may be Python numbers or 0-dim tensors; tensors are used as tensors (no
``.item()``), except ``found_inf``: skipping a step is a host-side decision here (one sync per step; the Triton
and CUDA kernels read the flag on the device instead).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fip_fast.reference import Scalar


def available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _skip(found_inf: Optional[Scalar]) -> bool:
    if found_inf is None:
        return False
    return bool(found_inf.item() != 0) if isinstance(found_inf, Tensor) else found_inf != 0


def _fp32(ts: Sequence[Tensor]) -> list[Tensor]:
    """fp32 views/copies for the math (fp64 stays fp64, as in the reference)."""
    return [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in ts]


def _scaled(ts: list[Tensor], s: Scalar) -> list[Tensor]:
    """[s·t] for a number or a 0-dim tensor s (``_foreach_mul`` takes either)."""
    return torch._foreach_mul(ts, s)


def _write_back(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    for d, s in zip(dst, src):
        if d is not s:
            d.copy_(s)


@torch.no_grad()
def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta: Scalar, alpha: Scalar) -> None:
    if not fisher:
        return
    g = _fp32(grads)
    torch._foreach_mul_(fisher, beta)
    torch._foreach_add_(fisher, _scaled(torch._foreach_mul(g, g), alpha))


@torch.no_grad()
def global_norm(tensors: Sequence[Optional[Tensor]]) -> tuple[Tensor, Tensor]:
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.zeros(()), torch.zeros(())
    norms = torch._foreach_norm(_fp32(ts), 2)
    norm = torch.linalg.vector_norm(torch.stack(norms), 2)
    return norm, (~torch.isfinite(norm)).float()


@torch.no_grad()
def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale: Scalar,
             found_inf: Optional[Scalar] = None) -> None:
    if not params or _skip(found_inf):
        return
    theta = _fp32(params)
    torch._foreach_add_(theta, _scaled(_fp32(grads), scale))
    _write_back(params, theta)


@torch.no_grad()
def fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, *, lr, momentum, nesterov,
              weight_decay, eta_r, beta, mix, restore_scale, precondition, damping, step, next_pert_scale,
              found_inf) -> None:
    if not params or _skip(found_inf):
        return
    theta = _fp32(params)
    g = _fp32(grads)
    # 1. restore
    if pert is not None:
        torch._foreach_sub_(theta, pert)
    elif restore_scale is not None:
        torch._foreach_sub_(theta, _scaled(g, restore_scale))
    # 2. direction
    if grads_pert is not None:
        d = torch._foreach_sub(_fp32(grads_pert), g)
        torch._foreach_mul_(d, mix)
        torch._foreach_add_(d, g)
    else:
        d = torch._foreach_mul(g, 1.0)   # a copy in one multi-tensor op, not one clone per tensor
    idx = [i for i, f0 in enumerate(fisher0) if f0 is not None]
    if idx and eta_r != 0.0:
        diff = torch._foreach_sub([theta[i] for i in idx], _fp32([anchor[i] for i in idx]))
        torch._foreach_mul_(diff, _fp32([fisher0[i] for i in idx]))
        torch._foreach_add_([d[i] for i in idx], diff, alpha=eta_r)
    if weight_decay != 0.0:
        torch._foreach_add_(d, theta, alpha=weight_decay)
    # 3. Fisher EMA
    torch._foreach_mul_(fisher, beta)
    torch._foreach_add_(fisher, torch._foreach_mul(g, g), alpha=1.0 - beta)
    # 4. preconditioning, with each tensor's own bias correction 1 − β^t_i (fp32, as the reference)
    if precondition:
        den = torch._foreach_div(fisher, _bias_corrections(beta, step, len(params), fisher[0].device))
        torch._foreach_add_(den, damping)
        torch._foreach_div_(d, den)
    # 5. momentum and update
    torch._foreach_mul_(momentum_buf, momentum)
    torch._foreach_add_(momentum_buf, d)
    if nesterov:
        torch._foreach_add_(d, momentum_buf, alpha=momentum)
        u = d
    else:
        u = momentum_buf
    torch._foreach_sub_(theta, _scaled(u, lr))
    # 6. next lagged perturbation: stored only (the optimizer applies it at the next training forward).
    # zero + add rather than _foreach_copy_, which has no sharding rule for FSDP2's DTensors.
    if pert is not None:
        torch._foreach_zero_(pert)
        if next_pert_scale is not None:
            torch._foreach_add_(pert, _scaled(g, next_pert_scale))
    _write_back(params, theta)


def _bias_corrections(beta: float, step, n: int, device: torch.device) -> list[Tensor]:
    """[1 − β^t_i] as fp32 0-dim tensors on ``device``: ``step`` is one count for all tensors or one per tensor."""
    steps = list(step) if isinstance(step, (list, tuple)) else [step] * n
    # torch.full, not torch.tensor: no blocking host-to-device copy on accelerators
    t = torch.stack([s.to(device=device, dtype=torch.float32).reshape(()) if isinstance(s, Tensor)
                     else torch.full((), float(s), dtype=torch.float32, device=device) for s in steps])
    bc = 1.0 - torch.full((), beta, dtype=torch.float32, device=device) ** t
    return list(bc.unbind())


def spectral_weight(U, S, delta, Vh, residual=None, relative=False):
    from fip_fast.reference import spectral_weight as ref
    return ref(U, S, delta, Vh, residual, relative)


def spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative=False):
    from fip_fast.reference import spectral_linear_grad as ref
    return ref(x, grad_out, U, S, delta, Vh, relative)


@torch.no_grad()
def spectral_update_(weights, U, Vh, s_old, s_new, base=None) -> None:
    """W ← B + U·diag(s_new − s_old)·Vh (see :func:`fip_fast.reference.spectral_update_`) as ONE addmm per layer
    writing W directly where the weight and factors are fp32/fp64 and W is contiguous (no m×n temporary, W written
    once — on a GPU a cuBLAS GEMM with the base as its C operand); otherwise the reference form."""
    from fip_fast.reference import spectral_update_ as ref

    for i, W in enumerate(weights):
        B = W if base is None else base[i]
        fast = (W.dtype in (torch.float32, torch.float64) and W.is_contiguous() and B.dtype == W.dtype
                and U[i].dtype == W.dtype and Vh[i].dtype == W.dtype)
        if not fast:
            ref([W], [U[i]], [Vh[i]], [s_old[i]], [s_new[i]], None if base is None else [B])
            continue
        Us = U[i] * (s_new[i] - s_old[i]).to(W.dtype)          # (m, k): the columns of U scaled by Δs
        if B is W:
            W.addmm_(Us, Vh[i])
        else:
            torch.addmm(B, Us, Vh[i], out=W)
