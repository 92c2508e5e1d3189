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
fp32 lanes and the blocks in fp64.
Threads: ``torch.get_num_threads()`` (OpenMP inside each tensor of ≥ 64 Ki elements).

Importing this module never fails; :func:`available` says why the kernels can't be used.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from fip_fast._utils import is_dense
from fip_fast.backends import foreach as _fe

logger = logging.getLogger("fip_fast")

SOURCE_NAME = "fip_cpu.cpp"
ABI_VERSION = 1
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


def _source_path() -> Path:
    """$FIP_FAST_CSRC/cpu, else csrc/cpu beside the package (source checkout, editable install), else the copy
    installed as package data (fip_fast/_csrc_cpu/, a wheel)."""
    env = os.environ.get("FIP_FAST_CSRC")
    if env:
        return Path(env) / "cpu" / SOURCE_NAME
    here = Path(__file__).resolve().parents[1]
    checkout = here.parent / "csrc" / "cpu" / SOURCE_NAME
    installed = here / "_csrc_cpu" / SOURCE_NAME
    return checkout if checkout.is_file() or not installed.is_file() else installed


def _cache_dir() -> Path:
    env = os.environ.get("FIP_FAST_CPU_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fip_fast"


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("FIP_FAST_CXX"), os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _tail(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def _compiler_id(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return cxx


def _host_id() -> str:
    """The CPU the library is built for (``-march=native``): a cache shared between machines must not mix them."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        ident += "".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        ident += platform.processor()
    return ident


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library; raises RuntimeError with the reason."""
    global build_seconds
    src = _source_path()
    if not src.is_file():
        raise RuntimeError(f"C++ source not found: {src} (set FIP_FAST_CSRC to the csrc/ directory)")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++, clang++; or set FIP_FAST_CXX)")
    code = src.read_bytes()
    key = hashlib.sha256(code + "\0".join((cxx, _compiler_id(cxx), _host_id()) + CXXFLAGS).encode()).hexdigest()[:16]
    cache = _cache_dir()
    so = cache / f"fip_cpu_{key}.so"
    t0 = time.perf_counter()
    if not so.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".fip_cpu_{key}_", suffix=".so", dir=cache)
        os.close(fd)
        try:
            r = subprocess.run([cxx, *CXXFLAGS, "-o", tmp, str(src)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {src.name} failed ({cxx}, exit {r.returncode}): "
                                   f"{_tail(r.stderr + r.stdout)}")
            os.replace(tmp, so)   # atomic: a concurrent build of the same key just replaces it with equal bytes
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        build_seconds = time.perf_counter() - t0
        logger.info("fip_fast: built the CPU kernels in %.1f s (%s)", build_seconds, so)
    else:
        build_seconds = 0.0
    lib = ctypes.CDLL(str(so))
    if lib.fip_cpu_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{so} has ABI {lib.fip_cpu_abi_version()}, expected {ABI_VERSION}")
    lib.fisher_accumulate_f32.argtypes = [_c_vp, _c_vp, _c_i64, _c_float, _c_float, _c_int]
    lib.fisher_accumulate_f32.restype = None
    lib.perturb_f32.argtypes = [_c_vp, _c_vp, _c_i64, _c_float, _c_int]
    lib.perturb_f32.restype = None
    lib.sumsq_f32.argtypes = [_c_vp, _c_i64, _c_int]
    lib.sumsq_f32.restype = ctypes.c_double
    lib.fip_step_f32.argtypes = ([_c_vp] * 8 + [_c_i64, _c_float, _c_float, _c_int, _c_float, _c_float, _c_float,
                                                _c_float, _c_float, _c_int, _c_float, _c_int, _c_float, _c_float,
                                                _c_float, _c_int, _c_int])
    lib.fip_step_f32.restype = None
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


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


# ------------------------------------------------------------------------------------------------ the ops
@torch.no_grad()
def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta, alpha) -> None:
    if not fisher:
        return
    why = _why_not([fisher, grads])
    lib = _load()
    if why is not None or lib is None:
        _fallback("fisher_accumulate_", why or _error or "")
        return _fe.fisher_accumulate_(fisher, grads, beta, alpha)
    b, a, nt = _f(beta), _f(alpha), _nthreads()
    for f, g in zip(fisher, grads):
        if f.numel():
            lib.fisher_accumulate_f32(f.data_ptr(), g.data_ptr(), f.numel(), b, a, nt)


@torch.no_grad()
def global_norm(tensors: Sequence[Optional[Tensor]]) -> tuple[Tensor, Tensor]:
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.zeros(()), torch.zeros(())
    lib = _load()
    why = None
    for t in ts:
        if type(t) not in _PLAIN:
            why = f"a tensor subclass ({type(t).__name__})"
            break
        if t.device.type != "cpu" or t.dtype != torch.float32 or not is_dense(t):
            why = f"a {t.device.type} {t.dtype} tensor" + ("" if is_dense(t) else " (not dense)")
            break
    if why is not None or lib is None:
        _fallback("global_norm", why or _error or "")
        return _fe.global_norm(tensors)
    nt = _nthreads()
    sq = 0.0
    for t in ts:
        if t.numel():
            sq += lib.sumsq_f32(t.data_ptr(), t.numel(), nt)
    # the reference sums the squares in fp32: a sum beyond the fp32 range is +inf there, hence non-finite
    if math.isfinite(sq) and sq > 3.4028234663852886e38:
        sq = math.inf
    norm = torch.tensor(math.sqrt(sq) if sq == sq else math.nan, dtype=torch.float32)
    return norm, (~torch.isfinite(norm)).float()


@torch.no_grad()
def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale, found_inf=None) -> None:
    if not params or _skip(found_inf):
        return
    why = _why_not([params, grads])
    lib = _load()
    if why is not None or lib is None:
        _fallback("perturb_", why or _error or "")
        return _fe.perturb_(params, grads, scale, None)
    s, nt = _f(scale), _nthreads()
    for p, g in zip(params, grads):
        if p.numel():
            lib.perturb_f32(p.data_ptr(), g.data_ptr(), p.numel(), s, nt)


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


