"""``impl="cuda"``: the CUDA C++ kernels of ``csrc/`` behind the kernel-level op signatures of
:mod:`fip_fast.reference`.

The compiled extension is ``fip_fast._C``.  It is used when it was built at install time (``csrc/README.md``);
otherwise, on first use on a machine where torch has CUDA, sees a GPU and a CUDA toolkit (``nvcc``) is found, it is
JIT-compiled from ``csrc/`` with :func:`torch.utils.cpp_extension.load` (ninja) into a cache directory — logged at
WARNING level, about a minute once, reused afterwards.  Whenever the extension can't be had, :func:`available`
returns ``(False, reason)`` and :mod:`fip_fast.ops` falls back (``impl="auto"``) or raises
:class:`~fip_fast.ops.ImplUnavailableError` (``impl="cuda"``).  Importing this module never fails for want of CUDA.

Environment:

* ``FIP_FAST_CUDA_JIT=0`` — never JIT-compile; use the installed ``fip_fast._C`` or report unavailable.
* ``FIP_FAST_CUDA_CACHE=DIR`` — JIT build directory root (default ``~/.cache/fip_fast``, or
  ``$XDG_CACHE_HOME/fip_fast``).
* ``FIP_FAST_CSRC=DIR`` — where the ``csrc/`` sources are (default: the ``csrc/`` beside the package in a source
  checkout / editable install; a wheel ships no sources, only the prebuilt extension if it was built).
* ``CUDA_HOME`` / ``CUDA_PATH`` — the toolkit root; otherwise found from ``nvcc`` (wrappers resolved), then
  ``/usr/local/cuda``.

What the kernels take (anything else falls back to :mod:`fip_fast.backends.foreach` for that call, logged once): CUDA
tensors of fp32 / fp16 / bf16 parameters and gradients, fp32 state (momentum, Fisher, lagged perturbation, F0),
anchors θ0 in fp32 or in the parameter dtype, every tensor either contiguous or sharing its parameter's dense
layout.  Scalars (``lr``, ``mix``, scales, ``step``, ``found_inf``) may be Python numbers, CPU tensors or CUDA
tensors; CUDA tensors are read by the kernels (no host synchronisation).  ``step`` may also be a sequence with one
count per tensor (each parameter's ``state["step"]``): each tensor's bias correction then uses its own count.  The
lagged step stores the next perturbation without applying it (the optimizer applies it with ``perturb_``).
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

logger = logging.getLogger("fip_fast")

__all__ = ["available", "fisher_accumulate_", "global_norm", "perturb_", "fip_step_", "spectral_weight",
           "spectral_linear_grad", "spectral_update_", "find_cuda_home", "CSRC_SOURCES"]

#: The sources of the extension, relative to ``csrc/`` (setup.py and the JIT build use the same list).
CSRC_SOURCES = ("bindings.cpp", "multi_tensor.cu", "l2norm.cu")

# ------------------------------------------------------------------------------------------------------------------
# Finding the CUDA toolkit (also used by csrc/setup_ext.py, which loads this file by path: keep the functions
# below free of package-relative imports)
# ------------------------------------------------------------------------------------------------------------------


def _is_toolkit(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit root an ``nvcc`` on PATH really runs from (it may be a wrapper script): ``nvcc -v --dryrun``
    prints ``TOP=<root>/bin/..``."""
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=30)
    except Exception:
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.normpath(m.group(1).strip()) if m else None


