"""``impl="cpu"``: fused C++ kernels for CPU fp32 tensors — one pass over memory per tensor and op.

The :mod:`~fip_fast.backends.foreach` backend makes one full pass over memory per elementary op (a dozen for the
optimizer step); these kernels read and write every element once.  The source, ``csrc/cpu/fip_cpu.cpp``, is
plain C++ with ``extern "C"`` functions on raw pointers (no torch headers): it is compiled on first use with the
system C++ compiler (about a second), cached, and loaded with :mod:`ctypes`.

Cache: ``$FIP_FAST_CPU_CACHE`` or ``~/.cache/fip_fast`` (``$XDG_CACHE_HOME/fip_fast``), one ``.so`` per hash of
source + compiler + flags + host CPU (``-march=native``); built under a unique temporary name and renamed
atomically into place, so concurrent first uses never see a partial library.  ``impl="auto"`` takes these kernels
for CPU tensors when they build, else foreach (logged once at INFO with the reason).  Environment:

* ``FIP_FAST_CPU=0`` — never build or use the kernels (``impl="auto"`` then takes foreach on the CPU).
* ``FIP_FAST_CPU_CACHE=DIR`` — the cache directory.
* ``FIP_FAST_CXX=g++`` — the compiler (default: ``$CXX``, else ``g++``, else ``c++``, else ``clang++``).
* ``FIP_FAST_CSRC=DIR`` — where ``csrc/`` is (default: beside the package in a source checkout, else the copy a
  wheel installs as ``fip_fast/_csrc_cpu/``).

What the kernels take: CPU tensors, all fp32, each tensor of a call either contiguous or sharing the dense
non-overlapping layout of its parameter.  Anything else (fp16/bf16/fp64, mixed layouts, other devices) goes to the
foreach backend for that call, logged once at INFO level.  Scalars may be Python numbers or 0-dim tensors (read
with ``.item()``: free on the CPU).  Results equal :mod:`fip_fast.reference` bit for bit on fp32 (same fp32
operations in the same order, no FMA contraction), except :func:`global_norm`, which sums 4096-element blocks in
fp32 lanes and the blocks in fp64 (eight parts of a tensor read side by side, for memory-level parallelism).
Threads: ``torch.get_num_threads()`` (OpenMP inside each tensor of ≥ 64 Ki elements).

Importing this module never fails; :func:`available` says why the kernels can't be used.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from fip_fast._utils import is_dense
from fip_fast.backends import _cxx
from fip_fast.backends import foreach as _fe

logger = logging.getLogger("fip_fast")

SOURCE_NAME = "fip_cpu.cpp"
ABI_VERSION = 2
#: -ffp-contract=off: no FMA contraction (the reference rounds every multiply and add);  -fno-trapping-math and
#: -fno-unswitch-loops: the step's loop-invariant selects are if-converted and vectorized instead of unswitched into
#: 16 copies per variant (the build takes under a second instead of three); neither changes a result bit.
CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
            "-fno-unswitch-loops", "-shared", "-fPIC", "-std=c++17")

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
#: seconds the first-use build took (0.0 when the cached library was loaded), for reports
build_seconds: Optional[float] = None

_c_float, _c_int, _c_i64, _c_vp = ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library; raises RuntimeError with the reason."""
    global build_seconds
    so, build_seconds = _cxx.compile_cached(_cxx.source_path(SOURCE_NAME), "fip_cpu", CXXFLAGS, _cxx.host_id())
    if build_seconds:
        logger.info("fip_fast: built the CPU kernels in %.1f s (%s)", build_seconds, so)
    lib = ctypes.CDLL(str(so))
    if lib.fip_cpu_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{so} has ABI {lib.fip_cpu_abi_version()}, expected {ABI_VERSION}")
    # the multi-tensor entry points (one call per list); the single-tensor ones are what they loop over
    tab = [_c_vp, _c_vp, _c_i64]       # pointer table, sizes, number of tensors
    lib.fisher_accumulate_multi_f32.argtypes = tab + [_c_float, _c_float, _c_int]
    lib.fisher_accumulate_multi_f32.restype = None
    lib.perturb_multi_f32.argtypes = tab + [_c_float, _c_int]
    lib.perturb_multi_f32.restype = None
    lib.sumsq_multi_f32.argtypes = tab + [_c_int]
    lib.sumsq_multi_f32.restype = ctypes.c_double
    lib.fip_step_multi_f32.argtypes = tab + [_c_vp, _c_float, _c_float, _c_int, _c_float, _c_float, _c_float,
                                             _c_float, _c_float, _c_int, _c_float, _c_int, _c_float, _c_float,
                                             _c_float, _c_int, _c_int]
    lib.fip_step_multi_f32.restype = None
    return lib


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                if os.environ.get("FIP_FAST_CPU", "1") == "0":
                    raise RuntimeError("disabled by FIP_FAST_CPU=0")
                _lib = _build()
            except Exception as exc:
                _error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
                logger.info("fip_fast: impl='cpu' unavailable: %s", _error)
    return _lib


