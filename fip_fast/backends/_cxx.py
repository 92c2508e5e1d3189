"""Compiling a C++ source of ``csrc/cpu/`` on first use, cached: what ``impl="cpu"`` (:mod:`.cpu`) and the step's
host helper (:mod:`.host`) share.

Cache: ``$FIP_FAST_CPU_CACHE`` or ``~/.cache/fip_fast`` (``$XDG_CACHE_HOME/fip_fast``), one file per hash of
source + compiler + flags + whatever else the caller says the binary depends on (the host CPU for
``-march=native``, the torch version for code built against its headers); built under a unique temporary name and
renamed atomically into place, so concurrent first uses never see a partial file.  Environment:
``FIP_FAST_CXX`` (the compiler; default ``$CXX``, else ``g++``, ``c++``, ``clang++``), ``FIP_FAST_CSRC`` (where
``csrc/`` is; default beside the package in a source checkout, else the copy a wheel installs as
``fip_fast/_csrc_cpu/``), ``FIP_FAST_CPU_CACHE`` (the cache directory).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence


def source_path(name: str) -> Path:
    """$FIP_FAST_CSRC/cpu/name, else csrc/cpu/name beside the package (source checkout, editable install), else
    the copy installed as package data (fip_fast/_csrc_cpu/name, a wheel)."""
    env = os.environ.get("FIP_FAST_CSRC")
    if env:
        return Path(env) / "cpu" / name
    here = Path(__file__).resolve().parents[1]
    checkout = here.parent / "csrc" / "cpu" / name
    installed = here / "_csrc_cpu" / name
    return checkout if checkout.is_file() or not installed.is_file() else installed


def cache_dir() -> Path:
    env = os.environ.get("FIP_FAST_CPU_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fip_fast"


def compiler() -> Optional[str]:
    for cand in (os.environ.get("FIP_FAST_CXX"), os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _tail(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    """``cxx --version`` (a subprocess: asked once per process and compiler, not per cache lookup)."""
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return cxx


def host_id() -> str:
    """The CPU a ``-march=native`` build is for: a cache shared between machines must not mix them."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        ident += "".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        ident += platform.processor()
    return ident


def binary_path(src: Path, stem: str, flags: Sequence[str], depends: str = "", suffix: str = ".so",
                post_flags: Sequence[str] = ()) -> Path:
    """Where the build of ``src`` with these flags lives in the cache (it may not exist yet).  Raises
    RuntimeError when there is no source or no compiler."""
    if not src.is_file():
        raise RuntimeError(f"C++ source not found: {src} (set FIP_FAST_CSRC to the csrc/ directory)")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++, c++, clang++; or set FIP_FAST_CXX)")
    ident = "\0".join((cxx, _compiler_id(cxx), depends, *flags, *post_flags))
    key = hashlib.sha256(src.read_bytes() + ident.encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}_{key}{suffix}"


def compile_cached(src: Path, stem: str, flags: Sequence[str], depends: str = "", suffix: str = ".so",
                   post_flags: Sequence[str] = ()) -> tuple[Path, float]:
    """(the cached binary of ``src``, seconds spent building it — 0.0 when it was in the cache).

    ``flags`` go before the source, ``post_flags`` (libraries) after it; ``depends``: what else the binary depends
    on (part of the cache key).  Raises RuntimeError with the reason (no source, no compiler, a failed build)."""
    out = binary_path(src, stem, flags, depends, suffix, post_flags)
    if out.is_file():
        return out, 0.0
    cxx, cache, key = compiler(), out.parent, out.name[len(stem) + 1:-len(suffix)]
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}_{key}_", suffix=suffix, dir=cache)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, "-o", tmp, str(src), *post_flags], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed ({cxx}, exit {r.returncode}): "
                               f"{_tail(r.stderr + r.stdout)}")
        os.replace(tmp, out)   # atomic: a concurrent build of the same key just replaces it with equal bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out, time.perf_counter() - t0