def find_cuda_home() -> Optional[str]:
    """The root of a usable CUDA toolkit (``bin/nvcc`` and ``include/cuda_runtime.h``), or ``None``.

    Order: ``$CUDA_HOME``, ``$CUDA_PATH``; the ``nvcc`` on PATH (symlinks resolved, wrapper scripts asked with
    ``nvcc -v --dryrun``); ``/usr/local/cuda``; the newest ``/usr/local/cuda-*``.  Unlike torch's own lookup this
    does not take ``/usr/local`` for the toolkit when ``/usr/local/bin/nvcc`` is a wrapper.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if _is_toolkit(root):
            return os.path.normpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(root):
            return root
        top = _nvcc_top(nvcc)
        if _is_toolkit(top):
            return top
    if _is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    versions = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) if x.isdigit() else 0
                                                                      for x in re.split(r"[.-]", p)])
    for root in reversed(versions):
        if _is_toolkit(root):
            return root
    return None


def toolkit_version(root: str) -> Optional[tuple[int, int]]:
    """(major, minor) of the toolkit at ``root`` from ``nvcc --version``, or None."""
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except Exception:
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def use_cuda_home(root: str) -> None:
    """Make torch.utils.cpp_extension build with the toolkit at ``root`` (its own guess can be a wrapper's folder)."""
    from torch.utils import cpp_extension
    if not _is_toolkit(getattr(cpp_extension, "CUDA_HOME", None)) or \
            os.path.realpath(cpp_extension.CUDA_HOME) != os.path.realpath(root):
        cpp_extension.CUDA_HOME = root
    os.environ.setdefault("CUDA_HOME", root)


def csrc_dir() -> Optional[str]:
    """The ``csrc/`` folder with the extension's sources, or None (wheel installs ship none)."""
    cands = [os.environ.get("FIP_FAST_CSRC"),
             os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")]
    for d in cands:
        if d and all(os.path.isfile(os.path.join(d, s)) for s in CSRC_SOURCES):
            return os.path.abspath(d)
    return None


# ------------------------------------------------------------------------------------------------------------------
# Loading the extension
# ------------------------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_ext = None
_ext_error: Optional[str] = None


def _why_no_cuda() -> str:
    """'' when torch can run CUDA kernels here, else why not."""
    if getattr(torch.version, "hip", None):
        return f"torch is a ROCm build ({torch.version.hip}); the CUDA kernels are CUDA-only"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no driver)"
    return ""


def _cache_root() -> str:
    root = os.environ.get("FIP_FAST_CUDA_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fip_fast")
    return root


def _jit_build():
    """Compile csrc/ with torch.utils.cpp_extension.load; returns the module or raises with a clear message."""
    if os.environ.get("FIP_FAST_CUDA_JIT", "1").strip() == "0":
        raise RuntimeError("fip_fast._C is not installed and FIP_FAST_CUDA_JIT=0 forbids building it on first use")
    src = csrc_dir()
    if src is None:
        raise RuntimeError("fip_fast._C is not installed and the csrc/ sources were not found for a JIT build "
                           "(install from a source checkout, or set FIP_FAST_CSRC)")
    root = find_cuda_home()
    if root is None:
        raise RuntimeError("fip_fast._C is not installed and no CUDA toolkit (nvcc) was found for a JIT build; "
                           "set CUDA_HOME")
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("fip_fast._C is not installed and ninja (needed for a JIT build) is missing: "
                           "pip install ninja")
    use_cuda_home(root)
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}"
    build_dir = os.path.join(_cache_root(), f"cuda_ext_{tag}".replace(".", "_"))
    os.makedirs(build_dir, exist_ok=True)
    logger.warning("fip_fast: the CUDA extension fip_fast._C is not installed; JIT-compiling %s with "
                   "torch.utils.cpp_extension.load (nvcc from %s) into %s. This happens once and takes about a "
                   "minute; set FIP_FAST_CUDA_JIT=0 to disable, or build it at install time (csrc/README.md).",
                   src, root, build_dir)
    return cpp_extension.load(
        name="fip_fast_C",
        sources=[os.path.join(src, s) for s in CSRC_SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],  # the C++ standard is torch's choice (C++17 or C++20)
        extra_include_paths=[src],
        build_directory=build_dir,
        with_cuda=True,
        verbose=os.environ.get("FIP_FAST_CUDA_VERBOSE", "0") == "1",
    )


