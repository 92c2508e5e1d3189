"""Ahead-of-time compilation of every kernel variant for a GPU target — a lowering check without a GPU.

``python -m fip_fast.kernels._aot`` (with ``TRITON_INTERPRET`` unset or 0: the interpreter replaces
``triton.jit`` functions at import time) compiles each kernel for ``GPUTarget("cuda", 90, 32)`` through
``triton.compile(ASTSource(...))``: Triton IR → TTGIR → LLVM → PTX → cubin.  This catches typing and lowering
errors the interpreter does not see — bf16 included, whose arithmetic the interpreter gets wrong — in
~0.1–0.3 s per variant.  It does not run anything: numerics on a GPU are not checked by it.

The variants cover each compile-time switch of each kernel in both states, and every parameter dtype
(fp32, fp16, bf16 and a per-tensor mixed list) for the elementwise kernels.
"""
from __future__ import annotations

import itertools
import sys
import time
from typing import Iterator

#: pointer types of the table arguments shared by the multi-tensor kernels
_TABLE = {"ptrs": "*i64", "codes": "*i64", "sizes": "*i64", "chunk_t": "*i64", "chunk_s": "*i64", "n_tensors": "i32"}
_DT_NAMES = {0: "fp32", 1: "fp16", 2: "bf16", 3: "mixed"}


def _fip_step_variants() -> Iterator[tuple[str, dict, dict]]:
    sig = dict(_TABLE)
    for name in ("lr", "mix", "rs", "nps"):
        sig[f"{name}_ptr"] = "*fp32"
        sig[f"{name}_val"] = "fp32"
    sig.update(bc_ptr="*fp32", bc_val="fp32", fi_ptr="*fp32")
    for name in ("momentum", "beta", "one_minus_beta", "eta_r", "weight_decay", "damping"):
        sig[name] = "fp32"
    flags = ("HAS_GP", "RESTORE", "HAS_ANCHOR", "HAS_WD", "PRECOND", "NESTEROV", "HAS_PERT")
    modes = ("LR_MODE", "MIX_MODE", "RS_MODE", "NPS_MODE", "BC_MODE", "FI_MODE")
    configs = {
        # nothing optional: plain momentum SGD, host scalars
        "minimal": dict(HAS_GP=False, RESTORE=0, HAS_ANCHOR=False, HAS_WD=False, PRECOND=False, NESTEROV=False,
                        HAS_PERT=False, LR_MODE=1, MIX_MODE=0, RS_MODE=0, NPS_MODE=1, BC_MODE=0, FI_MODE=0),
        # closure fd step: g' given, restore by scale, anchor, wd, preconditioning with a host step count
        "fd": dict(HAS_GP=True, RESTORE=2, HAS_ANCHOR=True, HAS_WD=True, PRECOND=True, NESTEROV=True,
                   HAS_PERT=False, LR_MODE=2, MIX_MODE=2, RS_MODE=2, NPS_MODE=1, BC_MODE=1, FI_MODE=2),
        # lagged estimator with every scalar on the device, per-tensor step counts
        "lagged": dict(HAS_GP=False, RESTORE=1, HAS_ANCHOR=True, HAS_WD=True, PRECOND=True, NESTEROV=False,
                       HAS_PERT=True, LR_MODE=2, MIX_MODE=0, RS_MODE=0, NPS_MODE=2, BC_MODE=3, FI_MODE=2),
    }
    for dt, (cname, cfg), aligned in itertools.product((0, 1, 2, 3), configs.items(), (True, False)):
        if not aligned and (dt != 0 or cname != "lagged"):
            continue
        const = dict(BLOCK=1024, ALIGNED=aligned, DT_P=dt, DT_G=dt, DT_GP=dt, DT_F0=dt, DT_A=dt, **cfg)
        assert set(flags) | set(modes) <= set(const)
        yield f"fip_step[{_DT_NAMES[dt]},{cname},aligned={aligned}]", sig, const


def _perturb_variants():
    sig = dict(_TABLE, sc_ptr="*fp32", sc_val="fp32", fi_ptr="*fp32")
    for dt, (scm, fim) in itertools.product((0, 1, 2, 3), ((1, 0), (2, 2))):
        yield (f"perturb[{_DT_NAMES[dt]},scale_mode={scm},found_inf_mode={fim}]", sig,
               dict(BLOCK=1024, ALIGNED=True, DT_P=dt, DT_G=dt, SC_MODE=scm, FI_MODE=fim))


def _fisher_variants():
    sig = dict(_TABLE, b_ptr="*fp32", b_val="fp32", a_ptr="*fp32", a_val="fp32")
    for dt_g, m in itertools.product((0, 1, 2, 3), (1, 2)):
        yield (f"fisher[grads={_DT_NAMES[dt_g]},scalar_mode={m}]", sig,
               dict(BLOCK=1024, ALIGNED=True, DT_F=0, DT_G=dt_g, B_MODE=m, A_MODE=m))


def _norm_variants():
    sig = dict(_TABLE, n_chunks="i32", partial="*fp32", counter="*i32", norm_out="*fp32", inf_out="*fp32")
    for dt in (0, 1, 2, 3):
        yield f"global_norm[{_DT_NAMES[dt]}]", sig, dict(BLOCK=1024, RBLOCK=1024, ALIGNED=True, DT=dt)


