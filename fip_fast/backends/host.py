"""The per-tensor host work of a step — read every gradient and its address, compare parameter lists, check that no
parameter or state tensor moved, bump version counters — in C++, so that a steady-state
:meth:`FIP.step <fip_fast.FIP.step>` costs a few microseconds of Python for 300 tensors instead of a few tens.

The functions below have a pure-Python version (the definition) and a C++ one, ``csrc/cpu/fip_host.cpp``:
a CPython extension module compiled against the installed torch's headers (about 10 s, once per machine and
torch version; cached like the CPU kernels, see :mod:`fip_fast.backends._cxx`).  Both return the same values;
which one runs changes no result, only the host time.  The C++ module handles plain tensors only
(``torch.Tensor``, ``torch.nn.Parameter``) and hands anything else (DTensor, other subclasses) to the Python
version.

When the module is built: :func:`prepare` (called by every ``FIP`` constructor) loads a cached build at once;
without one it compiles in a background thread and the Python versions serve until it is ready — so a short run
never waits for a compiler, and a long one gets the fast path after the first seconds.  Environment:

* ``FIP_FAST_HOST=0`` — never build or use the C++ module.
* ``FIP_FAST_HOST=sync`` — build in the foreground (the first ``FIP`` waits for the compiler).

Importing this module never fails; :func:`status` says what is in use and why.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import sysconfig
import threading
from array import array
from operator import attrgetter, is_
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fip_fast.backends import _cxx

logger = logging.getLogger("fip_fast")

SOURCE_NAME = "fip_host.cpp"
ABI_VERSION = 2

_mod = None
_error: Optional[str] = None
_thread: Optional[threading.Thread] = None
_lock = threading.Lock()
#: seconds the build took (0.0: loaded from the cache; None: not built in this process)
build_seconds: Optional[float] = None

_grad = attrgetter("grad")
_data_ptr = Tensor.data_ptr


# ------------------------------------------------------------------------------------------------ the functions
def _py_read_grads(params: list, prev: Optional[tuple]) -> tuple[list, tuple, bool]:
    grads = list(map(_grad, params))
    try:
        ptrs = tuple(map(_data_ptr, grads))
    except (TypeError, RuntimeError):      # a None (or a sparse) gradient: the slow way
        ptrs = tuple(None if g is None or g.is_sparse else g.data_ptr() for g in grads)
    if prev is not None and ptrs == prev:
        ptrs = prev
    return grads, ptrs, None in ptrs


def read_grads(params: list, prev: Optional[tuple] = None) -> tuple[list, tuple, bool]:
    """(``[p.grad for p in params]``, their ``data_ptr()`` — ``None`` for a missing or sparse gradient —,
    ``None in`` those pointers).  When every pointer equals ``prev``'s, the pointer tuple returned *is* ``prev``
    (cache keys built from it then compare by identity, item by item)."""
    if _mod is not None and type(params) is list:
        out = _mod.read_grads(params, prev)
        if out is not NotImplemented:
            return out
    return _py_read_grads(params, prev)


def same_items(a: list, b: list) -> bool:
    """``len(a) == len(b)`` and ``a[i] is b[i]`` for every i (a parameter list unchanged since a plan was made)."""
    if _mod is not None and type(a) is list and type(b) is list:
        return _mod.same_items(a, b)
    return len(a) == len(b) and all(map(is_, a, b))


def _py_addresses(tensors: list) -> bytes:
    try:
        return array("Q", map(_data_ptr, tensors)).tobytes()
    except RuntimeError:           # a tensor without storage: it records 0, as in the C++ version
        return array("Q", [_address_or_0(t) for t in tensors]).tobytes()


def _address_or_0(t: Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:
        return 0


def addresses(tensors: list) -> bytes:
    """Where every tensor's elements start: ``data_ptr()`` of each as a native uint64 (8 bytes a tensor).  A step
    plan records them when it is made; :func:`same_addresses` tells whether any tensor has moved since — a new
    storage under the same tensor object (``p.data = …``, ``share_memory_()``, ``model.half(); model.float()``)."""
    if _mod is not None and type(tensors) is list:
        out = _mod.addresses(tensors)
        if out is not NotImplemented:
            return out
    return _py_addresses(tensors)


def same_addresses(tensors: list, recorded: bytes) -> bool:
    """``addresses(tensors) == recorded``; the C++ version builds nothing and stops at the first tensor that moved
    (4 ns a tensor in cache, about 15 out of it: the check every planned step makes)."""
    if _mod is not None and type(tensors) is list:
        out = _mod.same_addresses(tensors, recorded)
        if out is not NotImplemented:
            return out
    return _py_addresses(tensors) == recorded


def bump_versions(tensors: list) -> None:
    """Advance the autograd version counter of every tensor (what ``torch.autograd.graph.increment_version``
    does), after a kernel wrote them through raw pointers."""
    if _mod is not None and type(tensors) is list and _mod.bump_versions(tensors) is not NotImplemented:
        return
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:          # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


# ------------------------------------------------------------------------------------------------ building
def _flags() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(compile flags, link flags, what the binary depends on) for an extension module against this torch."""
    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = ("-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
             f"-I{sysconfig.get_paths()['include']}")
    post = (f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python")
    if sys.platform == "darwin":
        post += ("-undefined", "dynamic_lookup")
    depends = "\0".join((torch.__version__, str(root), sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""))
    return flags, post, depends


def _build():
    """Compile (or find in the cache) and import the module; raises RuntimeError with the reason."""
    global build_seconds
    flags, post, depends = _flags()
    path, build_seconds = _cxx.compile_cached(_cxx.source_path(SOURCE_NAME), "fip_host", flags, depends,
                                              _suffix(), post)
    if build_seconds:
        logger.info("fip_fast: built the step's C++ host helper in %.1f s (%s)", build_seconds, path)
    spec = importlib.util.spec_from_file_location(
        "fip_host", path, loader=importlib.machinery.ExtensionFileLoader("fip_host", str(path)))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    abi = mod.init(torch.Tensor, torch.nn.Parameter)
    if abi != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {abi}, expected {ABI_VERSION}")
    return mod


def _load() -> None:
    global _mod, _error
    try:
        mod = _build()
    except Exception as exc:
        _error = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        logger.info("fip_fast: the step's C++ host helper is unavailable (the Python versions serve): %s", _error)
    else:
        _mod = mod


def _cached() -> bool:
    """Whether a build for this torch is already in the cache (then loading it takes milliseconds)."""
    try:
        flags, post, depends = _flags()
        return _cxx.binary_path(_cxx.source_path(SOURCE_NAME), "fip_host", flags, depends, _suffix(), post).is_file()
    except Exception:
        return False


def _suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def prepare() -> None:
    """Make the C++ module available: load a cached build now, else build it in the background (or in the
    foreground with ``FIP_FAST_HOST=sync``).  Cheap after the first call."""
    global _thread, _error
    if _mod is not None or _error is not None or _thread is not None:
        return
    with _lock:
        if _mod is not None or _error is not None or _thread is not None:
            return
        mode = os.environ.get("FIP_FAST_HOST", "1")
        if mode == "0":
            _error = "disabled by FIP_FAST_HOST=0"
            return
        if mode == "sync" or _cached():
            _load()
            return
        _thread = threading.Thread(target=_load, name="fip_fast-host-build", daemon=True)
        _thread.start()


def wait(timeout: Optional[float] = None) -> bool:
    """Start the build if needed and wait for it (tests, benchmarks); True when the C++ module is in use."""
    prepare()
    t = _thread
    if t is not None:
        t.join(timeout)
    return _mod is not None


def status() -> str:
    """What serves the step's host work, and why."""
    if _mod is not None:
        return "C++ (csrc/cpu/fip_host.cpp)"
    if _error is not None:
        return f"Python ({_error})"
    return "Python (the C++ module is being built)" if _thread is not None else "Python (not prepared)"


@contextlib.contextmanager
def python_versions():
    """Within: the Python versions serve, and no FIP constructor loads the C++ module (tests, benchmarks)."""
    global _mod, _error
    saved = _mod, _error
    _mod, _error = None, "the Python versions asked for (host.python_versions)"
    try:
        yield
    finally:
        _mod, _error = saved