def _extension():
    """(module, '') or (None, reason).  Tries the installed fip_fast._C, then a JIT build; remembers the outcome."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext, _ext_error or ""
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext, _ext_error or ""
        why = _why_no_cuda()
        if why:
            return None, why  # not cached: a later CUDA initialisation (e.g. in a subprocess) may change it
        try:
            from fip_fast import _C as ext  # built by setup.py (csrc/setup_ext.py)
            _ext = ext
            return _ext, ""
        except ImportError as exc:
            installed_error = f"{type(exc).__name__}: {exc}"
        try:
            _ext = _jit_build()
            return _ext, ""
        except Exception as exc:  # compiler errors included: report, never crash the caller
            _ext_error = f"{exc} (import of fip_fast._C: {installed_error})"
            logger.warning("fip_fast: CUDA extension unavailable: %s", _ext_error)
            return None, _ext_error


def available(device) -> tuple[bool, str]:
    """(ok, reason): can the CUDA C++ kernels run on tensors of ``device``?  May JIT-build the extension (once)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the CUDA C++ kernels run on CUDA tensors only, not {device.type} tensors"
    why = _why_no_cuda()
    if why:
        return False, why
    ext, reason = _extension()
    return (ext is not None), reason


def _ext_or_raise():
    ext, reason = _extension()
    if ext is None:
        raise RuntimeError(f"fip_fast CUDA extension unavailable: {reason}")
    return ext


# ------------------------------------------------------------------------------------------------------------------
# Argument conversion
# ------------------------------------------------------------------------------------------------------------------

def _scalar(x, device: torch.device, name: str) -> tuple[Optional[Tensor], float]:
    """(CUDA fp32 one-element tensor or None, value): a CUDA tensor is handed to the kernel (read on the device),
    a CPU tensor or number becomes a value (no device sync: a CPU tensor's .item() is a host read)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        if x.device.type != "cuda":
            return None, float(x.item())
        if x.dtype != torch.float32 or x.device != device:
            x = x.to(device=device, dtype=torch.float32, non_blocking=True)
        return x.reshape(()) if x.dim() else x, 0.0
    return None, float(x)


def _found_inf(found_inf, device: torch.device) -> tuple[bool, Optional[Tensor]]:
    """(skip now, device flag): a host-side non-zero flag skips without a launch; a CUDA flag is read by the kernel."""
    if found_inf is None:
        return False, None
    t, v = _scalar(found_inf, device, "found_inf")
    if t is None:
        return v != 0.0, None  # NaN != 0 skips, like the reference
    return False, t


def _step_counts(step: Sequence, device: torch.device, n: int) -> tuple[Tensor | None, float, list | None]:
    """``fip_step_``'s per-tensor ``step`` sequence as ``(step_t, step_v, steps)`` for the binding.

    Host values only (numbers, CPU tensors), all equal: ``(None, value, None)`` — the single-count path.  Otherwise
    ``steps`` is one one-element fp32 tensor on ``device`` per parameter, whose pointer goes into that tensor's table
    entry; the kernel reads it (no host sync).  fp32 CUDA tensors on ``device`` (the optimizer's ``state["step"]``)
    are used as they are, so their pointers — and the cached table — stay the same from step to step; other
    tensors are converted and numbers are written with a device fill (then the table is re-uploaded each call)."""
    if len(step) != n:
        raise ValueError(f"fip_step_: step has {len(step)} entries, params has {n} (one step count per tensor)")
    host = [not (isinstance(s, Tensor) and s.device.type == "cuda") for s in step]
    if all(host):
        vals = [_scalar(s, device, "step")[1] for s in step]
        if all(v == vals[0] for v in vals):
            return None, vals[0], None
    out = []
    for s, h in zip(step, host):
        if h:
            out.append(torch.full((), _scalar(s, device, "step")[1], dtype=torch.float32, device=device))
        else:
            t, _ = _scalar(s, device, "step")
            out.append(t)
    return None, 1.0, out


_fallback_logged: set[tuple[str, str]] = set()


def _fallback(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        logger.warning("fip_fast: impl='cuda' %s falls back to impl='foreach' for this call: %s", op, reason)


# ------------------------------------------------------------------------------------------------------------------
# The ops (signatures of fip_fast.reference)
# ------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta, alpha) -> None:
    """F ← β·F + α·g² — one launch for all tensors (per gradient dtype)."""
    if not fisher:
        return
    ext = _ext_or_raise()
    dev = fisher[0].device
    bt, bv = _scalar(beta, dev, "beta")
    at, av = _scalar(alpha, dev, "alpha")
    reason = ext.fisher_accumulate(list(fisher), list(grads), bt, bv, at, av)
    if reason:
        _fallback("fisher_accumulate_", reason)
        from fip_fast.backends import foreach as _foreach
        _foreach.fisher_accumulate_(fisher, grads, beta, alpha)


@torch.no_grad()
def global_norm(tensors: Sequence[Optional[Tensor]]) -> tuple[Tensor, Tensor]:
    """(‖concat(tensors)‖₂, found_inf) as 0-dim fp32 CUDA tensors: a two-stage deterministic reduction (per-chunk
    fp32 sums of squares, then one block summing them in fp64), one stage-1 launch per dtype + one finalize."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.zeros(()), torch.zeros(())
    ext = _ext_or_raise()
    norm, found_inf, reason = ext.global_norm(ts)
    if reason:
        _fallback("global_norm", reason)
        from fip_fast.backends import foreach as _foreach
        return _foreach.global_norm(ts)
    return norm, found_inf


@torch.no_grad()
def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale, found_inf=None) -> None:
    """θ ← θ + scale·g unless found_inf — one launch for all tensors (per dtype pair)."""
    if not params:
        return
    dev = params[0].device
    skip, fi = _found_inf(found_inf, dev)
    if skip:
        return
    ext = _ext_or_raise()
    st, sv = _scalar(scale, dev, "scale")
    reason = ext.perturb(list(params), list(grads), st, sv, fi)
    if reason:
        _fallback("perturb_", reason)
        from fip_fast.backends import foreach as _foreach
        _foreach.perturb_(params, grads, scale, found_inf)


