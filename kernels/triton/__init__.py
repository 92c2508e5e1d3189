"""Triton kernels of fip_fast (``impl="triton"``), installed as ``fip_fast.kernels``.

The sources live in ``kernels/triton/`` at the repository root, beside ``csrc/``; ``kernels/`` itself has no
``__init__.py``.  A ``kernels`` package at the root would be importable as the top-level module ``kernels`` from
there and shadow Hugging Face's ``kernels`` package, which transformers 5 imports.

Reached through :mod:`fip_fast.ops` (``ops.get(op, impl="triton", device)``), or directly.  The seven ops
have exactly the signatures of the kernel-level ops of :mod:`fip_fast.reference`:

* :func:`fisher_accumulate_` F ← β·F + α·g²                                    (:mod:`.fisher`)
* :func:`global_norm`        (‖[g_1 … g_n]‖₂, found_inf)                         (:mod:`.fip_step`)
* :func:`perturb_`           θ ← θ + scale·g                                     (:mod:`.fip_step`)
* :func:`fip_step_`          the whole FIP optimizer step, restore included      (:mod:`.fip_step`)
* :func:`spectral_weight`    W(δ) = U·diag(relu(s))·Vh (+ residual)              (:mod:`.spectral`)
* :func:`spectral_linear_grad` δ-gradient and per-sample squared δ-gradients   (:mod:`.spectral`)
* :func:`spectral_update_`   W ← B + U·diag(s_new − s_old)·Vh in place           (torch's GEMM, no Triton kernel)

The list ops make one Triton launch per call over every tensor of their lists, whatever the mix of fp32 /
fp16 / bf16 (:mod:`.multi_tensor`); :mod:`._launch_count` counts launches.  Under ``torch.compile`` the calls
go through ``torch.library`` custom ops with fake implementations (:mod:`.library`).

Where they run: CUDA tensors; CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set
before ``triton`` is imported — slow, ~2 ms per program, meant for tests).  Triton ≥ 3.2 is required (3.0.0
computes wrong results in interpreter mode).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["available", "fisher_accumulate_", "global_norm", "perturb_", "fip_step_", "spectral_weight",
           "spectral_linear_grad", "spectral_update_"]

_MIN_TRITON = (3, 2)

try:
    import triton as _triton
    _IMPORT_ERROR = ""
except Exception as exc:  # not installed, or a broken install
    _triton = None
    _IMPORT_ERROR = f"import triton failed: {type(exc).__name__}: {exc}"


def _triton_version() -> tuple[int, ...]:
    parts = []
    for p in _triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _triton is not None and _triton_version() < _MIN_TRITON:
    _IMPORT_ERROR = f"triton {_triton.__version__} is too old: need >= 3.2 (3.0.0 gives wrong results)"

if not _IMPORT_ERROR:
    if os.environ.get("TRITON_INTERPRET") == "1":
        from . import _interpreter_compat
        _interpreter_compat.apply()
        _interpreter_compat.apply_fast_nested_calls()
        _interpreter_compat.apply_comparison_dtype()
    from . import fip_step as _fs
    from . import fisher as _fi
    from . import library as _lib
    from . import spectral as _sp


def _interpreted() -> bool:
    """Whether this module's kernels were built by the interpreter (TRITON_INTERPRET=1 at import time)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_fs._fip_step_kernel, InterpretedFunction)


def available(device) -> tuple[bool, str]:
    """(ok, reason): can these kernels run on tensors of ``device``?

    CUDA devices: yes when triton (≥ 3.2) imports and torch sees a GPU.  CPU: only under the interpreter,
    ``TRITON_INTERPRET=1`` in the environment before triton was imported.  Anything else: no."""
    device = torch.device(device)
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if device.type == "cuda":
        if _interpreted():
            return False, "TRITON_INTERPRET=1 is set: the kernels were built for the interpreter (CPU tensors)"
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, ("CPU tensors run only under the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before importing triton")
        if not _interpreted():
            return False, "TRITON_INTERPRET=1 was set after triton compiled the kernels; set it before importing triton"
        return True, ""
    return False, f"no Triton backend for {device.type} tensors"


# ``cache_key`` (the list ops): a hashable the caller guarantees determines every tensor of the call (see
# fip_fast._plan); its pointer table is then looked up by the key alone.  Ignored while compiling (the torch.library
# ops take no key).


def _compiling() -> bool:
    return _lib.AVAILABLE and torch.compiler.is_compiling()