def available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the fused C++ kernels run on CPU tensors only, not {device.type}"
    if _load() is None:
        return False, _error or "unknown build error"
    return True, ""


# ------------------------------------------------------------------------------------------------ eligibility
_logged: set[str] = set()


def _fallback(op: str, reason: str) -> None:
    key = f"{op}: {reason}"
    if key not in _logged:
        _logged.add(key)
        logger.info("fip_fast: impl='cpu' %s falls back to foreach for this call: %s", op, reason)


_PLAIN = (Tensor, torch.nn.Parameter)


def _why_not(groups: Sequence[Sequence[Optional[Tensor]]]) -> Optional[str]:
    """None when every tensor can go to the kernels; else the reason.  ``groups[j][i]``: tensor i of list j,
    ``groups[0]`` the parameters (the layout reference)."""
    n = len(groups[0])
    for j, lst in enumerate(groups):
        if len(lst) != n:
            return "lists of different lengths"
    for i in range(n):
        ref = groups[0][i]
        if ref is None:
            return "a None entry"
        for lst in groups:
            t = lst[i]
            if t is None:
                continue
            if type(t) not in _PLAIN:   # DTensor (FSDP2), other subclasses: their data_ptr is not the elements
                return f"a tensor subclass ({type(t).__name__})"
            if t.device.type != "cpu":
                return f"a {t.device.type} tensor"
            if t.dtype != torch.float32:
                return f"a {t.dtype} tensor (the kernels take fp32)"
            if t.shape != ref.shape:
                return "tensors of different shapes"
            if not t.is_contiguous() or not ref.is_contiguous():
                if t.stride() != ref.stride() or not is_dense(t):
                    return "a non-dense tensor or layouts that differ within a pair"
    return None


