"""The one dispatcher: every fused op of fip_fast is reached through here.

An *implementation* ("impl") is a backend module that provides the same functions with the same signatures as
the kernel-level ops of :mod:`fip_fast.reference` plus ``available(device) -> (ok, reason)``:

==============  ==================================  =====================================================
impl            module                              where it runs
==============  ==================================  =====================================================
``reference``   :mod:`fip_fast.reference`           anywhere; plain loops, the spec
``foreach``     :mod:`fip_fast.backends.foreach`            anywhere; ``torch._foreach_*`` (the fallback)
``triton``      :mod:`fip_fast.kernels`             CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``)
``cuda``        :mod:`fip_fast.backends.cuda`               CUDA tensors, when the C++/CUDA extension is built
``cpu``         :mod:`fip_fast.backends.cpu`                CPU fp32 tensors; fused C++ kernels compiled on first use
==============  ==================================  =====================================================

``impl="auto"`` picks, for the device of the tensors, the first available of ``cuda``, ``triton``, ``foreach``
(CUDA tensors), ``cpu``, ``foreach`` (CPU tensors: the fused C++ kernels when a compiler builds them, ~1 s once;
``FIP_FAST_CPU=0`` turns them off) or ``foreach`` (elsewhere).  Each fallback is logged once at INFO level with
its reason; asking explicitly for an unavailable impl raises :class:`ImplUnavailableError` naming what is missing
— never a silent fallback.

Usage::

    from fip_fast import ops
    fn = ops.get("fip_step_", impl="auto", device=p.device)
    fn(params, grads, ...)
"""
from __future__ import annotations

import importlib
import logging
from functools import lru_cache
from types import ModuleType
from typing import Callable

import torch

from fip_fast.backends import host

logger = logging.getLogger("fip_fast")

OPS = ("fisher_accumulate_", "global_norm", "perturb_", "fip_step_", "spectral_weight", "spectral_linear_grad",
       "spectral_update_")
IMPLS = ("reference", "foreach", "triton", "cuda", "cpu")
_MODULES = {
    "reference": "fip_fast.reference",
    "foreach": "fip_fast.backends.foreach",
    "triton": "fip_fast.kernels",
    "cuda": "fip_fast.backends.cuda",
    "cpu": "fip_fast.backends.cpu",
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "foreach"), "cpu": ("cpu", "foreach")}


class ImplUnavailableError(RuntimeError):
    """An implementation that was asked for by name cannot run here (the message says why)."""