def _need_triton() -> None:
    if _IMPORT_ERROR:
        raise RuntimeError(f"fip_fast.kernels cannot run: {_IMPORT_ERROR}")


def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta, alpha, cache_key=None) -> None:
    """F ← β·F + α·g² (see :func:`fip_fast.kernels.fisher.fisher_accumulate_`)."""
    _need_triton()
    if _compiling():
        return _lib.fisher_accumulate_op(list(fisher), list(grads), *_lib.split_scalar(beta),
                                         *_lib.split_scalar(alpha))
    return _fi.fisher_accumulate_(fisher, grads, beta, alpha, cache_key=cache_key)


def global_norm(tensors: Sequence[Optional[Tensor]], cache_key=None) -> tuple[Tensor, Tensor]:
    """(‖concat(tensors)‖₂, found_inf) (see :func:`fip_fast.kernels.fip_step.global_norm`)."""
    _need_triton()
    if _compiling():
        return _lib.global_norm_op(list(tensors))
    return _fs.global_norm(tensors, cache_key=cache_key)


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale, found_inf=None, cache_key=None) -> None:
    """θ ← θ + scale·g unless found_inf (see :func:`fip_fast.kernels.fip_step.perturb_`)."""
    _need_triton()
    if _compiling():
        return _lib.perturb_op(list(params), list(grads), *_lib.split_scalar(scale), *_lib.split_scalar(found_inf))
    return _fs.perturb_(params, grads, scale, found_inf, cache_key=cache_key)


def fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, *, lr, momentum, nesterov,
              weight_decay, eta_r, beta, mix, restore_scale, precondition, damping, step, next_pert_scale,
              found_inf, cache_key=None) -> None:
    """The fused FIP step (see :func:`fip_fast.kernels.fip_step.fip_step_` and
    :func:`fip_fast.reference.fip_step_` for the contract)."""
    _need_triton()
    if _compiling():
        s = _lib.split_scalar
        return _lib.fip_step_op(
            list(params), list(grads), list(grads_pert or []), list(fisher0), list(anchor), list(momentum_buf),
            list(fisher), list(pert or []), *s(lr), float(momentum), bool(nesterov), float(weight_decay),
            float(eta_r), float(beta), *s(mix), *s(restore_scale), bool(precondition), float(damping),
            *_lib.split_step(step), *s(next_pert_scale), *s(found_inf))
    return _fs.fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, lr=lr,
                         momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta_r=eta_r, beta=beta,
                         mix=mix, restore_scale=restore_scale, precondition=precondition, damping=damping,
                         step=step, next_pert_scale=next_pert_scale, found_inf=found_inf, cache_key=cache_key)


def spectral_weight(U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor, residual: Optional[Tensor] = None,
                    relative: bool = False) -> Tensor:
    """W(δ) = U·diag(relu(s))·Vh (+ residual) (see :func:`fip_fast.kernels.spectral.spectral_weight`)."""
    _need_triton()
    if _compiling():
        return _lib.spectral_weight_op(U, S, delta, Vh, residual, bool(relative))
    return _sp.spectral_weight(U, S, delta, Vh, residual, relative)


def spectral_linear_grad(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor,
                         relative: bool = False) -> tuple[Tensor, Tensor]:
    """(grad_delta (r,), per_sample_sq (N, r)) (see :func:`fip_fast.kernels.spectral.spectral_linear_grad`)."""
    _need_triton()
    if _compiling():
        return _lib.spectral_linear_grad_op(x, grad_out, U, S, delta, Vh, bool(relative))
    return _sp.spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative)


def spectral_update_(weights: Sequence[Tensor], U: Sequence[Tensor], Vh: Sequence[Tensor], s_old: Sequence[Tensor],
                     s_new: Sequence[Tensor], base: Optional[Sequence[Tensor]] = None) -> None:
    """W ← B + U·diag(s_new − s_old)·Vh per layer, in place (:func:`fip_fast.reference.spectral_update_`; Fast FIP in
    place): one torch ``addmm`` per layer (cuBLAS on a GPU), the foreach backend's form — the update is a GEMM, so
    no Triton kernel.  Shapes: ``weights[i]``, ``base[i]`` (m, n), ``U[i]`` (m, k), ``Vh[i]`` (k, n), ``s_old[i]``,
    ``s_new[i]`` (k,)."""
    from fip_fast.backends import foreach

    foreach.spectral_update_(weights, U, Vh, s_old, s_new, base)