@torch.no_grad()
def fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, *, lr, momentum, nesterov,
              weight_decay, eta_r, beta, mix, restore_scale, precondition, damping, step, next_pert_scale,
              found_inf) -> None:
    if not params or _skip(found_inf):
        return
    n = len(params)
    use_anchor = eta_r != 0.0
    groups = [params, grads, momentum_buf, fisher]
    if grads_pert is not None:
        groups.append(grads_pert)
    if pert is not None:
        groups.append(pert)
    if use_anchor:
        if len(fisher0) != n or len(anchor) != n:
            why: Optional[str] = "lists of different lengths"
        else:
            groups += [fisher0, [a if f0 is not None else None for f0, a in zip(fisher0, anchor)]]
            why = None
            if any(f0 is not None and a is None for f0, a in zip(fisher0, anchor)):
                why = "an anchor missing where F0 is given"
    else:
        why = None
    why = why or _why_not(groups)
    lib = _load()
    if why is not None or lib is None:
        _fallback("fip_step_", why or _error or "")
        return _fe.fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, lr=lr,
                             momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta_r=eta_r, beta=beta,
                             mix=mix, restore_scale=restore_scale, precondition=precondition, damping=damping,
                             step=step, next_pert_scale=next_pert_scale, found_inf=None)
    lr_ = _f(lr)
    mix_ = _f(mix) if grads_pert is not None else 0.0
    has_rs = restore_scale is not None and pert is None
    rs = _f(restore_scale) if has_rs else 0.0
    nps = 0.0 if next_pert_scale is None else _f(next_pert_scale)
    beta_, omb = float(beta), 1.0 - float(beta)
    if precondition:
        steps = [_f(t) for t in step] if isinstance(step, (list, tuple)) else [_f(step)] * n
    has_wd = int(weight_decay != 0.0)
    nt = _nthreads()
    fn = lib.fip_step_f32
    for i, p in enumerate(params):
        numel = p.numel()
        if not numel:
            continue
        f0 = fisher0[i] if use_anchor else None
        fn(p.data_ptr(), grads[i].data_ptr(), None if grads_pert is None else grads_pert[i].data_ptr(),
           _ptr(f0), None if f0 is None else anchor[i].data_ptr(), momentum_buf[i].data_ptr(), fisher[i].data_ptr(),
           None if pert is None else pert[i].data_ptr(), numel, lr_, float(momentum), int(bool(nesterov)),
           float(weight_decay), float(eta_r), beta_, omb, mix_, int(has_rs), rs, int(bool(precondition)),
           _bias_correction(beta_, steps[i]) if precondition else 1.0, float(damping), nps, has_wd, nt)


def spectral_weight(U, S, delta, Vh, residual=None, relative=False):
    return _fe.spectral_weight(U, S, delta, Vh, residual, relative)


def spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative=False):
    return _fe.spectral_linear_grad(x, grad_out, U, S, delta, Vh, relative)