def _spectral_weight_variants():
    for ty, res, rel in itertools.product(("fp32", "fp16", "bf16"), (False, True), (False, True)):
        p = f"*{ty}"
        sig = dict(U=p, S=p, D=p, Vh=p, R=p, W=p, m="i32", n="i32", r="i32")
        sig.update({k: "i32" for k in ("s_um", "s_uk", "s_vk", "s_vn", "s_rm", "s_rn", "s_wm", "s_wn")})
        yield (f"spectral_weight[{ty},residual={res},relative={rel}]", sig,
               dict(HAS_RES=res, RELATIVE=rel, BM=64, BN=64, BK=32))


def _spectral_grad_variants():
    for ty, rel in itertools.product(("fp32", "fp16", "bf16"), (False, True)):
        sig = dict(A="*fp32", B="*fp32", S=f"*{ty}", D=f"*{ty}", PS_SQ="*fp32", PARTIAL="*fp32", GRAD="*fp32",
                   counter="*i32", N="i32", T="i32", r="i32", n_programs="i32")
        yield f"spectral_linear_grad[S={ty},relative={rel}]", sig, dict(RELATIVE=rel, BR=32, BT=16, NB=16)


#: the default (CI) subset: every kernel, every parameter dtype, the switch settings with the most code
SUBSET = (
    "fip_step[fp32,fd,aligned=True]", "fip_step[fp32,lagged,aligned=True]", "fip_step[fp32,lagged,aligned=False]",
    "fip_step[fp16,lagged,aligned=True]", "fip_step[bf16,lagged,aligned=True]", "fip_step[mixed,fd,aligned=True]",
    "perturb[bf16,scale_mode=2,found_inf_mode=2]", "perturb[mixed,scale_mode=2,found_inf_mode=2]",
    "fisher[grads=bf16,scalar_mode=2]", "fisher[grads=mixed,scalar_mode=2]",
    "global_norm[bf16]", "global_norm[mixed]",
    "spectral_weight[fp32,residual=True,relative=True]", "spectral_weight[bf16,residual=True,relative=True]",
    "spectral_linear_grad[S=bf16,relative=True]",
)


def variants(subset: bool = False):
    """(kernel, label, signature, constexprs) for every variant compiled by :func:`compile_all` (only those
    in :data:`SUBSET` when ``subset``)."""
    from . import fip_step, fisher, spectral
    groups = ((fip_step._fip_step_kernel, _fip_step_variants()), (fip_step._perturb_kernel, _perturb_variants()),
              (fisher._fisher_kernel, _fisher_variants()), (fip_step._norm_kernel, _norm_variants()),
              (spectral._spectral_weight_kernel, _spectral_weight_variants()),
              (spectral._spectral_grad_kernel, _spectral_grad_variants()))
    for kernel, vs in groups:
        for label, sig, const in vs:
            if subset and label not in SUBSET:
                continue
            full = {name: ("constexpr" if name in const else sig[name]) for name in kernel.arg_names}
            yield kernel, label, full, const


#: ``ASTSource(fn, signature, constexprs=...)`` is the API of triton 3.3 and newer (3.2 took ``constants=`` with
#: another signature format); the kernels themselves run on triton 3.2 too, only this check needs 3.3.
MIN_TRITON_AOT = (3, 3)


def aot_supported() -> tuple[bool, str]:
    """(ok, reason): can this triton compile the variants ahead of time?"""
    import triton

    have = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in triton.__version__.split(".")[:2])
    if have < MIN_TRITON_AOT:
        return False, f"the AOT check needs triton >= 3.3 (ASTSource's constexprs API); this is {triton.__version__}"
    return True, ""


def compile_all(arch: int = 90, warp_size: int = 32, verbose: bool = False, subset: bool = False) -> list[dict]:
    """Compile every variant for ``GPUTarget("cuda", arch, warp_size)``; returns one record per variant:
    ``label``, ``seconds``, ``ptx_v4`` (128-bit vector loads in the PTX), ``cubin_bytes``.  Raises on the
    first failure (with the variant's label)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    ok, why = aot_supported()
    if not ok:
        raise RuntimeError(why)
    target = GPUTarget("cuda", arch, warp_size)
    out = []
    labels = [v[1] for v in variants(subset)]
    if subset:
        missing = set(SUBSET) - set(labels)
        assert not missing, f"SUBSET names unknown variants: {sorted(missing)}"
    for kernel, label, sig, const in variants(subset):
        if isinstance(kernel, InterpretedFunction):
            raise RuntimeError("the kernels were built for the interpreter: run with TRITON_INTERPRET unset or 0")
        t0 = time.perf_counter()
        try:
            ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=target)
        except Exception as exc:
            raise RuntimeError(f"AOT compile of {label} for sm_{arch} failed: {exc}") from exc
        rec = dict(label=label, seconds=time.perf_counter() - t0, ptx_v4="ld.global.v4" in ck.asm["ptx"],
                   cubin_bytes=len(ck.asm["cubin"]))
        out.append(rec)
        if verbose:
            print(f"{rec['label']:<60} {rec['seconds']:.2f}s v4={rec['ptx_v4']} cubin={rec['cubin_bytes']}")
    return out


if __name__ == "__main__":
    recs = compile_all(verbose=True, subset="--subset" in sys.argv)
    print(f"{len(recs)} variants compiled for sm_90")
    sys.exit(0)