@torch.no_grad()
def fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, *, lr, momentum, nesterov,
              weight_decay, eta_r, beta, mix, restore_scale, precondition, damping, step, next_pert_scale,
              found_inf) -> None:
    """The fused FIP step of :func:`fip_fast.reference.fip_step_`: one pass, in place, no allocation (beyond a
    cached device copy of the tensor table), one launch for all tensors of one dtype combination."""
    if not params:
        return
    dev = params[0].device
    skip, fi = _found_inf(found_inf, dev)
    if skip:
        return
    if grads_pert is not None and mix is None:
        raise ValueError("fip_step_: mix is required when grads_pert is given")
    ext = _ext_or_raise()
    lr_t, lr_v = _scalar(lr, dev, "lr")
    mix_t, mix_v = _scalar(mix, dev, "mix") if grads_pert is not None else (None, 0.0)
    use_rs = pert is None and restore_scale is not None
    rs_t, rs_v = _scalar(restore_scale, dev, "restore_scale") if use_rs else (None, 0.0)
    steps = None
    if not precondition:
        step_t, step_v = None, 1.0
    elif isinstance(step, (list, tuple)):
        step_t, step_v, steps = _step_counts(step, dev, len(params))
    else:
        step_t, step_v = _scalar(step, dev, "step")
    use_nps = pert is not None and next_pert_scale is not None
    nps_t, nps_v = _scalar(next_pert_scale, dev, "next_pert_scale") if use_nps else (None, 0.0)
    reason = ext.fip_step(
        list(params), list(grads), None if grads_pert is None else list(grads_pert), list(fisher0), list(anchor),
        list(momentum_buf), list(fisher), None if pert is None else list(pert),
        lr_t, lr_v, float(momentum), bool(nesterov), float(weight_decay), float(eta_r), float(beta),
        mix_t, mix_v, use_rs, rs_t, rs_v, bool(precondition), float(damping), step_t, step_v, steps,
        use_nps, nps_t, nps_v, fi)
    if reason:
        _fallback("fip_step_", reason)
        from fip_fast.backends import foreach as _foreach
        _foreach.fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, lr=lr,
                           momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta_r=eta_r, beta=beta,
                           mix=mix, restore_scale=restore_scale, precondition=precondition, damping=damping,
                           step=step, next_pert_scale=next_pert_scale, found_inf=found_inf)


