"""Which extension modules setup.py builds: the CUDA extension ``fip_fast._C`` or nothing (pure Python).

Loaded by path from setup.py (csrc/ is not a package).  Rules:

* ``FIP_FAST_BUILD_CUDA=0``: never build it (pure-Python package; ``impl="cuda"`` may still JIT-build at run time).
* ``FIP_FAST_BUILD_CUDA=1``: build it, and fail loudly (RuntimeError naming what is missing) if it can't be built.
* unset: build it when torch is importable in the build environment, is a CUDA build, and a CUDA toolkit whose
  major version matches torch's is found; otherwise print why not and build the pure-Python package.  (pip's default
  isolated build environment has no torch, so a plain ``pip install .`` is pure Python: build the extension with
  ``pip install --no-build-isolation``, see csrc/README.md.)
"""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cuda_module():
    """fip_fast/backends/cuda.py loaded by path (its toolkit finder and source list), without importing the package."""
    spec = importlib.util.spec_from_file_location("_fip_fast_cuda_for_setup",
                                                  os.path.join(ROOT, "fip_fast", "backends", "cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _why_not() -> tuple[str, object]:
    """('', (torch, cuda_module, toolkit root)) when the extension can be built, else (reason, None)."""
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except Exception as exc:
        return f"torch is not importable in the build environment ({type(exc).__name__}: {exc})", None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build", None
    cu = _cuda_module()
    root = cu.find_cuda_home()
    if root is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME", None
    tk = cu.toolkit_version(root)
    want = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    if tk is None:
        return f"could not read the version of the CUDA toolkit at {root}", None
    if tk[0] != want[0]:
        return (f"the CUDA toolkit at {root} is {tk[0]}.{tk[1]} but torch was built with CUDA {torch.version.cuda} "
                f"(major versions must match)"), None
    return "", (torch, cu, root)


def build_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setuptools.setup(), or {} for a pure-Python build."""
    flag = os.environ.get("FIP_FAST_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"FIP_FAST_BUILD_CUDA must be 0, 1 or unset, not {flag!r}")
    if flag == "0":
        print("fip_fast: FIP_FAST_BUILD_CUDA=0: building the pure-Python package", file=sys.stderr)
        return {}
    reason, found = _why_not()
    if reason:
        if flag == "1":
            raise RuntimeError(f"FIP_FAST_BUILD_CUDA=1 but the CUDA extension fip_fast._C cannot be built: {reason}")
        print(f"fip_fast: building without the CUDA extension: {reason} "
              f"(impl='cuda' can still JIT-build it at run time)", file=sys.stderr)
        return {}
    torch, cu, root = found
    cu.use_cuda_home(root)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        print("fip_fast: no GPU visible and TORCH_CUDA_ARCH_LIST unset: torch will compile for many architectures "
              "(slow); e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100/H200", file=sys.stderr)
    print(f"fip_fast: building the CUDA extension fip_fast._C with {root}", file=sys.stderr)
    rel = os.path.relpath(HERE, ROOT)  # setuptools wants source paths relative to setup.py
    ext = CUDAExtension(
        name="fip_fast._C",
        sources=[os.path.join(rel, s) for s in cu.CSRC_SOURCES],
        include_dirs=[HERE],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # C++ standard: torch's choice
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