@lru_cache(maxsize=None)
def _module(impl: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(_MODULES[impl]), ""
    except Exception as exc:  # ImportError, or a broken optional dependency
        return None, f"import of {_MODULES[impl]} failed: {type(exc).__name__}: {exc}"


def availability(impl: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(ok, reason) for running ``impl`` on tensors of ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {('auto',) + IMPLS}")
    if impl == "reference":
        return True, ""
    mod, reason = _module(impl)
    if mod is None:
        return False, reason
    check = getattr(mod, "available", None)
    return check(torch.device(device)) if check is not None else (True, "")


_logged: set[tuple[str, str]] = set()


def resolve(impl: str, device: torch.device | str = "cpu") -> str:
    """The concrete impl name for ``impl`` ("auto" or a name) on ``device``; raises if a named impl can't run."""
    device = torch.device(device)
    if impl != "auto":
        ok, reason = availability(impl, device)
        if not ok:
            raise ImplUnavailableError(f"impl={impl!r} is not available for {device.type} tensors: {reason}")
        return impl
    for cand in _AUTO_ORDER.get(device.type, ("foreach",)):
        ok, reason = availability(cand, device)
        if ok:
            return cand
        key = (device.type, cand)
        if key not in _logged:
            _logged.add(key)
            logger.info("fip_fast: impl=%r skipped for %s tensors: %s", cand, device.type, reason)
    return "foreach"


#: (op, impl, device) → (function, impl name) for impls asked for by name (an optimizer's resolved impl): the
#: dispatch of every fused call of a step, a dictionary lookup once the impl has been found available
_found: dict[tuple, tuple[Callable, str]] = {}


def _lookup(op: str, impl: str, device: torch.device | str) -> tuple[Callable, str]:
    """(the function implementing ``op``, the name of the impl it comes from)."""
    if impl != "auto":
        hit = _found.get((op, impl, device))
        if hit is not None:
            return hit
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    name = resolve(impl, device)
    mod = importlib.import_module(_MODULES[name]) if name == "reference" else _module(name)[0]
    fn = getattr(mod, op, None)
    if fn is None and impl == "auto":
        # an op some backends do not have (yet): "auto" takes the next one that has it, down to the reference
        for cand in _AUTO_ORDER.get(torch.device(device).type, ("foreach",)) + ("reference",):
            if availability(cand, device)[0]:
                m = importlib.import_module(_MODULES[cand]) if cand == "reference" else _module(cand)[0]
                fn = getattr(m, op, None)
                if fn is not None:
                    name = cand
                    break
    if fn is None:
        raise ImplUnavailableError(f"impl={name!r} does not implement {op!r}")
    if impl != "auto":
        _found[(op, impl, device)] = (fn, name)
    return fn, name


def get(op: str, impl: str = "auto", device: torch.device | str = "cpu") -> Callable:
    """The function implementing ``op`` with ``impl`` (resolved for ``device``)."""
    return _lookup(op, impl, device)[0]


#: backends whose list ops take ``cache_key`` (a hashable the caller guarantees determines every tensor of the
#: call: they then reuse the pointer table built for it, skipping their per-tensor checks; see fip_fast._plan)
_KEYED = frozenset({"cpu", "triton"})


def _keyed(name: str, cache_key) -> dict:
    return {} if cache_key is None or name not in _KEYED else {"cache_key": cache_key}


def fisher_accumulate_(fisher, grads, beta, alpha, *, impl: str = "auto", cache_key=None):
    """F ← β·F + α·g² for every tensor of the lists (see :func:`fip_fast.reference.fisher_accumulate_`)."""
    if fisher:
        fn, name = _lookup("fisher_accumulate_", impl, fisher[0].device)
        fn(fisher, grads, beta, alpha, **_keyed(name, cache_key))


def global_norm(tensors, *, impl: str = "auto", cache_key=None):
    """(global L2 norm, found_inf) as 0-dim fp32 tensors (see :func:`fip_fast.reference.global_norm`)."""
    first = tensors[0] if tensors else None     # (the common case without a scan)
    dev = first.device if first is not None else next((t.device for t in tensors if t is not None),
                                                      torch.device("cpu"))
    fn, name = _lookup("global_norm", impl, dev)
    return fn(tensors, **_keyed(name, cache_key))


def _bump_versions(params, name: str) -> None:
    """Kernels that write through raw pointers (Triton, CUDA, the C++ CPU kernels) do not advance the tensors'
    version counters; advance them, so that autograd's checks and version-based caches (Fast FIP's in-place weight
    sync, which re-derives W when δ._version changes) see the write.  A no-op for the torch-op implementations."""
    if name in ("triton", "cuda", "cpu"):
        host.bump_versions(params if type(params) is list else list(params))


def perturb_(params, grads, scale, found_inf=None, *, impl: str = "auto", cache_key=None):
    """θ ← θ + scale·g unless found_inf (see :func:`fip_fast.reference.perturb_`)."""
    if params:
        fn, name = _lookup("perturb_", impl, params[0].device)
        fn(params, grads, scale, found_inf, **_keyed(name, cache_key))
        _bump_versions(params, name)


def fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, *, impl: str = "auto",
              cache_key=None, **hyper):
    """The fused optimizer step (see :func:`fip_fast.reference.fip_step_` for the contract).  ``cache_key``: see
    :data:`_KEYED` (ignored by backends without tables)."""
    if params:
        fn, name = _lookup("fip_step_", impl, params[0].device)
        fn(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, **hyper,
           **_keyed(name, cache_key))
        _bump_versions(params, name)


def spectral_weight(U, S, delta, Vh, residual=None, relative=False, *, impl: str = "auto"):
    """W(δ) (see :func:`fip_fast.reference.spectral_weight`)."""
    return get("spectral_weight", impl, U.device)(U, S, delta, Vh, residual, relative)


def spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative=False, *, impl: str = "auto"):
    """(δ-gradient, per-sample squared δ-gradients) (see :func:`fip_fast.reference.spectral_linear_grad`)."""
    return get("spectral_linear_grad", impl, U.device)(x, grad_out, U, S, delta, Vh, relative)


def spectral_update_(weights, U, Vh, s_old, s_new, base=None, *, impl: str = "auto"):
    """W ← (base or W) + U·diag(s_new − s_old)·Vh for every layer (see :func:`fip_fast.reference.spectral_update_`)."""
    if weights:
        get("spectral_update_", impl, weights[0].device)(weights, U, Vh, s_old, s_new, base)
