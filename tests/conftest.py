# --- fip_fast.kernels (Triton) -------------------------------------------------------------------------------
# The Triton kernels run on CPU tensors only under the interpreter, which must be selected before triton is
# imported (triton.jit decides at decoration time).  setdefault: a GPU job can run the same tests compiled with
# TRITON_INTERPRET=0.  A private cache dir keeps test runs from reading or polluting ~/.triton.
import os as _os
import tempfile as _tempfile

_os.environ.setdefault("TRITON_INTERPRET", "1")
_os.environ.setdefault("TRITON_CACHE_DIR", _tempfile.mkdtemp(prefix="fip_fast_triton_cache_"))
