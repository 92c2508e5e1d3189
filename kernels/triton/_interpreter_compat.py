"""Three fixes for the Triton interpreter (CPU tests only; compiled kernels are unaffected).

1. numpy ≥ 2.4 (:func:`apply`).

The interpreter (triton 3.2–3.6 at least) passes every scalar kernel argument as a 1-element, 1-d numpy array
and implements ``tensor.__index__`` as ``int(data)``.  numpy 2.4 removed ``int()`` of a 1-d array, so any loop
with a runtime bound — ``for k in range(0, K, BLOCK_K)`` — fails with "only 0-dimensional arrays can be
converted to Python scalars".  :func:`apply` wraps the interpreter's ``_patch_lang_tensor`` so that, while a
kernel is interpreted, ``__index__`` reads the single element instead.  The patch is scoped like the
interpreter's own (restored after each launch), applied only when the environment needs it, and idempotent.

2. Speed (:func:`apply_fast_nested_calls`).  Every call of a ``@triton.jit`` helper from inside an interpreted
kernel re-patches all of ``triton.language`` (~2.5 ms, measured: 193 re-patches were 0.51 s of a 0.81 s
``fip_step_`` launch).  The kernel launch has already patched those very module objects, so for helpers of
this package (and only those) the nested re-patch is skipped.  Results are unchanged; tests run ~3× faster.

3. Comparisons typed as their left operand (:func:`apply_comparison_dtype`).  The interpreter computes
``a < b`` with numpy and tags the result with ``a``'s type: a comparison of int64 *scalars* (``nn < N``) comes
back as an int64 0/1 instead of an int1, and ``n_ok & block_mask`` is then int64 too.  triton 3.2–3.6 let such a
mask through ``tl.load``/``tl.store``; triton 3.9's C++ load/store refuse it ("mask has unsupported dtype").  The
fix retypes every comparison result as int1 (bool data), what the compiler does; applied only where a comparison
comes back mistyped, and idempotent.
"""
from __future__ import annotations

import threading

import numpy as np

_applied = False


def _needed() -> bool:
    try:
        int(np.array([1]))
        return False
    except TypeError:
        return True


def apply() -> bool:
    """Install the fix if the interpreter needs it; returns whether it is installed."""
    global _applied
    if _applied:
        return True
    if not _needed():
        return False
    try:
        from triton.runtime import interpreter as _interp
    except Exception:
        return False
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None:
        return False

    def index(self):
        return int(np.asarray(self.handle.data).reshape(-1)[0])

    def _patch_lang_tensor(tensor, *scope):
        # triton 3.2 patches the class in place (one argument); 3.4+ through a scope that restores it afterwards.
        orig(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    _interp._patch_lang_tensor = _patch_lang_tensor
    _applied = True
    return True


_fast_applied = False
_state = threading.local()


def apply_fast_nested_calls() -> bool:
    """Skip the interpreter's redundant re-patching on nested calls of this package's jit helpers."""
    global _fast_applied
    if _fast_applied:
        return True
    try:
        from triton.runtime import interpreter as _interp
        from triton.runtime.errors import InterpreterError
        grid_call = _interp.GridExecutor.__call__
        fn_call = _interp.InterpretedFunction.__call__
    except Exception:
        return False

    def _grid_call(self, *args, **kwargs):
        depth = getattr(_state, "depth", 0)
        _state.depth = depth + 1
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _state.depth = depth

    def _fn_call(self, *args, **kwargs):
        if getattr(_state, "depth", 0) and getattr(self.fn, "__module__", "").startswith("fip_fast.kernels"):
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise InterpreterError(repr(e)) from e
        return fn_call(self, *args, **kwargs)

    _interp.GridExecutor.__call__ = _grid_call
    _interp.InterpretedFunction.__call__ = _fn_call
    _fast_applied = True
    return True


_cmp_applied = False


def _comparison_mistyped(interp) -> bool:
    from triton import language as tl
    b = interp.InterpreterBuilder()
    h = interp.TensorHandle(np.array(1, dtype=np.int64), tl.int64)
    return b.create_icmpSLT(h, h).dtype != tl.int1


def apply_comparison_dtype() -> bool:
    """Make the interpreter's ``create_icmp*`` / ``create_fcmp*`` return int1 (see fix 3 above)."""
    global _cmp_applied
    if _cmp_applied:
        return True
    try:
        from triton import language as tl
        from triton.runtime import interpreter as _interp
        if not _comparison_mistyped(_interp):
            return False
    except Exception:
        return False

    def _as_int1(fn):
        def cmp(self, lhs, rhs):
            out = fn(self, lhs, rhs)
            return _interp.TensorHandle(np.asarray(out.data).astype(np.bool_), tl.int1)
        return cmp

    builder = _interp.InterpreterBuilder
    for name in list(vars(builder)):
        if name.startswith(("create_icmp", "create_fcmp")):
            setattr(builder, name, _as_int1(getattr(builder, name)))
    _cmp_applied = True
    return True
