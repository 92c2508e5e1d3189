"""The fused FIP optimizer step, the perturbation ``θ ← θ + scale·g`` and the multi-tensor L2 norm.

Each public function makes exactly one Triton launch per call (zero when there is nothing to do) over every
tensor of its lists, through the tables of :mod:`.multi_tensor`.  Semantics are those of
:mod:`fip_fast.reference` (same names, same signatures); the kernels repeat the reference's order of fp32
operations so that, under the interpreter, results match it to the last bit in most elements (the tests allow
1e-6 relative).  On the GPU, LLVM may contract ``a·b + c`` into an FMA, which changes the last bit.

No ``torch.no_grad()`` around the public functions: a launch writes through raw pointers, which autograd never
sees, their small torch ops touch no tensor that requires grad, and the foreach fallbacks carry their own; the
decorator would cost microseconds of host time per call (the optimizer's step runs under no_grad anyway).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt
from ._launch_count import launch

#: elements per program for the elementwise kernels (8 fp32 per thread with 4 warps; 4 vector loads per slot)
BLOCK = 1024
NUM_WARPS = 4
#: partial sums the norm's last program reduces per iteration
RBLOCK = 1024


# ----------------------------------------------------------------------------------------------------------
# fip_step_
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _fip_step_block(
    a_p, a_g, a_gp, a_f0, a_a, a_m, a_f, a_e, c_p, c_g, c_gp, c_f0, c_a,
    offs, mask,
    lr, mix, rs, nps, bc, momentum, beta, one_minus_beta, eta_r, weight_decay, damping,
    DT_P: tl.constexpr, DT_G: tl.constexpr, DT_GP: tl.constexpr, DT_F0: tl.constexpr, DT_A: tl.constexpr,
    HAS_GP: tl.constexpr, RESTORE: tl.constexpr, HAS_ANCHOR: tl.constexpr, HAS_WD: tl.constexpr,
    PRECOND: tl.constexpr, NESTEROV: tl.constexpr, HAS_PERT: tl.constexpr,
    ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    # The order of operations below is the reference's (fip_fast.reference.fip_step_), step by step.
    g = mt.load_f32(a_g, offs, mask, c_g, DT_G, ALIGNED, MASKED)
    theta = mt.load_f32(a_p, offs, mask, c_p, DT_P, ALIGNED, MASKED)
    # 1. restore the point the gradients were taken at
    if RESTORE == 1:
        theta = theta - mt.load_f32(a_e, offs, mask, 0, 0, ALIGNED, MASKED)
    elif RESTORE == 2:
        theta = theta - rs * g
    # 2. direction
    if HAS_GP:
        d = g + mix * (mt.load_f32(a_gp, offs, mask, c_gp, DT_GP, ALIGNED, MASKED) - g)
    else:
        d = g
    if HAS_ANCHOR:
        if a_f0 != 0:  # per-tensor: F0/θ0 may be None for some tensors (null pointer in the table)
            f0 = mt.load_f32(a_f0, offs, mask, c_f0, DT_F0, ALIGNED, MASKED)
            th0 = mt.load_f32(a_a, offs, mask, c_a, DT_A, ALIGNED, MASKED)
            d = d + (eta_r * f0) * (theta - th0)
    if HAS_WD:
        d = d + weight_decay * theta
    # 3. Fisher EMA on g
    f = mt.load_f32(a_f, offs, mask, 0, 0, ALIGNED, MASKED)
    f = beta * f + (one_minus_beta * g) * g
    mt.store_f32(a_f, offs, f, mask, 0, 0, ALIGNED, MASKED)
    # 4. NGF-style preconditioning with the bias-corrected Fisher
    if PRECOND:
        d = d / (f / bc + damping)
    # 5. momentum
    buf = mt.load_f32(a_m, offs, mask, 0, 0, ALIGNED, MASKED)
    buf = momentum * buf + d
    mt.store_f32(a_m, offs, buf, mask, 0, 0, ALIGNED, MASKED)
    if NESTEROV:
        u = d + momentum * buf
    else:
        u = buf
    theta = theta - lr * u
    # 6. next lagged perturbation e = nps·g (nps = 0 when none is scheduled): stored only, not applied (the
    #    optimizer applies it with perturb_ at the next training forward)
    if HAS_PERT:
        mt.store_f32(a_e, offs, nps * g, mask, 0, 0, ALIGNED, MASKED)
    mt.store_f32(a_p, offs, theta, mask, c_p, DT_P, ALIGNED, MASKED)


@triton.jit(do_not_specialize=["n_tensors"])
def _fip_step_kernel(
    ptrs, codes, sizes, chunk_t, chunk_s, n_tensors,
    lr_ptr, lr_val, mix_ptr, mix_val, rs_ptr, rs_val, nps_ptr, nps_val, bc_ptr, bc_val, fi_ptr,
    momentum, beta, one_minus_beta, eta_r, weight_decay, damping,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    DT_P: tl.constexpr, DT_G: tl.constexpr, DT_GP: tl.constexpr, DT_F0: tl.constexpr, DT_A: tl.constexpr,
    HAS_GP: tl.constexpr, RESTORE: tl.constexpr, HAS_ANCHOR: tl.constexpr, HAS_WD: tl.constexpr,
    PRECOND: tl.constexpr, NESTEROV: tl.constexpr, HAS_PERT: tl.constexpr,
    LR_MODE: tl.constexpr, MIX_MODE: tl.constexpr, RS_MODE: tl.constexpr, NPS_MODE: tl.constexpr,
    BC_MODE: tl.constexpr, FI_MODE: tl.constexpr,
):
    """One program = one chunk of ``BLOCK`` elements of one tensor, in all eight slots (see ``fip_step_``)."""
    if FI_MODE == 2:
        # non-finite gradients: the whole launch writes nothing (read on the device, no host sync)
        if tl.load(fi_ptr) != 0:
            return
    t, start, n = mt.chunk_of(chunk_t, chunk_s, sizes, BLOCK)
    a_p, c_p = mt.slot_addr(ptrs, codes, 0, n_tensors, t, DT_P)
    a_g, c_g = mt.slot_addr(ptrs, codes, 1, n_tensors, t, DT_G)
    a_gp, c_gp = mt.slot_addr(ptrs, codes, 2, n_tensors, t, DT_GP)
    a_f0, c_f0 = mt.slot_addr(ptrs, codes, 3, n_tensors, t, DT_F0)
    a_a, c_a = mt.slot_addr(ptrs, codes, 4, n_tensors, t, DT_A)
    a_m = tl.load(ptrs + 5 * n_tensors + t)
    a_f = tl.load(ptrs + 6 * n_tensors + t)
    a_e = tl.load(ptrs + 7 * n_tensors + t)

    lr = mt.read_scalar(lr_ptr, lr_val, LR_MODE)
    mix = mt.read_scalar(mix_ptr, mix_val, MIX_MODE)
    rs = mt.read_scalar(rs_ptr, rs_val, RS_MODE)
    nps = mt.read_scalar(nps_ptr, nps_val, NPS_MODE)
    # The bias correction 1 − β^t of the preconditioner (fp32), computed by the wrapper: BC_MODE 1 one host value,
    # 2 one device value bc_ptr[0] (one step count for all tensors), 3 per tensor bc_ptr[t] (each tensor's own
    # step count); 0 when not preconditioning.
    if BC_MODE == 3:
        bc = tl.load(bc_ptr + t)
    elif BC_MODE == 2:
        bc = tl.load(bc_ptr)
    else:
        bc = bc_val

    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    if start + BLOCK <= n:
        _fip_step_block(a_p, a_g, a_gp, a_f0, a_a, a_m, a_f, a_e, c_p, c_g, c_gp, c_f0, c_a, offs, None,
                        lr, mix, rs, nps, bc, momentum, beta, one_minus_beta, eta_r, weight_decay, damping,
                        DT_P, DT_G, DT_GP, DT_F0, DT_A, HAS_GP, RESTORE, HAS_ANCHOR, HAS_WD, PRECOND, NESTEROV,
                        HAS_PERT, ALIGNED, False)
    else:
        _fip_step_block(a_p, a_g, a_gp, a_f0, a_a, a_m, a_f, a_e, c_p, c_g, c_gp, c_f0, c_a, offs, offs < n,
                        lr, mix, rs, nps, bc, momentum, beta, one_minus_beta, eta_r, weight_decay, damping,
                        DT_P, DT_G, DT_GP, DT_F0, DT_A, HAS_GP, RESTORE, HAS_ANCHOR, HAS_WD, PRECOND, NESTEROV,
                        HAS_PERT, ALIGNED, True)


#: BC_MODE of _fip_step_kernel for one bias correction per tensor (``bc_ptr[t]``); 0–2 are mt.ABSENT/VALUE/POINTER
PER_TENSOR = 3

_betas: dict = {}


def _beta_tensor(beta: float, device: torch.device) -> Tensor:
    """fp32 β as a 0-dim tensor on ``device`` (cached: a fill, never a host-to-device copy)."""
    key = (mt.f32(beta), device)
    b = _betas.get(key)
    if b is None:
        if len(_betas) > 64:
            _betas.clear()
        b = _betas[key] = torch.full((), beta, dtype=torch.float32, device=device)
    return b


def _host_step(s) -> float:
    return float(s.item()) if isinstance(s, Tensor) else float(s)


def bias_correction(beta: float, step, n: int, device: torch.device, dummy: Tensor) -> tuple[Tensor, float, int]:
    """``(bc_ptr, bc_val, BC_MODE)`` for the preconditioner's fp32 bias correction 1 − β^t.

    ``step`` is one count for every tensor (a number, or a one-element tensor) or a sequence of ``n`` counts, one
    per tensor.  Computed as the reference does (fp32 β, fp32 t, torch's fp32 pow, fp32 subtraction):

    * host values only (numbers, tensors on another device): decided on the host; one value (``VALUE``) when all
      are equal, else a (n,) fp32 vector uploaded once per call (``PER_TENSOR``);
    * counts on ``device``: torch ops on the device, no ``.item()``, no host sync — a 0-dim tensor for one count
      (``POINTER``), a (n,) vector ``1 − β^stack(steps)`` for a sequence (``PER_TENSOR``).
    """
    b32 = mt.f32(beta)
    if not isinstance(step, (list, tuple)):
        if isinstance(step, Tensor):
            if step.numel() != 1:
                raise ValueError(f"step must be a number or a one-element tensor, got shape {tuple(step.shape)}")
            if step.device == device:
                return 1.0 - _beta_tensor(beta, device) ** step.reshape(()).to(torch.float32), 0.0, mt.POINTER
        t = mt.f32(_host_step(step))
        return dummy, mt.f32(1.0 - mt.f32(b32 ** t)), mt.VALUE
    if len(step) != n:
        raise ValueError(f"step has {len(step)} entries, params has {n} (one step count per tensor)")
    for i, s in enumerate(step):
        if isinstance(s, Tensor) and s.numel() != 1:
            raise ValueError(f"step[{i}] must be a number or a one-element tensor, got shape {tuple(s.shape)}")
    on_dev = [isinstance(s, Tensor) and s.device == device for s in step]
    if not any(on_dev):
        t = torch.tensor([_host_step(s) for s in step], dtype=torch.float32)
        bc = 1.0 - torch.tensor(beta, dtype=torch.float32) ** t
        if n and bool((bc == bc[0]).all()):
            return dummy, float(bc[0]), mt.VALUE
        return bc.to(device), 0.0, PER_TENSOR
    ts = [s.reshape(()).to(torch.float32) if d else torch.full((), _host_step(s), dtype=torch.float32, device=device)
          for s, d in zip(step, on_dev)]
    return 1.0 - _beta_tensor(beta, device) ** torch.stack(ts), 0.0, PER_TENSOR


_FIP_SLOTS = ("params", "grads", "grads_pert", "fisher0", "anchor", "momentum_buf", "fisher", "pert")


def _check_step_lists(momentum_buf, fisher, pert, fisher0, anchor, has_anchor: bool) -> None:
    for name, lst in (("momentum_buf", momentum_buf), ("fisher", fisher), ("pert", pert)):
        if lst is not None and any(t.dtype != torch.float32 for t in lst):
            raise TypeError(f"{name} must be fp32 state (the kernels update it in fp32)")
    if has_anchor:
        for i, (f0, a) in enumerate(zip(fisher0, anchor)):
            if (f0 is None) != (a is None):
                raise ValueError(f"fisher0[{i}] and anchor[{i}] must be both given or both None")


def fip_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    grads_pert: Optional[Sequence[Tensor]],
    fisher0: Sequence[Optional[Tensor]],
    anchor: Sequence[Optional[Tensor]],
    momentum_buf: Sequence[Tensor],
    fisher: Sequence[Tensor],
    pert: Optional[Sequence[Tensor]],
    *,
    lr, momentum: float, nesterov: bool, weight_decay: float, eta_r: float, beta: float, mix, restore_scale,
    precondition: bool, damping: float, step, next_pert_scale, found_inf, cache_key=None,
) -> None:
    """One FIP optimizer step over every tensor in one launch; the contract of
    :func:`fip_fast.reference.fip_step_` (restore, direction, anchor, weight decay, Fisher EMA,
    preconditioning, momentum, update, next lagged perturbation), in place, no allocation on a table-cache hit.

    Shapes: ``params[i]``, ``grads[i]``, ``grads_pert[i]``, ``fisher0[i]``, ``anchor[i]`` any shape, dtype fp32,
    fp16 or bf16 (mixed within a list is fine); ``momentum_buf[i]``, ``fisher[i]``, ``pert[i]`` fp32 state of
    the same number of elements.  All contiguous, on one device.

    Scalars ``lr``, ``mix``, ``restore_scale``, ``next_pert_scale``, ``step``, ``found_inf`` may be Python
    numbers or one-element tensors; tensors on the parameters' device are read by the kernel (no host sync).
    ``step`` may also be a sequence with one count per tensor (each parameter's ``state["step"]``): the
    preconditioner then uses each tensor's own bias correction 1 − β^t_i (see :func:`bias_correction`; with
    device counts that is a few small torch ops on the device before the launch, no host sync).
    A non-zero ``found_inf`` tensor makes every program return before writing: parameters and state keep their
    bits.  A non-zero ``found_inf`` number skips the launch.

    Lagged estimator (``pert`` given): θ ← θ − pert first; at the end pert ← next_pert_scale·g (0 when None) is
    *stored only* — θ is not perturbed by this call (the optimizer applies pert later with ``perturb_``).
    """
    if not params:
        return
    if found_inf is not None and not isinstance(found_inf, Tensor):
        if found_inf != 0:
            return
        found_inf = None
    if pert is not None:
        restore = 1
    elif restore_scale is not None:
        restore = 2
    else:
        restore = 0
    # With a caller's key the anchor slots go in whenever eta_r ≠ 0 (None entries are null pointers the kernel
    # skips), so that the slots are known without a pass over fisher0; without one, only if some F0 is given.
    has_anchor = eta_r != 0.0 and (cache_key is not None or any(f is not None for f in fisher0))
    absent = (False, False, grads_pert is None, not has_anchor, not has_anchor, False, False, pert is None)
    device = params[0].device
    slots = (params, grads, grads_pert, fisher0 if has_anchor else None, anchor if has_anchor else None,
             momentum_buf, fisher, pert)
    tab = mt.cached_table(cache_key, BLOCK, 0, _FIP_SLOTS, absent, slots, (1, 2))
    if tab is None:                          # checked and built once per table
        _check_step_lists(momentum_buf, fisher, pert, fisher0, anchor, has_anchor)
        try:
            tab = mt.tensor_table(slots, BLOCK, device, names=_FIP_SLOTS, key=cache_key, moving_slots=(1, 2))
        except mt.LayoutError as exc:
            mt.fallback("fip_step_", str(exc))
            from fip_fast.backends import foreach as _foreach
            return _foreach.fip_step_(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, lr=lr,
                                      momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta_r=eta_r,
                                      beta=beta, mix=mix, restore_scale=restore_scale, precondition=precondition,
                                      damping=damping, step=step, next_pert_scale=next_pert_scale,
                                      found_inf=found_inf)
    if tab.n_chunks == 0:
        return
    dmy = mt.dummy(device)
    lr_t, lr_v, lr_m = mt.scalar_arg(lr, device, dmy)
    mix_t, mix_v, mix_m = mt.scalar_arg(mix if grads_pert is not None else None, device, dmy)
    rs_t, rs_v, rs_m = mt.scalar_arg(restore_scale if restore == 2 else None, device, dmy)
    nps_t, nps_v, nps_m = mt.scalar_arg(0.0 if next_pert_scale is None else next_pert_scale, device, dmy)
    fi_t, _, fi_m = mt.scalar_arg(found_inf, device, dmy)
    if fi_m == mt.VALUE:        # a CPU flag beside device tensors: decided on the host without a device sync
        if float(found_inf.item()) != 0.0:
            return
        fi_m = mt.ABSENT
    bc_t, bc_v, bc_m = (bias_correction(beta, step, len(params), device, dmy) if precondition
                        else (dmy, 1.0, mt.ABSENT))
    if lr_m == mt.ABSENT or (grads_pert is not None and mix_m == mt.ABSENT):
        raise ValueError("lr (and mix, when grads_pert is given) must not be None")
    launch(
        _fip_step_kernel, (tab.n_chunks,),
        tab.ptrs, tab.codes, tab.sizes, tab.chunk_t, tab.chunk_s, tab.n_tensors,
        lr_t, lr_v, mix_t, mix_v, rs_t, rs_v, nps_t, nps_v, bc_t, bc_v, fi_t,
        mt.f32(momentum), mt.f32(beta), mt.f32(1.0 - beta), mt.f32(eta_r), mt.f32(weight_decay), mt.f32(damping),
        BLOCK=BLOCK, ALIGNED=tab.aligned,
        DT_P=tab.dt[0], DT_G=tab.dt[1], DT_GP=tab.dt[2], DT_F0=tab.dt[3], DT_A=tab.dt[4],
        HAS_GP=grads_pert is not None, RESTORE=restore, HAS_ANCHOR=has_anchor, HAS_WD=weight_decay != 0.0,
        PRECOND=bool(precondition), NESTEROV=bool(nesterov), HAS_PERT=pert is not None,
        LR_MODE=lr_m, MIX_MODE=mix_m, RS_MODE=rs_m, NPS_MODE=nps_m, BC_MODE=bc_m, FI_MODE=fi_m,
        num_warps=NUM_WARPS, device=device,
    )


# ----------------------------------------------------------------------------------------------------------
# perturb_
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _perturb_block(a_p, a_g, c_p, c_g, offs, mask, scale,
                   DT_P: tl.constexpr, DT_G: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    theta = mt.load_f32(a_p, offs, mask, c_p, DT_P, ALIGNED, MASKED)
    g = mt.load_f32(a_g, offs, mask, c_g, DT_G, ALIGNED, MASKED)
    mt.store_f32(a_p, offs, theta + scale * g, mask, c_p, DT_P, ALIGNED, MASKED)


@triton.jit(do_not_specialize=["n_tensors"])
def _perturb_kernel(ptrs, codes, sizes, chunk_t, chunk_s, n_tensors, sc_ptr, sc_val, fi_ptr,
                    BLOCK: tl.constexpr, ALIGNED: tl.constexpr, DT_P: tl.constexpr, DT_G: tl.constexpr,
                    SC_MODE: tl.constexpr, FI_MODE: tl.constexpr):
    """θ ← θ + scale·g for one chunk of one tensor."""
    if FI_MODE == 2:
        if tl.load(fi_ptr) != 0:
            return
    t, start, n = mt.chunk_of(chunk_t, chunk_s, sizes, BLOCK)
    a_p, c_p = mt.slot_addr(ptrs, codes, 0, n_tensors, t, DT_P)
    a_g, c_g = mt.slot_addr(ptrs, codes, 1, n_tensors, t, DT_G)
    scale = mt.read_scalar(sc_ptr, sc_val, SC_MODE)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    if start + BLOCK <= n:
        _perturb_block(a_p, a_g, c_p, c_g, offs, None, scale, DT_P, DT_G, ALIGNED, False)
    else:
        _perturb_block(a_p, a_g, c_p, c_g, offs, offs < n, scale, DT_P, DT_G, ALIGNED, True)


def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale, found_inf=None, cache_key=None) -> None:
    """θ ← θ + scale·g for every pair, one launch (fp32 math, result in θ's dtype); nothing is written when
    ``found_inf`` is non-zero (a device tensor is read by the kernel).  See :func:`fip_fast.reference.perturb_`."""
    if not params:
        return
    device = params[0].device
    dmy = mt.dummy(device)
    fi_t, _, fi_m = mt.scalar_arg(found_inf, device, dmy)
    if fi_m == mt.VALUE:
        if float(found_inf.item() if isinstance(found_inf, Tensor) else found_inf) != 0.0:
            return
        fi_m = mt.ABSENT
    try:
        tab = mt.tensor_table((params, grads), BLOCK, device, names=("params", "grads"), key=cache_key,
                              moving_slots=(1,))
    except mt.LayoutError as exc:
        mt.fallback("perturb_", str(exc))
        from fip_fast.backends import foreach as _foreach
        return _foreach.perturb_(params, grads, scale, found_inf)
    if tab.n_chunks == 0:
        return
    sc_t, sc_v, sc_m = mt.scalar_arg(scale, device, dmy)
    launch(_perturb_kernel, (tab.n_chunks,), tab.ptrs, tab.codes, tab.sizes, tab.chunk_t, tab.chunk_s,
           tab.n_tensors, sc_t, sc_v, fi_t, BLOCK=BLOCK, ALIGNED=tab.aligned, DT_P=tab.dt[0], DT_G=tab.dt[1],
           SC_MODE=sc_m, FI_MODE=fi_m, num_warps=NUM_WARPS, device=device)


# ----------------------------------------------------------------------------------------------------------
# global_norm
# ----------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def _norm_kernel(ptrs, codes, sizes, chunk_t, chunk_s, n_tensors, n_chunks, partial, counter, norm_out, inf_out,
                 BLOCK: tl.constexpr, RBLOCK: tl.constexpr, ALIGNED: tl.constexpr, DT: tl.constexpr):
    """Stage 1: each program writes the fp32 sum of squares of its chunk to ``partial[pid]``.  Stage 2, in the
    same launch: the program that finishes last (atomic ticket on ``counter``) sums ``partial`` in index order
    (deterministic, unlike an atomic float accumulation), writes ‖·‖₂ and the non-finite flag, and resets
    ``counter`` to 0 for the next launch."""
    pid = tl.program_id(0)
    t, start, n = mt.chunk_of(chunk_t, chunk_s, sizes, BLOCK)
    a, c = mt.slot_addr(ptrs, codes, 0, n_tensors, t, DT)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    if start + BLOCK <= n:
        x = mt.load_f32(a, offs, None, c, DT, ALIGNED, False)
    else:
        x = mt.load_f32(a, offs, offs < n, c, DT, ALIGNED, True)   # masked lanes read 0
    tl.store(partial + pid, tl.sum(x * x, axis=0))
    # acq_rel (the default): orders the store above before the ticket, and the loads below after it
    ticket = tl.atomic_add(counter, 1)
    if ticket == n_chunks - 1:
        acc = tl.zeros([RBLOCK], dtype=tl.float32)
        for i in range(0, n_chunks, RBLOCK):
            idx = i + tl.arange(0, RBLOCK)
            # .cg: bypass L1, which may hold lines of `partial` from an earlier launch on this SM
            acc += tl.load(partial + idx, mask=idx < n_chunks, other=0.0, cache_modifier=".cg")
        sq = tl.sum(acc, axis=0)
        tl.store(norm_out, tl.sqrt(sq))
        # NaN ≠ NaN; an overflowed sum of squares (+inf) counts as non-finite, like the reference
        tl.store(inf_out, tl.where((sq != sq) | (sq == float("inf")), 1.0, 0.0))
        tl.store(counter, 0)


def global_norm(tensors: Sequence[Optional[Tensor]], cache_key=None) -> tuple[Tensor, Tensor]:
    """(‖concat(tensors)‖₂, found_inf) as 0-dim fp32 tensors on the tensors' device, in one launch.

    ``None`` entries are skipped; fp32/fp16/bf16 may be mixed.  The sum of squares is fp32 (as the reference),
    so an overflow to +inf also sets ``found_inf``.  Deterministic: per-chunk partial sums are reduced in a fixed
    order by the last program.  An empty list (or all ``None``) returns CPU zeros, like the reference.
    """
    tab = mt.cached_table(cache_key, BLOCK, 1, ("tensors",), (False,), (tensors,), (0,))
    if tab is None:
        ts = [t for t in tensors if t is not None]
        if not ts:
            return torch.zeros(()), torch.zeros(())
        # any dense layout is summed in place (the sum of squares does not depend on the order); strided views are
        # copied to a dense tensor first (such a call is not cached under the key: the copies are temporaries)
        dense = [t if t.numel() <= 1 or mt.is_dense(t) else t.contiguous() for t in ts]
        key = cache_key if all(a is b for a, b in zip(dense, ts)) else None
        # min_chunks=1: one program runs even when every tensor is empty, and writes norm 0, found_inf 0
        tab = mt.tensor_table((dense,), BLOCK, dense[0].device, min_chunks=1, names=("tensors",), key=key,
                              moving_slots=(0,))
    device = tab.ptrs.device
    partial = torch.empty(tab.n_chunks, dtype=torch.float32, device=device)
    norm = torch.empty((), dtype=torch.float32, device=device)
    found = torch.empty((), dtype=torch.float32, device=device)
    launch(_norm_kernel, (tab.n_chunks,), tab.ptrs, tab.codes, tab.sizes, tab.chunk_t, tab.chunk_s,
           tab.n_tensors, tab.n_chunks, partial, mt.done_counter(device), norm, found,
           BLOCK=BLOCK, RBLOCK=RBLOCK, ALIGNED=tab.aligned, DT=tab.dt[0], num_warps=NUM_WARPS, device=device)
    return norm, found
