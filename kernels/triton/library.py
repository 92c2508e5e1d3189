"""The Triton kernels as ``torch.library`` custom ops, with fake (meta) implementations for ``torch.compile``.

Ops (namespace ``fip_fast_triton``; the CUDA extension may register its own namespace, so there is no clash):

=============================  ========================================================================
op                             schema notes
=============================  ========================================================================
``fisher_accumulate_``         mutates ``fisher``
``global_norm``                returns (norm, found_inf), new 0-dim fp32 tensors
``perturb_``                   mutates ``params``
``fip_step_``                  mutates ``params``, ``momentum_buf``, ``fisher``, ``pert``; ``step`` is
                               ``step_v`` / ``step_t`` (one count) or ``step_list`` (one per tensor)
``spectral_weight``            returns W (m, n) in U's dtype
``spectral_linear_grad``       returns (grad_delta (r,), per_sample_sq (N, r)) fp32
=============================  ========================================================================

A schema cannot say "a float or a tensor" or "an optional list", so each scalar ``x`` of the Python API
becomes a pair ``x_v: float?`` / ``x_t: Tensor?`` (at most one given) and an absent list (``grads_pert``,
``pert`` = None) is an empty list (unambiguous: the ops return early on an empty ``params``).  The public
functions of :mod:`fip_fast.kernels` call these ops only while ``torch.compile`` traces
(:func:`torch.compiler.is_compiling`); eagerly they call the launchers directly, which saves the custom-op
dispatch (~10 µs) per call.  Requires torch ≥ 2.4 (``torch.library.custom_op``); on older torch
:data:`AVAILABLE` is False and the eager path is unaffected.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import fip_step as _fs
from . import fisher as _fi
from . import spectral as _sp

NAMESPACE = "fip_fast_triton"
AVAILABLE = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


def split_scalar(x) -> tuple[Optional[float], Optional[Tensor]]:
    """A Python-API scalar (None, number or tensor) as the (value, tensor) pair of the op schemas."""
    if x is None:
        return None, None
    if isinstance(x, Tensor):
        return None, x
    return float(x), None


def _join(v: Optional[float], t: Optional[Tensor]):
    return t if t is not None else v


def split_step(step) -> tuple[Optional[float], Optional[Tensor], List[Tensor]]:
    """``fip_step_``'s ``step`` as the schema's (step_v, step_t, step_list): one count (number or tensor), or a
    sequence of per-tensor counts as ``step_list`` (numbers in it become fp32 CPU tensors, i.e. host values)."""
    if isinstance(step, (list, tuple)):
        return None, None, [s if isinstance(s, Tensor) else torch.tensor(float(s), dtype=torch.float32)
                            for s in step]
    v, t = split_scalar(step)
    return v, t, []


if AVAILABLE:
    @torch.library.custom_op(f"{NAMESPACE}::fisher_accumulate_", mutates_args=("fisher",))
    def fisher_accumulate_op(fisher: List[Tensor], grads: List[Tensor], beta_v: Optional[float],
                             beta_t: Optional[Tensor], alpha_v: Optional[float], alpha_t: Optional[Tensor]) -> None:
        _fi.fisher_accumulate_(fisher, grads, _join(beta_v, beta_t), _join(alpha_v, alpha_t))

    @fisher_accumulate_op.register_fake
    def _(fisher, grads, beta_v, beta_t, alpha_v, alpha_t) -> None:
        return None

    @torch.library.custom_op(f"{NAMESPACE}::global_norm", mutates_args=())
    def global_norm_op(tensors: List[Optional[Tensor]]) -> Tuple[Tensor, Tensor]:
        return _fs.global_norm(tensors)

    @global_norm_op.register_fake
    def _(tensors):
        dev = next((t.device for t in tensors if t is not None), torch.device("cpu"))
        return (torch.empty((), dtype=torch.float32, device=dev), torch.empty((), dtype=torch.float32, device=dev))

    @torch.library.custom_op(f"{NAMESPACE}::perturb_", mutates_args=("params",))
    def perturb_op(params: List[Tensor], grads: List[Tensor], scale_v: Optional[float], scale_t: Optional[Tensor],
                   found_inf_v: Optional[float], found_inf_t: Optional[Tensor]) -> None:
        _fs.perturb_(params, grads, _join(scale_v, scale_t), _join(found_inf_v, found_inf_t))

    @perturb_op.register_fake
    def _(params, grads, scale_v, scale_t, found_inf_v, found_inf_t) -> None:
        return None

    @torch.library.custom_op(f"{NAMESPACE}::fip_step_", mutates_args=("params", "momentum_buf", "fisher", "pert"))
    def fip_step_op(
        params: List[Tensor], grads: List[Tensor], grads_pert: List[Tensor], fisher0: List[Optional[Tensor]],
        anchor: List[Optional[Tensor]], momentum_buf: List[Tensor], fisher: List[Tensor], pert: List[Tensor],
        lr_v: Optional[float], lr_t: Optional[Tensor], momentum: float, nesterov: bool, weight_decay: float,
        eta_r: float, beta: float, mix_v: Optional[float], mix_t: Optional[Tensor], restore_scale_v: Optional[float],
        restore_scale_t: Optional[Tensor], precondition: bool, damping: float, step_v: Optional[float],
        step_t: Optional[Tensor], step_list: List[Tensor], next_pert_scale_v: Optional[float],
        next_pert_scale_t: Optional[Tensor], found_inf_v: Optional[float], found_inf_t: Optional[Tensor],
    ) -> None:
        _fs.fip_step_(
            params, grads, grads_pert if grads_pert else None, fisher0, anchor, momentum_buf, fisher,
            pert if pert else None, lr=_join(lr_v, lr_t), momentum=momentum, nesterov=nesterov,
            weight_decay=weight_decay, eta_r=eta_r, beta=beta, mix=_join(mix_v, mix_t),
            restore_scale=_join(restore_scale_v, restore_scale_t), precondition=precondition, damping=damping,
            step=list(step_list) if step_list else _join(step_v, step_t),
            next_pert_scale=_join(next_pert_scale_v, next_pert_scale_t),
            found_inf=_join(found_inf_v, found_inf_t))

    @fip_step_op.register_fake
    def _(*args, **kwargs) -> None:
        return None

    @torch.library.custom_op(f"{NAMESPACE}::spectral_weight", mutates_args=())
    def spectral_weight_op(U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor, residual: Optional[Tensor],
                           relative: bool) -> Tensor:
        return _sp.spectral_weight(U, S, delta, Vh, residual, relative)

    @spectral_weight_op.register_fake
    def _(U, S, delta, Vh, residual, relative):
        return U.new_empty((U.shape[0], Vh.shape[1]))

    @torch.library.custom_op(f"{NAMESPACE}::spectral_linear_grad", mutates_args=())
    def spectral_linear_grad_op(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor,
                                relative: bool) -> Tuple[Tensor, Tensor]:
        return _sp.spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative)

    @spectral_linear_grad_op.register_fake
    def _(x, grad_out, U, S, delta, Vh, relative):
        r = S.shape[0]
        return (x.new_empty((r,), dtype=torch.float32), x.new_empty((x.shape[0], r), dtype=torch.float32))