def _f(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


def _skip(found_inf) -> bool:
    return found_inf is not None and _f(found_inf) != 0.0


# ------------------------------------------------------------------------------------------------ pointer tables
class _Table:
    """The ctypes arguments of one multi-tensor call: a slot-major pointer table (tensor i of slot s at
    ``s·n + i``; null where a slot or an entry is absent) and the element counts.  It holds no reference to the
    tensors (a cached table must not keep gradients alive), only their addresses: a caller may reuse a
    ``cache_key`` only while every tensor of its stable part still has its elements where they were when the
    table was built — FIP's plans check that before every step and take a new uid when one moved (``p.data = …``,
    ``share_memory_()``), see fip_fast._plan."""

    __slots__ = ("ptrs", "sizes", "n", "moving", "contiguous")

    def __init__(self, slots: Sequence[Optional[Sequence[Optional[Tensor]]]], moving: tuple = ()) -> None:
        n = len(slots[0])
        flat = [None if lst is None or t is None else t.data_ptr() for lst in slots for t in (lst or [None] * n)]
        self.ptrs = (_c_vp * len(flat))(*flat)
        self.sizes = (_c_i64 * n)(*[t.numel() for t in slots[0]])
        self.n = n
        self.moving = moving          # the pointers of the moving slots it holds (see _table)
        self.contiguous = all(t.is_contiguous() for t in slots[0])


#: tables of calls made with a ``cache_key`` (LRU)
_tables: "OrderedDict[tuple, _Table]" = OrderedDict()
CACHE_SIZE = 64


def _moved_ok(ts: Sequence[Optional[Tensor]]) -> bool:
    """Whether tensors that replaced the cached ones of a moving slot can be patched in without the full check:
    plain contiguous fp32 (size and device are enforced by torch for a gradient; the parameters are contiguous)."""
    f32 = torch.float32
    return all(t is None or (type(t) in _PLAIN and t.dtype == f32 and t.is_contiguous()) for t in ts)


def _table(op: str, cache_key, slots, moving_slots: tuple[int, ...], reason) -> tuple[Optional[_Table], str]:
    """(the table of this call, '') or (None, why the kernels can't take it).  ``slots``: the lists, or a
    function returning them (built only when needed); ``reason()``: None when the kernels can take them.

    ``cache_key`` (None: check and build every time): ``(stable, moving)`` — ``stable`` a hashable the caller
    guarantees determines every tensor of the call and its address, except those of ``moving_slots`` (FIP: its
    plan's uid, replaced when a parameter or state tensor moves), and
    ``moving`` one tuple of ``data_ptr`` per slot of ``moving_slots`` (the gradients, which may be new tensors every
    step).  A cached table whose moving pointers differ is patched after a cheap check of the new tensors only."""
    if cache_key is None:
        why = reason()
        return (None, why) if why else (_Table(slots() if callable(slots) else slots), "")
    stable, moving = cache_key
    key = (op, stable)
    tab = _tables.get(key)
    if tab is not None:
        _tables.move_to_end(key)
        if tab.moving == moving:
            return tab, ""
        changed = [(s, new) for s, old, new in zip(moving_slots, tab.moving, moving) if old != new]
        slots = slots() if callable(slots) else slots
        if tab.contiguous and all(slots[s] is not None and _moved_ok(slots[s]) for s, _ in changed):
            n = tab.n
            for s, new in changed:
                tab.ptrs[s * n:(s + 1) * n] = new
            tab.moving = moving
            return tab, ""
    why = reason()
    if why:
        return None, why
    tab = _tables[key] = _Table(slots() if callable(slots) else slots, moving)
    if len(_tables) > CACHE_SIZE:
        _tables.popitem(last=False)
    return tab, ""


def clear_cache() -> None:
    """Drop every cached pointer table (tests)."""
    _tables.clear()


# ------------------------------------------------------------------------------------------------ the ops
# ``cache_key`` (every op): see _table — FIP passes one per step plan; None checks and builds every time.
# No torch.no_grad() here: the kernels write through raw pointers, which autograd never sees (the foreach
# fallbacks carry their own), and the decorator would cost microseconds per call.

def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta, alpha, cache_key=None) -> None:
    if not fisher:
        return
    lib = _load()
    tab, why = _table("fisher", cache_key, [fisher, grads], (1,), lambda: _why_not([fisher, grads]))
    if tab is None or lib is None:
        _fallback("fisher_accumulate_", why or _error or "")
        return _fe.fisher_accumulate_(fisher, grads, beta, alpha)
    lib.fisher_accumulate_multi_f32(tab.ptrs, tab.sizes, tab.n, _f(beta), _f(alpha), _nthreads())


def _norm_reason(ts: Sequence[Optional[Tensor]]) -> Optional[str]:
    for t in ts:
        if t is None:
            return "a None entry (filtered by global_norm without a cache key)"
        if type(t) not in _PLAIN:
            return f"a tensor subclass ({type(t).__name__})"
        if t.device.type != "cpu" or t.dtype != torch.float32 or not is_dense(t):
            return f"a {t.device.type} {t.dtype} tensor" + ("" if is_dense(t) else " (not dense)")
    return None


def global_norm(tensors: Sequence[Optional[Tensor]], cache_key=None) -> tuple[Tensor, Tensor]:
    lib = _load()
    ts = tensors if cache_key is not None else [t for t in tensors if t is not None]
    if not ts:
        return torch.zeros(()), torch.zeros(())
    tab, why = _table("norm", cache_key, [ts], (0,), lambda: _norm_reason(ts))
    if tab is None or lib is None:
        _fallback("global_norm", why or _error or "")
        return _fe.global_norm(tensors)
    sq = lib.sumsq_multi_f32(tab.ptrs, tab.sizes, tab.n, _nthreads())
    # the reference sums the squares in fp32: a sum beyond the fp32 range is +inf there, hence non-finite
    if math.isfinite(sq) and sq > 3.4028234663852886e38:
        sq = math.inf
    norm = math.sqrt(sq) if sq == sq else math.nan
    return torch.scalar_tensor(norm), torch.scalar_tensor(float(not math.isfinite(norm)))


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale, found_inf=None, cache_key=None) -> None:
    if not params or _skip(found_inf):
        return
    lib = _load()
    tab, why = _table("perturb", cache_key, [params, grads], (1,), lambda: _why_not([params, grads]))
    if tab is None or lib is None:
        _fallback("perturb_", why or _error or "")
        return _fe.perturb_(params, grads, scale, None)
    lib.perturb_multi_f32(tab.ptrs, tab.sizes, tab.n, _f(scale), _nthreads())


