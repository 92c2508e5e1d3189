"""Multi-tensor launch machinery: one Triton launch covers every tensor of a list (of several parallel lists).

Layout
------
An op works on ``S`` parallel *slots* (for ``fip_step_``: params, grads, grads_pert, fisher0, anchor, momentum,
fisher, pert) of ``T`` tensors each; tensor ``i`` of every slot has the same number of elements ``n_i``.  The
host builds, once per distinct list of tensors, one int64 device buffer holding

==============  ============  =====================================================================
view            shape         meaning
==============  ============  =====================================================================
``ptrs``        (S·T,)        ``data_ptr()`` of tensor i of slot s at ``s·T + i`` (0 where None)
``codes``       (S·T,)        dtype code of that tensor (:data:`DTYPE_CODES`), read only for mixed slots
``sizes``       (T,)          ``n_i`` (elements)
``chunk_t``     (C,)          tensor index handled by program ``pid``
``chunk_s``     (C,)          first element (int64) handled by program ``pid``; a multiple of ``BLOCK``
==============  ============  =====================================================================

with ``C = Σ_i ceil(n_i / BLOCK)``: the grid is ``(C,)`` and program ``pid`` processes elements
``[chunk_s[pid], min(chunk_s[pid] + BLOCK, n_i))`` of tensor ``chunk_t[pid]`` in every slot.  Empty tensors
get no program; an empty list (or a list of empty tensors) launches nothing.  All offsets are int64, so a
single tensor may exceed 2³¹ elements.

Caching
-------
The buffer is cached (LRU, :data:`CACHE_SIZE` entries) under a key made of the device, ``BLOCK`` and, for every
tensor of every slot, ``(data_ptr, numel, dtype, layout)``: the key determines the buffer completely, so
a hit is always correct even if tensors were freed and others allocated at the same addresses.  In the steady
state of an optimizer the tensors never move, so every step after the first is a hit: no host-to-device copy,
no allocation, one kernel launch.  A miss costs one synchronous host-to-device copy of the buffer.
Building that key costs four Python calls per tensor and slot (milliseconds for a few hundred tensors), so a
caller that knows which tensors it passes — FIP's step plans (:mod:`fip_fast._plan`) — gives its own ``key``
instead, and a hit costs one dictionary lookup.

Dtypes
------
One launch covers tensors of different dtypes.  Each slot gets a compile-time dtype ``DT``: 0 fp32, 1 fp16,
2 bf16 when every tensor of the slot has that dtype (straight-line code), or :data:`MIXED` (3) when they differ,
in which case the kernel branches per program on ``codes`` (a uniform branch: all threads of a program agree).
So there is never more than one launch per op call, whatever the mix of dtypes.  Math is fp32 in every case.

Layouts
-------
Element k of tensor i is the k-th element *in memory order* in every slot, so a tensor may also be dense but not
contiguous (channels_last, a permuted dense layout) as long as every slot's tensor i has the same memory order as
slot 0's (:func:`layout_reason`).  Other inputs — strided views, a contiguous gradient beside a channels_last
parameter — raise :class:`LayoutError`, on which the op wrappers fall back to :mod:`fip_fast.backends.foreach` for that
call (logged once at WARNING, :func:`fallback`).

Alignment
---------
When every pointer is 16-byte aligned (true for whole tensors from the caching allocator; a view with a
storage offset may not be) the kernels tell the compiler so (``ALIGNED``) and full blocks are processed
without a mask, which lets Triton emit 128-bit vector loads and stores; the last, partial block of each
tensor is masked.  Checked in AOT compilation for sm_90 (``ld.global.v4`` in the PTX), not timed (no GPU).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fip_fast._utils import is_dense

logger = logging.getLogger("fip_fast")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PLAIN = (Tensor, torch.nn.Parameter)      # DTensor and other subclasses: their data_ptr is not the elements
MIXED = 3
CACHE_SIZE = 64

#: scalar modes (see :func:`scalar_arg`): absent, a host value baked into the launch, a 0-dim device tensor
ABSENT, VALUE, POINTER = 0, 1, 2


class TensorTable(NamedTuple):
    """The device-side description of one multi-tensor launch (see the module docstring)."""

    ptrs: Tensor
    codes: Tensor
    sizes: Tensor
    chunk_t: Tensor
    chunk_s: Tensor
    n_tensors: int
    n_chunks: int
    dt: tuple[int, ...]          # per slot: 0/1/2 uniform dtype, MIXED, or 0 for an absent slot
    aligned: bool


_cache: "OrderedDict[tuple, TensorTable]" = OrderedDict()


class LayoutError(ValueError):
    """A tensor the kernels cannot walk in flat memory order together with its slot-0 partner: not dense, or dense
    with another layout (e.g. a contiguous gradient for a channels_last parameter).  :mod:`fip_fast.backends.foreach`
    handles such inputs: the op wrappers catch this and fall back for that call (:func:`fallback`)."""


def _entry_key(t: Optional[Tensor]):
    if t is None:
        return None
    # a non-contiguous (dense) tensor's strides are part of the key: the layout check is skipped on a hit
    return (t.data_ptr(), t.numel(), t.dtype, True if t.is_contiguous() else tuple(t.stride()))


def _memory_order(t: Tensor) -> tuple:
    """(size, stride) of the dimensions of more than one element: two dense tensors with equal values have their
    elements in the same memory order (size-1 dimensions may carry any stride)."""
    return tuple((n, st) for n, st in zip(t.shape, t.stride()) if n > 1)


def layout_reason(t: Tensor, ref: Tensor) -> str:
    """'' when ``t`` can be processed elementwise in flat memory order beside ``ref`` (slot 0's tensor), else why
    not.  Accepted: both contiguous, or both non-overlapping and dense with the same memory order (channels_last
    parameters with channels_last gradients and state, say) — then ``data_ptr()`` is the start of each dense block
    and flat index k is the same element in both."""
    if t.numel() <= 1:
        return ""
    if t.is_contiguous() and ref.is_contiguous():
        return ""
    if not is_dense(t):
        return "is not dense (a strided view)"
    if not is_dense(ref):
        return "its slot-0 partner is not dense (a strided view)"
    if t.shape == ref.shape and _memory_order(t) == _memory_order(ref):
        return ""
    return (f"has layout {tuple(t.shape)}/{tuple(t.stride())}, its slot-0 partner {tuple(ref.shape)}/"
            f"{tuple(ref.stride())}: not the same memory order")


_fallback_logged: set = set()


def fallback(op: str, reason: str) -> None:
    """Log, once per (op, reason) at WARNING, that the Triton ``op`` runs impl='foreach' for this call."""
    key = (op, reason)
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        logger.warning("fip_fast: impl='triton' %s falls back to impl='foreach' for this call: %s", op, reason)


def _caller_key(stable, block: int, min_chunks: int, names: Sequence[str], absent: tuple) -> tuple:
    return ("caller", block, min_chunks, tuple(names), absent, stable)


class _Keyed:
    """A table cached under a caller's key, with the host copy of its buffer and what patching moved tensors in
    needs: the moving pointers it holds, per moving slot the dtype code of each entry (None: no tensor there),
    and whether every slot-0 tensor is contiguous."""

    __slots__ = ("table", "moving", "flat", "n_slots", "device", "codes", "contig0")

    def __init__(self, table: TensorTable, moving: tuple, flat: np.ndarray, slots, moving_slots: tuple,
                 device) -> None:
        self.table, self.moving, self.flat, self.n_slots, self.device = table, moving, flat, len(slots), device
        self.codes = {s: _codes(slots[s]) for s in moving_slots if s < len(slots)}
        self.contig0 = all(t.is_contiguous() for t in slots[0])


def _codes(lst) -> Optional[list]:
    return None if lst is None else [None if t is None else DTYPE_CODES.get(t.dtype) for t in lst]


#: tables built under a caller's key (LRU): ``(stable part, block, …) → _Keyed``
_keyed: "OrderedDict[tuple, _Keyed]" = OrderedDict()


def cached_table(key, block: int, min_chunks: int, names: Sequence[str], absent: tuple = (False,), slots=None,
                 moving_slots: tuple = ()) -> Optional[TensorTable]:
    """The table cached under a caller's ``key`` (see :func:`tensor_table`) for the moving pointers of ``key`` —
    found, or patched from the cached one when ``slots`` are given and only moved tensors differ —, or None."""
    if key is None:
        return None
    stable, moving = key
    full = _caller_key(stable, block, min_chunks, names, absent)
    e = _keyed.get(full)
    if e is None:
        return None
    if e.moving != moving and (slots is None or not _patch(e, slots, moving, moving_slots, e.device)):
        return None
    _keyed.move_to_end(full)
    return e.table


def tensor_table(slots: Sequence[Optional[Sequence[Optional[Tensor]]]], block: int, device: torch.device,
                 min_chunks: int = 0, names: Sequence[str] = (), key=None, moving_slots: tuple = ()) -> TensorTable:
    """The (cached) :class:`TensorTable` for ``slots``: a list of S parallel lists of T tensors each.

    A slot may be ``None`` (absent: its row of ``ptrs`` is 0); an entry may be ``None`` (its pointer is 0; the
    kernel must test for it).  Slot 0 must have no ``None`` entries: it defines the sizes.  ``min_chunks``
    pads the grid with empty chunks (tensor 0, start 0, for kernels that must run at least once even when all
    tensors are empty, like the norm whose last program writes the result).  ``names`` label slots in errors.

    ``key``: ``(stable, moving)`` from a caller that guarantees ``stable`` determines every tensor of ``slots``
    (pointer, size, dtype, layout) except those of ``moving_slots``, and ``moving`` is one tuple of ``data_ptr``
    per moving slot (FIP's step plans and its gradients, :mod:`fip_fast._plan`).  The cache is then looked up by
    the key alone, without the four calls per tensor and slot of the default key — the host cost of a
    steady-state optimizer step; when only the moving pointers differ (gradients that are new tensors), the new
    tensors get a cheap check (plain, same dtype, contiguous) and their pointers are patched into a copy of the
    table instead of building it again.

    Raises:
        LayoutError: a tensor that is not dense, or not in the memory order of slot 0's tensor (a ValueError).
        ValueError: lists of different lengths, mismatched numels, wrong device.
        TypeError: a dtype other than fp32/fp16/bf16.
    """
    if key is not None:
        return _keyed_table(slots, block, device, min_chunks, names, key, moving_slots)
    key = (device, block, min_chunks, tuple(None if s is None else tuple(_entry_key(t) for t in s) for s in slots))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    table = _cache[key] = _build(slots, block, device, min_chunks, names)[0]
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return table


def _keyed_table(slots, block, device, min_chunks, names, key, moving_slots) -> TensorTable:
    stable, moving = key
    full = _caller_key(stable, block, min_chunks, names, tuple(s is None for s in slots))
    e = _keyed.get(full)
    if e is not None:
        _keyed.move_to_end(full)
        if e.moving == moving:
            return e.table
        if _patch(e, slots, moving, moving_slots, device):
            return e.table
    table, flat = _build(slots, block, device, min_chunks, names)
    _keyed[full] = _Keyed(table, moving, flat, slots, moving_slots, device)
    if len(_keyed) > CACHE_SIZE:
        _keyed.popitem(last=False)
    return table


def _patch(e: _Keyed, slots, moving: tuple, moving_slots: tuple, device) -> bool:
    """Put the moved tensors of ``slots`` into a new copy of ``e``'s table, if each is plain, contiguous (as every
    slot-0 tensor must then be) and of the dtype of the one it replaces (None where there was None); False
    (nothing changed) otherwise."""
    if len(moving) != len(e.moving) or len(moving) != len(moving_slots) or e.device != device or not e.contig0:
        return False
    S, T = e.n_slots, e.table.n_tensors
    changed = [(s, new) for s, old, new in zip(moving_slots, e.moving, moving) if old != new]
    for s, new in changed:
        lst = slots[s]
        if lst is None or new is None or len(new) != T or _codes(lst) != e.codes.get(s):
            return False
        ts = [t for t in lst if t is not None]
        if not (all(type(t) in _PLAIN for t in ts) and all(t.is_contiguous() for t in ts)):
            return False
    flat = e.flat.copy()
    ptrs = flat[:S * T].reshape(S, T)
    for s, new in changed:
        ptrs[s] = [0 if q is None else q for q in new]
    sizes = flat[2 * S * T:2 * S * T + T]
    aligned = bool(np.all((ptrs % 16 == 0) | (sizes[None, :] == 0)))
    e.table = _views(flat, device, S, T, e.table.n_chunks, e.table.dt, aligned)
    e.flat, e.moving = flat, moving
    return True


def _build(slots, block, device, min_chunks, names) -> tuple[TensorTable, np.ndarray]:
    n_slots = len(slots)
    n_tensors = len(slots[0])
    def label(s):
        return names[s] if s < len(names) else f"slot {s}"

    sizes = []
    for i, t in enumerate(slots[0]):
        if t is None:
            raise ValueError(f"{label(0)}[{i}] is None")
        sizes.append(t.numel())
    ptrs = np.zeros((n_slots, n_tensors), dtype=np.int64)
    codes = np.zeros((n_slots, n_tensors), dtype=np.int64)
    dt = []
    aligned = True
    for s, lst in enumerate(slots):
        if lst is None:
            dt.append(0)
            continue
        if len(lst) != n_tensors:
            raise ValueError(f"{label(s)} has {len(lst)} tensors, {label(0)} has {n_tensors}")
        seen = set()
        for i, t in enumerate(lst):
            if t is None:
                continue
            if t.dtype not in DTYPE_CODES:
                raise TypeError(f"{label(s)}[{i}] has dtype {t.dtype}; the Triton kernels take fp32, fp16 and bf16 "
                                "(use impl='foreach' or 'reference' for other dtypes)")
            if t.numel() != sizes[i]:
                raise ValueError(f"{label(s)}[{i}] has {t.numel()} elements, {label(0)}[{i}] has {sizes[i]}")
            if t.device != device:
                raise ValueError(f"{label(s)}[{i}] is on {t.device}, expected {device}")
            why = layout_reason(t, slots[0][i])
            if why:
                raise LayoutError(f"{label(s)}[{i}] {why}")
            ptrs[s, i] = t.data_ptr()
            codes[s, i] = DTYPE_CODES[t.dtype]
            seen.add(codes[s, i])
            aligned &= (t.data_ptr() % 16 == 0) or t.numel() == 0
        dt.append(int(next(iter(seen))) if len(seen) == 1 else (MIXED if seen else 0))

    sz = np.asarray(sizes, dtype=np.int64)
    per = (sz + block - 1) // block
    n_chunks = int(per.sum())
    chunk_t = np.repeat(np.arange(n_tensors, dtype=np.int64), per)
    first = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64) if n_tensors else np.zeros(0, np.int64)
    chunk_s = (np.arange(n_chunks, dtype=np.int64) - first[chunk_t]) * block
    if n_chunks < min_chunks:
        pad = min_chunks - n_chunks
        chunk_t = np.concatenate([chunk_t, np.zeros(pad, np.int64)])
        chunk_s = np.concatenate([chunk_s, np.zeros(pad, np.int64)])
        n_chunks = min_chunks

    flat = np.concatenate([ptrs.reshape(-1), codes.reshape(-1), sz, chunk_t, chunk_s])
    return _views(flat, device, n_slots, n_tensors, n_chunks, tuple(dt), aligned), flat


def _views(flat: np.ndarray, device, n_slots: int, n_tensors: int, n_chunks: int, dt: tuple, aligned: bool
           ) -> TensorTable:
    """The table whose device buffer is a copy of ``flat``: one host-to-device copy, from pinned memory and
    stream-ordered on CUDA (no host sync; kernels still reading an older table keep theirs); the views share it."""
    host = torch.from_numpy(flat)
    buf = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.clone()
    o = np.cumsum([0, n_slots * n_tensors, n_slots * n_tensors, n_tensors, n_chunks, n_chunks])
    v = [buf[o[k]:o[k + 1]] for k in range(5)]
    return TensorTable(v[0], v[1], v[2], v[3], v[4], n_tensors, n_chunks, dt, aligned)


def clear_cache() -> None:
    """Drop every cached table (tests; or to release device memory held by tables)."""
    _cache.clear()
    _keyed.clear()


# ----------------------------------------------------------------------------------------------------------
# Scalars: Python numbers are baked into the launch; 0-dim device tensors are read by pointer in the kernel
# ----------------------------------------------------------------------------------------------------------

_f32_memo: dict = {}


def f32(x: float) -> float:
    """``x`` rounded to fp32, as a Python float.

    Kernel float arguments are fp32 on the GPU but Python doubles in the interpreter; rounding on the host makes
    both see the same value, the one PyTorch uses when it multiplies an fp32 tensor by a Python scalar.  Memoized:
    a step passes the same hyperparameters every call (a dict lookup is a tenth of the numpy conversion)."""
    r = _f32_memo.get(x)
    if r is None:
        r = float(np.float32(x))
        if len(_f32_memo) > 4096:      # a schedule's changing values must not grow it without bound
            _f32_memo.clear()
        _f32_memo[x] = r
    return r


def scalar_arg(x, device: torch.device, dummy: Tensor) -> tuple[Tensor, float, int]:
    """``(pointer, value, mode)`` for a kernel scalar that may be ``None``, a number or a 0-dim tensor.

    * ``None`` → ``(dummy, 0.0, ABSENT)``
    * a number, or a one-element tensor on another device (e.g. a CPU ``step`` count beside CUDA parameters:
      reading it costs no device sync) → ``(dummy, f32(x), VALUE)``
    * a one-element tensor on ``device`` → ``(x, 0.0, POINTER)``: the kernel loads it; no ``.item()``, no sync.
    """
    if x is None:
        return dummy, 0.0, ABSENT
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a 0-dim (one-element) tensor, got shape {tuple(x.shape)}")
        if x.device == device:
            return x, 0.0, POINTER
        return dummy, f32(float(x.item())), VALUE
    return dummy, f32(float(x)), VALUE


@triton.jit
def read_scalar(ptr, val, MODE: tl.constexpr):
    """The fp32 value of a scalar passed as (pointer, value, mode); see :func:`scalar_arg`."""
    if MODE == 2:
        return tl.load(ptr).to(tl.float32)
    else:
        return val


# ----------------------------------------------------------------------------------------------------------
# Device-side helpers: typed access through an int64 address from the pointer table
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _typed(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _load_t(addr, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    p = _typed(addr, DTYPE, ALIGNED)
    if MASKED:
        x = tl.load(p + offs, mask=mask, other=0.0)
    else:
        x = tl.load(p + offs)
    return x.to(tl.float32)


@triton.jit
def load_f32(addr, offs, mask, code, DT: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Elements ``offs`` of the tensor at int64 address ``addr`` as fp32 (masked lanes read 0).

    ``DT`` is the slot's compile-time dtype (0 fp32, 1 fp16, 2 bf16, 3 mixed: branch on the runtime ``code``).
    ``MASKED`` False is for full blocks: no mask lets the compiler vectorize."""
    if DT == 0:
        x = _load_t(addr, offs, mask, tl.float32, ALIGNED, MASKED)
    elif DT == 1:
        x = _load_t(addr, offs, mask, tl.float16, ALIGNED, MASKED)
    elif DT == 2:
        x = _load_t(addr, offs, mask, tl.bfloat16, ALIGNED, MASKED)
    else:
        if code == 0:
            x = _load_t(addr, offs, mask, tl.float32, ALIGNED, MASKED)
        elif code == 1:
            x = _load_t(addr, offs, mask, tl.float16, ALIGNED, MASKED)
        else:
            x = _load_t(addr, offs, mask, tl.bfloat16, ALIGNED, MASKED)
    return x


@triton.jit
def _store_t(addr, offs, x, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    p = _typed(addr, DTYPE, ALIGNED)
    # .to() rounds to nearest even, like Tensor.copy_ from fp32
    if MASKED:
        tl.store(p + offs, x.to(DTYPE), mask=mask)
    else:
        tl.store(p + offs, x.to(DTYPE))


@triton.jit
def store_f32(addr, offs, x, mask, code, DT: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Store fp32 ``x`` into the tensor at ``addr`` in its own dtype (see :func:`load_f32` for the flags)."""
    if DT == 0:
        _store_t(addr, offs, x, mask, tl.float32, ALIGNED, MASKED)
    elif DT == 1:
        _store_t(addr, offs, x, mask, tl.float16, ALIGNED, MASKED)
    elif DT == 2:
        _store_t(addr, offs, x, mask, tl.bfloat16, ALIGNED, MASKED)
    else:
        if code == 0:
            _store_t(addr, offs, x, mask, tl.float32, ALIGNED, MASKED)
        elif code == 1:
            _store_t(addr, offs, x, mask, tl.float16, ALIGNED, MASKED)
        else:
            _store_t(addr, offs, x, mask, tl.bfloat16, ALIGNED, MASKED)


@triton.jit
def chunk_of(chunk_t, chunk_s, sizes, BLOCK: tl.constexpr):
    """(tensor index, first element, tensor numel) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(chunk_t + pid)
    # chunk starts are multiples of BLOCK by construction; saying so lets the compiler prove the alignment of
    # start + arange(BLOCK) and vectorize (with the pointer hint in _typed)
    start = tl.multiple_of(tl.load(chunk_s + pid), BLOCK)
    n = tl.load(sizes + t)
    return t, start, n


@triton.jit
def slot_addr(ptrs, codes, s, n_tensors, t, DT: tl.constexpr):
    """(int64 address, runtime dtype code) of tensor ``t`` of slot ``s``; the code is read only for mixed slots."""
    addr = tl.load(ptrs + s * n_tensors + t)
    if DT == 3:
        code = tl.load(codes + s * n_tensors + t)
    else:
        code = 0
    return addr, code


# ----------------------------------------------------------------------------------------------------------
# Per-device scratch
# ----------------------------------------------------------------------------------------------------------

_counters: dict = {}
_dummies: dict = {}


def dummy(device: torch.device) -> Tensor:
    """A 1-element fp32 tensor on ``device``: the pointer passed for absent scalars (never dereferenced)."""
    d = _dummies.get(device)
    if d is None:
        d = _dummies[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return d


def done_counter(device: torch.device) -> Tensor:
    """An int32 zero on ``device`` for the "last program finalizes" reductions, one per (device, stream).

    The kernels that use it count finished programs with an atomic add; the program that sees the last count
    writes the result and resets the counter to 0, so it is zero again after every launch (no memset launch).
    One per stream, because two launches running concurrently on different streams would share the count."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    c = _counters.get(key)
    if c is None:
        c = _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return c
