"""``fisher_accumulate_``: F ← β·F + α·g² over every tensor of the lists in one Triton launch (no ``no_grad``
wrapper: see :mod:`.fip_step`)."""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt
from ._launch_count import launch
from .fip_step import BLOCK, NUM_WARPS


@triton.jit
def _fisher_block(a_f, a_g, c_f, c_g, offs, mask, beta, alpha,
                  DT_F: tl.constexpr, DT_G: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    f = mt.load_f32(a_f, offs, mask, c_f, DT_F, ALIGNED, MASKED)
    g = mt.load_f32(a_g, offs, mask, c_g, DT_G, ALIGNED, MASKED)
    # the reference's order: β·F + α·(g·g)
    mt.store_f32(a_f, offs, beta * f + alpha * (g * g), mask, c_f, DT_F, ALIGNED, MASKED)


@triton.jit(do_not_specialize=["n_tensors"])
def _fisher_kernel(ptrs, codes, sizes, chunk_t, chunk_s, n_tensors, b_ptr, b_val, a_ptr, a_val,
                   BLOCK: tl.constexpr, ALIGNED: tl.constexpr, DT_F: tl.constexpr, DT_G: tl.constexpr,
                   B_MODE: tl.constexpr, A_MODE: tl.constexpr):
    """F ← β·F + α·g² for one chunk of one tensor."""
    t, start, n = mt.chunk_of(chunk_t, chunk_s, sizes, BLOCK)
    a_f, c_f = mt.slot_addr(ptrs, codes, 0, n_tensors, t, DT_F)
    a_g, c_g = mt.slot_addr(ptrs, codes, 1, n_tensors, t, DT_G)
    beta = mt.read_scalar(b_ptr, b_val, B_MODE)
    alpha = mt.read_scalar(a_ptr, a_val, A_MODE)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    if start + BLOCK <= n:
        _fisher_block(a_f, a_g, c_f, c_g, offs, None, beta, alpha, DT_F, DT_G, ALIGNED, False)
    else:
        _fisher_block(a_f, a_g, c_f, c_g, offs, offs < n, beta, alpha, DT_F, DT_G, ALIGNED, True)


def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta, alpha, cache_key=None) -> None:
    """F ← β·F + α·g² for every pair, in place, one launch (see :func:`fip_fast.reference.fisher_accumulate_`).

    ``fisher[i]`` and ``grads[i]``: same number of elements, fp32/fp16/bf16 (fp32 math; ``fisher`` is normally
    fp32 state).  ``beta``, ``alpha``: numbers or one-element tensors (read on the device, no sync)."""
    if not fisher:
        return
    device = fisher[0].device
    try:
        tab = mt.tensor_table((fisher, grads), BLOCK, device, names=("fisher", "grads"), key=cache_key,
                              moving_slots=(1,))
    except mt.LayoutError as exc:
        mt.fallback("fisher_accumulate_", str(exc))
        from fip_fast.backends import foreach as _foreach
        return _foreach.fisher_accumulate_(fisher, grads, beta, alpha)
    if tab.n_chunks == 0:
        return
    dmy = mt.dummy(device)
    b_t, b_v, b_m = mt.scalar_arg(beta, device, dmy)
    a_t, a_v, a_m = mt.scalar_arg(alpha, device, dmy)
    launch(_fisher_kernel, (tab.n_chunks,), tab.ptrs, tab.codes, tab.sizes, tab.chunk_t, tab.chunk_s,
           tab.n_tensors, b_t, b_v, a_t, a_v, BLOCK=BLOCK, ALIGNED=tab.aligned, DT_F=tab.dt[0], DT_G=tab.dt[1],
           B_MODE=b_m, A_MODE=a_m, num_warps=NUM_WARPS, device=device)