_bc_cache: dict[tuple[float, float], float] = {}


def _bias_correction(beta: float, t: float) -> float:
    """1 − β^t as the reference computes it (fp32 tensors), as a Python float holding that fp32 value."""
    key = (beta, t)
    bc = _bc_cache.get(key)
    if bc is None:
        bc = float(1.0 - torch.tensor(beta, dtype=torch.float32) ** torch.tensor(t, dtype=torch.float32))
        if len(_bc_cache) > 100_000:
            _bc_cache.clear()
        _bc_cache[key] = bc
    return bc


def _step_reason(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, use_anchor
                 ) -> Optional[str]:
    """None when the step's tensors can go to the kernels, else why not."""
    groups = [params, grads, momentum_buf, fisher]
    if grads_pert is not None:
        groups.append(grads_pert)
    if pert is not None:
        groups.append(pert)
    if use_anchor:
        if len(fisher0) != len(params) or len(anchor) != len(params):
            return "lists of different lengths"
        if any(f0 is not None and a is None for f0, a in zip(fisher0, anchor)):
            return "an anchor missing where F0 is given"
        groups += [fisher0, [a if f0 is not None else None for f0, a in zip(fisher0, anchor)]]
    return _why_not(groups)


def _step_slots(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, use_anchor) -> list:
    if use_anchor:
        f0s = list(fisher0)
        a0s = [a if f0 is not None else None for f0, a in zip(fisher0, anchor)]
    else:
        f0s = a0s = None
    return [params, grads, grads_pert, f0s, a0s, momentum_buf, fisher, pert]


def fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, *, lr, momentum, nesterov,
              weight_decay, eta_r, beta, mix, restore_scale, precondition, damping, step, next_pert_scale,
              found_inf, cache_key=None) -> None:
    if not params or _skip(found_inf):
        return
    use_anchor = eta_r != 0.0
    lib = _load()
    lists = (params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, use_anchor)
    op = f"step{int(use_anchor)}{int(grads_pert is None)}{int(pert is None)}"     # which slots are present
    tab, why = _table(op, cache_key, lambda: _step_slots(*lists), (1, 2), lambda: _step_reason(*lists))
    if tab is None or lib is None:
        _fallback("fip_step_", why or _error or "")
        return _fe.fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, lr=lr,
                             momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta_r=eta_r,
                             beta=beta, mix=mix, restore_scale=restore_scale, precondition=precondition,
                             damping=damping, step=step, next_pert_scale=next_pert_scale, found_inf=None)
    has_rs = restore_scale is not None and pert is None
    beta_ = float(beta)
    bcs = None
    if precondition:
        steps = [_f(t) for t in step] if isinstance(step, (list, tuple)) else [_f(step)] * len(params)
        bcs = (_c_float * len(steps))(*[_bias_correction(beta_, t) for t in steps])
    lib.fip_step_multi_f32(
        tab.ptrs, tab.sizes, tab.n, bcs, _f(lr), float(momentum), int(bool(nesterov)), float(weight_decay),
        float(eta_r), beta_, 1.0 - beta_, _f(mix) if grads_pert is not None else 0.0, int(has_rs),
        _f(restore_scale) if has_rs else 0.0, int(bool(precondition)), 1.0, float(damping),
        0.0 if next_pert_scale is None else _f(next_pert_scale), int(weight_decay != 0.0), _nthreads())


def spectral_weight(U, S, delta, Vh, residual=None, relative=False):
    return _fe.spectral_weight(U, S, delta, Vh, residual, relative)


def spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative=False):
    return _fe.spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative)


def spectral_update_(weights, U, Vh, s_old, s_new, base=None) -> None:
    """W ← B + U·diag(s_new − s_old)·Vh per layer, in place (:func:`fip_fast.reference.spectral_update_`; Fast FIP
    in place, :func:`fip_fast.spectral.reparameterize`): one torch ``addmm`` per layer writing W with the base as
    its C operand (the foreach backend's form; the reference's where W is not contiguous or dtypes differ).  The
    update is a GEMM, which the BLAS behind torch runs at its peak; the fused kernels of this module are for
    elementwise list ops, so this op has no C++ kernel of its own.  Shapes: ``weights[i]``, ``base[i]`` (m, n),
    ``U[i]`` (m, k), ``Vh[i]`` (k, n), ``s_old[i]``, ``s_new[i]`` (k,)."""
    _fe.spectral_update_(weights, U, Vh, s_old, s_new, base)