# ------------------------------------------------------------------------------------------------------------------
# Spectral ops: cuBLAS through torch, no custom kernel
# ------------------------------------------------------------------------------------------------------------------

def _acc(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def spectral_weight(U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor, residual: Optional[Tensor] = None,
                    relative: bool = False) -> Tensor:
    """W(δ) = U·diag(relu(s))·Vh (+ residual) as one cuBLAS GEMM: ``addmm(residual, U·relu(s), Vh)``.

    Why no custom kernel: the work is an (m×r)·(r×n) GEMM, O(m·r·n), which cuBLAS runs near peak (tensor cores
    when TF32 is enabled by the user); everything else is O(m·r) (scaling U's columns by relu(s)) or is folded
    into the GEMM (the residual as addmm's C operand, so W is written once).  A hand-written kernel could at best
    fuse the O(m·r) scaling into the GEMM's operand load — a few percent of the GEMM's traffic — at the price of
    re-implementing a GEMM.  Math in fp32 (fp64 stays fp64), result in U's dtype, like the reference.
    """
    s = _acc(S) * (1.0 + _acc(delta)) if relative else _acc(S) + _acc(delta)
    Us = _acc(U) * torch.relu(s)
    W = torch.mm(Us, _acc(Vh)) if residual is None else torch.addmm(_acc(residual), Us, _acc(Vh))
    return W.to(U.dtype)


def spectral_linear_grad(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor,
                         relative: bool = False) -> tuple[Tensor, Tensor]:
    """(δ-gradient (r,), per-sample squared δ-gradients (N, r)) of a spectral Linear layer, via two cuBLAS GEMMs.

    a = x·Vhᵀ and b = grad_out·U are GEMMs of O(N·T·n·r) and O(N·T·m·r); the rest — Σ_t a⊙b, the relu mask (times
    S when ``relative``), the square and the sum over samples — is O(N·T·r) elementwise/reduction work on tensors
    r/n and r/m times smaller than the GEMM inputs, done here in three small torch ops.  A custom kernel could fuse
    those into one pass, saving a few µs on tensors that are already small; it cannot speed up the GEMMs, which
    dominate.  Hence no custom kernel.  Math in fp32 (fp64 stays fp64), like the reference.
    """
    a = torch.matmul(_acc(x), _acc(Vh).t())
    b = torch.matmul(_acc(grad_out), _acc(U))
    ds = a * b if x.dim() == 2 else (a * b).sum(1)      # (N, r); T = 1 needs no reduction
    s = _acc(S) * (1.0 + _acc(delta)) if relative else _acc(S) + _acc(delta)
    jac = (s > 0).to(ds.dtype)
    if relative:
        jac = jac * _acc(S)
    per_sample = ds * jac                                 # out of place: these may be differentiated through
    return per_sample.sum(0), per_sample.pow(2)


def spectral_update_(weights: Sequence[Tensor], U: Sequence[Tensor], Vh: Sequence[Tensor], s_old: Sequence[Tensor],
                     s_new: Sequence[Tensor], base: Optional[Sequence[Tensor]] = None) -> None:
    """W ← B + U·diag(s_new − s_old)·Vh per layer, in place (:func:`fip_fast.reference.spectral_update_`): one cuBLAS
    GEMM per layer through torch (``addmm`` with the base as its C operand, W written once), the foreach backend's
    form — for the reason :func:`spectral_weight` gives, no custom kernel.  Shapes: ``weights[i]``, ``base[i]``
    (m, n), ``U[i]`` (m, k), ``Vh[i]`` (k, n), ``s_old[i]``, ``s_new[i]`` (k,)."""
    # imported here, not at the top: csrc/setup_ext.py loads this file by path, outside the package
    from fip_fast.backends import foreach

    foreach.spectral_update_(weights, U, Vh, s_old, s_new, base)
