"""Triton kernels (``impl="triton"``, :mod:`fip_fast.kernels`) against the spec, :mod:`fip_fast.reference`.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set in ``tests/conftest.py`` before triton
is imported), plus an ahead-of-time compilation of every kernel for sm_90 as a lowering check (no GPU here).

Tolerances (``TOL``), interpreter vs reference, after ≥ 20 steps:

=========  ===================  ===============================================================================
dtype      rtol / atol          why
=========  ===================  ===============================================================================
fp32       1e-6 / 1e-7          the kernels repeat the reference's fp32 operation order: bit-exact here in
                                practice; the bound leaves room for a different but correct rounding
fp16       2⁻¹⁰ / 1e-5          one fp16 ulp: fp32 results one bit apart can round to neighbouring fp16 values
bf16       2⁻⁷ / 1e-4           one bf16 ulp (loads, stores, conversions only: the kernels never do bf16 math).
                                bf16 *outputs* are not compared under the interpreter: it converts fp32 → bf16
                                by truncation (see test_interpreter_bf16_store_truncates); bf16 inputs are
                                exact; bf16 lowering is checked by the sm_90 AOT compile.
=========  ===================  ===============================================================================

fp32 state (momentum, Fisher, perturbation) is always compared at the fp32 tolerance.  Matmul kernels
(spectral) are compared against the standard forward-error bound of a length-K dot product instead.

Runtime budget: the interpreter costs ~15 ms per program instance, so the tensors are small (a few programs
per launch) and the flag combinations are a pairwise-covering set rather than the full product.
"""
from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _isolate import in_fresh_process  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")

from _hang import communicate  # noqa: E402

import fip_fast.kernels as K  # noqa: E402
from fip_fast import ops  # noqa: E402
from fip_fast import reference as R  # noqa: E402
from fip_fast.kernels import _aot  # noqa: E402

_OK, _WHY = K.available("cpu")
pytestmark = pytest.mark.skipif(not _OK, reason=f"Triton kernels unavailable on CPU: {_WHY}")

if _OK:
    from fip_fast.kernels import _launch_count as lc
    from fip_fast.kernels import fip_step as kfs
    from fip_fast.kernels import multi_tensor as mt

TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.float16: dict(rtol=2.0 ** -10, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-4),
}
BLOCK = 1024  # kernels/triton/fip_step.py BLOCK; checked below so the "just above a block" sizes stay meaningful


def _close(actual, expected, dtype=torch.float32, what=""):
    torch.testing.assert_close(actual, expected, **TOL[dtype], equal_nan=False, msg=lambda m: f"{what}: {m}")


def _clone(lst):
    return None if lst is None else [None if t is None else t.clone() for t in lst]


def _bits(lst):
    """Bit patterns of every tensor (to prove 'nothing written' exactly, NaN payloads and -0.0 included)."""
    out = []
    for t in lst or []:
        if t is None:
            out.append(None)
        else:
            out.append(t.detach().clone().view(torch.uint8) if t.numel() else t.clone())
    return out


def _same_bits(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def test_block_constant():
    assert kfs.BLOCK == BLOCK


# ----------------------------------------------------------------------------------------------------------
# fip_step_: ≥ 20 steps against the reference
# ----------------------------------------------------------------------------------------------------------

SMALL_SHAPES = [(0,), (1,), (5, 3), (BLOCK + 1,)]


class _Run:
    """Parameters and state for the reference and the Triton kernels, stepped side by side."""

    def __init__(self, shapes, pdtype, anchored, lagged, gen, dtypes=None):
        self.shapes = shapes
        self.dtypes = dtypes or [pdtype] * len(shapes)
        self.gen = gen
        p = [self._randn(s, dt) for s, dt in zip(shapes, self.dtypes)]
        f0 = [torch.rand(s, generator=gen) if a else None for s, a in zip(shapes, anchored)]
        a0 = [(x + 0.1 * self._randn(x.shape, torch.float32).to(x.dtype)) if a else None
              for x, a in zip(p, anchored)]
        m = [0.1 * self._randn(s, torch.float32) for s in shapes]
        f = [torch.rand(s, generator=gen) for s in shapes]
        e = [0.01 * self._randn(s, torch.float32) for s in shapes] if lagged else None
        if lagged:     # θ + e: the optimizer applies e (perturb_) before the forward that computes g
            p = [(x.float() + y).to(x.dtype) for x, y in zip(p, e)]
        self.fisher0, self.anchor = f0, a0
        self.ref = dict(params=p, momentum_buf=m, fisher=f, pert=e)
        self.tri = {k: _clone(v) for k, v in self.ref.items()}

    def _randn(self, shape, dtype):
        return torch.randn(shape, generator=self.gen).to(dtype)

    def grads(self):
        return [self._randn(s, dt) for s, dt in zip(self.shapes, self.dtypes)]

    def step(self, grads, grads_pert, **hyper):
        for impl, st in ((R, self.ref), (K, self.tri)):
            impl.fip_step_(st["params"], grads, grads_pert, self.fisher0, self.anchor, st["momentum_buf"],
                           st["fisher"], st["pert"], **hyper)

    def state_bits(self, which):
        st = self.tri if which == "tri" else self.ref
        return [_bits(st[k]) for k in ("params", "momentum_buf", "fisher", "pert")]

    def check(self, what):
        for key in ("params", "momentum_buf", "fisher", "pert"):
            if self.ref[key] is None:
                continue
            for i, (x, y) in enumerate(zip(self.tri[key], self.ref[key])):
                dt = x.dtype if key == "params" else torch.float32
                _close(x, y, dt, f"{what}: {key}[{i}] {tuple(x.shape)} {x.dtype}")


def _scalar(x, as_tensor, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype) if as_tensor else x


def _run_steps(run, *, fd, lagged, restore, nesterov, precondition, wd, tensor_scalars, steps=20, skip_at=(7,),
               eta_r=0.7, gen=None):
    """Step ``run`` ``steps`` times with fresh random gradients; a step in ``skip_at`` has found_inf set."""
    for t in range(1, steps + 1):
        g = run.grads()
        gp = run.grads() if fd else None
        skip = t in skip_at
        hyper = dict(
            lr=_scalar(0.01 + 0.01 * torch.rand((), generator=gen).item(), tensor_scalars),
            momentum=0.9, nesterov=nesterov, weight_decay=wd, eta_r=eta_r, beta=0.95,
            mix=_scalar(torch.rand((), generator=gen).item(), tensor_scalars) if fd else None,
            restore_scale=_scalar(0.05, tensor_scalars) if restore else None,
            precondition=precondition, damping=1e-3,
            step=_scalar(t, tensor_scalars, torch.int64),
            next_pert_scale=(_scalar(0.02, tensor_scalars) if t % 3 else None) if lagged else None,
            found_inf=_scalar(1.0 if skip else 0.0, tensor_scalars) if (skip or t % 2) else None,
        )
        before = run.state_bits("tri")
        run.step(g, gp, **hyper)
        if skip:
            assert _same_bits(sum(before, []), sum(run.state_bits("tri"), [])), f"step {t}: found_inf set, but written"
        run.check(f"step {t}")


# fd (g' given) × restore_scale × lagged × nesterov × precondition × weight decay × scalar kind: a pairwise
# covering set (each pair of options appears in both states), plus the all-off and all-on corners.
# (restore_scale and lagged are exclusive in practice: pert takes precedence in the contract; both-on is kept
# once to check that precedence.)
_COMBOS = [
    # fd,    restore, lagged, nesterov, precond, wd,   tensor_scalars
    (False, False, False, False, False, 0.0, False),
    (True, True, False, True, True, 0.01, True),
    (True, True, False, False, False, 0.0, False),
    (False, False, True, True, True, 0.0, False),
    (False, False, True, False, False, 0.01, True),
    (True, False, True, False, True, 0.01, False),
    (False, True, False, True, False, 0.01, True),
    (True, True, True, True, False, 0.0, True),
]


@pytest.mark.parametrize("fd,restore,lagged,nesterov,precondition,wd,tensor_scalars", _COMBOS)
def test_fip_step_matches_reference(fd, restore, lagged, nesterov, precondition, wd, tensor_scalars):
    gen = torch.Generator().manual_seed(hash((fd, restore, lagged, nesterov, precondition, wd)) % 2**31)
    anchored = [True, False, True, True]          # fisher0/anchor None for one tensor
    run = _Run(SMALL_SHAPES, torch.float32, anchored, lagged, gen)
    _run_steps(run, fd=fd, lagged=lagged, restore=restore, nesterov=nesterov, precondition=precondition, wd=wd,
               tensor_scalars=tensor_scalars, gen=gen)


def test_fip_step_many_small_tensors_and_one_large():
    gen = torch.Generator().manual_seed(1)
    sizes = [int(s) for s in torch.randint(1, 40, (10,), generator=gen)] + [2 * BLOCK + 5, BLOCK, 0]
    shapes = [(s,) for s in sizes]
    run = _Run(shapes, torch.float32, [i % 3 != 0 for i in range(len(shapes))], True, gen)
    _run_steps(run, fd=True, lagged=True, restore=False, nesterov=True, precondition=True, wd=0.01,
               tensor_scalars=True, gen=gen)


def test_fip_step_fp16_params():
    """fp16 parameters, gradients, anchors; fp32 state; all math fp32."""
    gen = torch.Generator().manual_seed(2)
    run = _Run(SMALL_SHAPES, torch.float16, [True, True, False, True], True, gen)
    _run_steps(run, fd=True, lagged=True, restore=False, nesterov=False, precondition=True, wd=0.01,
               tensor_scalars=False, gen=gen)


def test_interpreter_bf16_store_truncates():
    """Why bf16 *parameters* are not compared with the reference here: the Triton 3.6 interpreter converts
    fp32 → bf16 by truncation, not round-to-nearest-even as the GPU (cvt.rn.bf16.f32) and torch do, so a
    bf16 θ written by any kernel differs by one ulp from the spec under the interpreter only.  If this test
    starts failing, the interpreter was fixed: add bfloat16 to test_fip_step_fp16_params's dtypes."""
    x = torch.randn(257, generator=torch.Generator().manual_seed(0))
    p = [torch.zeros(257, dtype=torch.bfloat16)]
    K.perturb_(p, [x], 1.0)
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()
    assert torch.equal(p[0], truncated) and not torch.equal(p[0], x.bfloat16())


def test_fip_step_bf16_inputs_and_bf16_roundtrip():
    """bf16 where the interpreter is exact: bf16 gradients, g', F0 and θ0 beside fp32 parameters (loads and
    conversions to fp32), and bf16 parameters read and written back unchanged (a zero step: lr = 0)."""
    gen = torch.Generator().manual_seed(14)
    shapes = SMALL_SHAPES
    run = _Run(shapes, torch.float32, [True, False, True, True], False, gen)
    run.fisher0 = [None if f is None else f.bfloat16() for f in run.fisher0]
    run.anchor = [None if a is None else a.bfloat16() for a in run.anchor]
    run.grads = lambda: [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    _run_steps(run, fd=True, lagged=False, restore=True, nesterov=True, precondition=True, wd=0.01,
               tensor_scalars=True, gen=gen)
    pb = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    before = _bits(pb)
    g = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    z = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    K.fip_step_(pb, g, None, [None] * 4, [None] * 4, z(), z(), None, lr=0.0, momentum=0.9, nesterov=False,
                weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None, restore_scale=None, precondition=False,
                damping=0.0, step=1, next_pert_scale=None, found_inf=None)
    assert _same_bits(before, _bits(pb))


def test_fip_step_mixed_dtypes_one_launch():
    """fp32 and fp16 parameters, fp32/fp16/bf16 gradients in one list: one launch (a runtime dtype branch per
    tensor; bf16 parameters are left out only because the interpreter's bf16 store truncates, see below)."""
    gen = torch.Generator().manual_seed(3)
    dts = [torch.float32, torch.float16, torch.float32, torch.float16]
    gdts = [torch.float32, torch.float16, torch.bfloat16, torch.bfloat16]
    shapes = [(3,), (BLOCK + 2,), (17,), (1,)]
    run = _Run(shapes, None, [True, False, True, True], False, gen, dtypes=dts)
    run.grads = lambda: [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, gdts)]
    with lc.counting() as launches:
        _run_steps(run, fd=True, lagged=False, restore=True, nesterov=True, precondition=False, wd=0.0,
                   tensor_scalars=True, steps=20, skip_at=(4,), gen=gen)
    # 20 steps; the skipped one still launches (the flag is read on the device) and writes nothing
    assert launches.by_kernel == {"_fip_step_kernel": 20}


def test_fip_step_unaligned_views_and_guards():
    """Tensors that are unaligned views into larger NaN-filled buffers: the unaligned (masked) path runs,
    and no element outside the views is ever written (the guards keep their NaN bits)."""
    gen = torch.Generator().manual_seed(4)
    sizes = [BLOCK + 3, 5, 1]

    def carve(n_list, fill):
        total = sum(n_list) + 8 * (len(n_list) + 1)
        buf = torch.full((total,), float("nan"))
        views, o = [], 3                                    # offset 3 floats: not 16-byte aligned
        for n in n_list:
            views.append(buf[o:o + n])
            o += n + 8
        for v in views:
            v.copy_(fill(v.shape))
        return buf, views

    pbuf, p = carve(sizes, lambda s: torch.randn(s, generator=gen))
    mbuf, m = carve(sizes, lambda s: torch.zeros(s))
    fbuf, f = carve(sizes, lambda s: torch.rand(s, generator=gen))
    ebuf, e = carve(sizes, lambda s: torch.zeros(s))
    ref = dict(params=[x.clone() for x in p], momentum_buf=[x.clone() for x in m], fisher=[x.clone() for x in f],
               pert=[x.clone() for x in e])
    guards = [(b, torch.cat(vs).numel()) for b, vs in ((pbuf, p), (mbuf, m), (fbuf, f), (ebuf, e))]
    tab = mt.tensor_table((p,), kfs.BLOCK, p[0].device)
    assert not tab.aligned
    for t in range(1, 21):
        g = [torch.randn(n, generator=gen) for n in sizes]
        hyper = dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.01, eta_r=0.0, beta=0.9, mix=None,
                     restore_scale=None, precondition=True, damping=1e-3, step=t, next_pert_scale=0.02,
                     found_inf=None)
        R.fip_step_(ref["params"], g, None, [None] * 3, [None] * 3, ref["momentum_buf"], ref["fisher"],
                    ref["pert"], **hyper)
        K.fip_step_(p, g, None, [None] * 3, [None] * 3, m, f, e, **hyper)
    for key, views in (("params", p), ("momentum_buf", m), ("fisher", f), ("pert", e)):
        for x, y in zip(views, ref[key]):
            _close(x, y, what=key)
    for buf, n_inside in guards:
        assert int(torch.isnan(buf).sum()) == buf.numel() - n_inside, "a write landed outside the tensors"


def test_fip_step_found_inf_nan_and_number():
    gen = torch.Generator().manual_seed(5)
    run = _Run(SMALL_SHAPES, torch.float32, [True] * 4, True, gen)
    before = run.state_bits("tri")
    for flag in (torch.tensor(float("nan")), torch.tensor(1.0), 1.0, torch.tensor(True)):
        g = run.grads()
        with lc.counting() as launches:
            K.fip_step_(run.tri["params"], g, g, run.fisher0, run.anchor, run.tri["momentum_buf"],
                        run.tri["fisher"], run.tri["pert"], lr=0.1, momentum=0.9, nesterov=False,
                        weight_decay=0.1, eta_r=1.0, beta=0.9, mix=0.5, restore_scale=None, precondition=True,
                        damping=1e-3, step=3, next_pert_scale=0.1, found_inf=flag)
        assert _same_bits(sum(before, []), sum(run.state_bits("tri"), []))
        # a Python number is decided on the host: no launch at all
        assert launches.total == (0 if isinstance(flag, float) else 1)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_fip_step_no_host_sync_with_device_scalars(per_tensor):
    """With every scalar a tensor on the parameters' device (per-tensor step counts included), the wrapper never
    calls .item()."""
    gen = torch.Generator().manual_seed(6)
    run = _Run(SMALL_SHAPES, torch.float32, [True] * 4, True, gen)
    g = run.grads()
    s = lambda v: torch.tensor(v)  # noqa: E731
    hyper = dict(lr=s(0.01), momentum=0.9, nesterov=True, weight_decay=0.01, eta_r=0.5, beta=0.9, mix=s(0.3),
                 restore_scale=None, precondition=True, damping=1e-3, step=torch.tensor(4), next_pert_scale=s(0.02),
                 found_inf=s(0.0))
    if per_tensor:
        hyper["step"] = [torch.tensor(4.0), torch.tensor(1.0), torch.tensor(9.0), torch.tensor(2, dtype=torch.int64)]
    R.fip_step_(run.ref["params"], g, g, run.fisher0, run.anchor, run.ref["momentum_buf"], run.ref["fisher"],
                run.ref["pert"], **hyper)
    with mock.patch.object(torch.Tensor, "item", side_effect=AssertionError(".item() called: a host sync")), \
            mock.patch.object(torch.Tensor, "__float__", side_effect=AssertionError("float(tensor): a host sync")):
        K.fip_step_(run.tri["params"], g, g, run.fisher0, run.anchor, run.tri["momentum_buf"], run.tri["fisher"],
                    run.tri["pert"], **hyper)
    run.check("device scalars")


def test_fip_step_empty_lists_and_empty_tensors():
    common = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                  restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=None, found_inf=None)
    with lc.counting() as launches:
        K.fip_step_([], [], None, [], [], [], [], None, **common)
        e = [torch.empty(0), torch.empty(0, 3)]
        K.fip_step_(e, _clone(e), None, [None, None], [None, None], _clone(e), _clone(e), None, **common)
        K.perturb_([], [], 1.0)
        K.fisher_accumulate_([], [], 0.9, 0.1)
    assert launches.total == 0


def test_fip_step_rejects_bad_inputs():
    p = [torch.zeros(4)]
    common = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                  restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=None, found_inf=None)
    with pytest.raises(ValueError, match="elements"):
        K.fip_step_(p, [torch.zeros(5)], None, [None], [None], [torch.zeros(4)], [torch.zeros(4)], None, **common)
    with pytest.raises(ValueError, match="entries"):      # one step count per tensor
        K.fip_step_(p, [torch.zeros(4)], None, [None], [None], [torch.zeros(4)], [torch.zeros(4)], None,
                    **dict(common, precondition=True, step=[1, 2]))
    with pytest.raises(TypeError, match="fp32"):
        K.fip_step_(p, [torch.zeros(4)], None, [None], [None], [torch.zeros(4, dtype=torch.float16)],
                    [torch.zeros(4)], None, **common)
    with pytest.raises(TypeError, match="dtype"):
        K.fip_step_([torch.zeros(4, dtype=torch.float64)], [torch.zeros(4, dtype=torch.float64)], None, [None],
                    [None], [torch.zeros(4)], [torch.zeros(4)], None, **common)


# ----------------------------------------------------------------------------------------------------------
# One launch per call; the table cache
# ----------------------------------------------------------------------------------------------------------

def test_one_launch_per_call_and_table_cache_hits():
    gen = torch.Generator().manual_seed(7)
    dts = [torch.float32, torch.float16, torch.bfloat16] * 4
    shapes = [(int(n),) for n in torch.randint(1, 30, (len(dts),), generator=gen)]
    p = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, dts)]
    g = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, dts)]
    st = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    m, f, e = st(), st(), st()
    hyper = dict(lr=torch.tensor(0.01), momentum=0.9, nesterov=True, weight_decay=0.01, eta_r=0.0, beta=0.9,
                 mix=torch.tensor(0.5), restore_scale=None, precondition=True, damping=1e-3, step=torch.tensor(2),
                 next_pert_scale=torch.tensor(0.01), found_inf=torch.tensor(0.0))
    nones = [None] * len(p)
    K.fip_step_(p, g, g, nones, nones, m, f, e, **hyper)          # first call builds (and caches) the table
    with mock.patch.object(mt, "_build", side_effect=AssertionError("table rebuilt in the steady state")):
        with lc.counting() as launches:
            K.fip_step_(p, g, g, nones, nones, m, f, e, **hyper)
        assert launches.by_kernel == {"_fip_step_kernel": 1}
    # params moved (a new tensor) → a new key → a rebuild, not a stale table
    p[0] = p[0].clone()
    with mock.patch.object(mt, "_build", wraps=mt._build) as build:
        K.fip_step_(p, g, g, nones, nones, m, f, e, **hyper)
    assert build.call_count == 1


def test_a_keyed_table_patches_moved_gradients_instead_of_rebuilding():
    """Under a caller's key (stable, moving pointers), new gradient tensors of the same dtype and layout are
    patched into the table — no rebuild, and the step uses the new gradients; another dtype, a None that became a
    tensor or a non-contiguous gradient builds the table again."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(5,), (BLOCK + 3,), (2, 3)]
    hyper = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                 restore_scale=None, precondition=False, damping=1e-3, step=1.0, next_pert_scale=None,
                 found_inf=torch.tensor(0.0))
    p = [torch.randn(s, generator=gen) for s in shapes]
    st = lambda: [torch.zeros(s) for s in shapes]  # noqa: E731
    m, f = st(), st()
    nones = [None] * len(p)
    pr, mr, fr = [t.clone() for t in p], st(), st()

    def step(grads, expect_build: bool):
        key = (("test-plan", "step"), (tuple(g.data_ptr() for g in grads), None))
        with mock.patch.object(mt, "_build", wraps=mt._build) as build:
            K.fip_step_(p, grads, None, nones, nones, m, f, None, cache_key=key, **hyper)
        R.fip_step_(pr, grads, None, nones, nones, mr, fr, None, **hyper)
        assert build.call_count == int(expect_build)
        for a, b in zip(p, pr):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    g = [torch.randn(s, generator=gen) for s in shapes]
    step(g, expect_build=True)
    step(g, expect_build=False)                                   # a hit
    g = [torch.randn(s, generator=gen) for s in shapes]           # new tensors elsewhere: patched
    step(g, expect_build=False)
    g = [g[0], g[1], torch.randn(3, 2, generator=gen).t()]        # non-contiguous: not patched; the full check
    step(g, expect_build=True)                                    # refuses it, the call falls back to foreach
    g = [torch.randn(s, generator=gen) for s in shapes]
    g16 = [g[0].half(), g[1], g[2]]                               # another dtype: rebuilt
    step(g16, expect_build=True)


def test_one_launch_each_op():
    gen = torch.Generator().manual_seed(8)
    ts = [torch.randn(n, generator=gen) for n in (3, BLOCK + 1, 1, 40)]
    checks = [
        (lambda: K.perturb_(_clone(ts), ts, torch.tensor(0.1), torch.tensor(0.0)), "_perturb_kernel"),
        (lambda: K.fisher_accumulate_(_clone(ts), ts, 0.9, torch.tensor(0.1)), "_fisher_kernel"),
        (lambda: K.global_norm(ts + [None]), "_norm_kernel"),
        (lambda: K.spectral_weight(torch.randn(20, 5), torch.rand(5), torch.randn(5), torch.randn(5, 9)),
         "_spectral_weight_kernel"),
        (lambda: K.spectral_linear_grad(torch.randn(6, 9), torch.randn(6, 20), torch.randn(20, 5), torch.rand(5),
                                        torch.zeros(5), torch.randn(5, 9)), "_spectral_grad_kernel"),
    ]
    for fn, name in checks:
        with lc.counting() as launches:
            fn()
        assert launches.by_kernel == {name: 1}, name


# ----------------------------------------------------------------------------------------------------------
# perturb_, fisher_accumulate_, global_norm
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.float32, torch.bfloat16)])
def test_perturb_and_fisher_match_reference(dtype, gdtype):
    gen = torch.Generator().manual_seed(9)
    shapes = [(0,), (1,), (BLOCK + 1,), (4, 5)]
    p = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    f = [torch.rand(s, generator=gen) for s in shapes]
    p_ref, p_tri, f_ref, f_tri = _clone(p), _clone(p), _clone(f), _clone(f)
    for t in range(20):
        g = [torch.randn(s, generator=gen).to(gdtype) for s in shapes]
        scale = torch.tensor(0.1 * (t % 4 - 1.5)) if t % 2 else 0.1 * (t % 4 - 1.5)
        R.perturb_(p_ref, g, scale)
        K.perturb_(p_tri, g, scale, torch.tensor(0.0) if t % 3 else None)
        beta, alpha = (torch.tensor(0.9), 0.1) if t % 2 else (0.95, torch.tensor(0.05))
        R.fisher_accumulate_(f_ref, g, beta, alpha)
        K.fisher_accumulate_(f_tri, g, beta, alpha)
    for a, b in zip(p_tri, p_ref):
        _close(a, b, dtype, "perturb_")
    for a, b in zip(f_tri, f_ref):
        _close(a, b, torch.float32, "fisher_accumulate_")
    before = _bits(p_tri)
    K.perturb_(p_tri, g, 1.0, torch.tensor(1.0))
    assert _same_bits(before, _bits(p_tri))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # numpy, inside the interpreter
def test_global_norm_matches_reference_and_flags_nonfinite():
    gen = torch.Generator().manual_seed(10)
    ts = [torch.randn(BLOCK + 1, generator=gen), None, torch.randn(7, generator=gen).half(),
          torch.randn(3, 3, generator=gen).bfloat16(), torch.empty(0)]
    for _ in range(2):                       # twice: the done-counter must have been reset by the first call
        n, fi = K.global_norm(ts)
        n_ref, fi_ref = R.global_norm(ts)
        assert n.shape == () and n.dtype == torch.float32 and fi.dtype == torch.float32
        _close(n, n_ref, what="norm")
        assert fi.item() == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = ts[0].clone()
        t[BLOCK] = bad
        n, fi = K.global_norm([ts[2], t])
        assert fi.item() == 1.0 and not torch.isfinite(n)
    n, fi = K.global_norm([torch.full((4,), 1e20)])    # sum of squares overflows fp32: non-finite, as the spec
    assert fi.item() == 1.0 and R.global_norm([torch.full((4,), 1e20)])[1].item() == 1.0
    for empty in ([], [None], [torch.empty(0), torch.empty(0, 5)]):
        n, fi = K.global_norm(empty)
        assert n.item() == 0.0 and fi.item() == 0.0
    # deterministic: the same bits every time (fixed-order reduction, no float atomics)
    big = [torch.randn(5 * BLOCK + 3, generator=gen)]
    assert len({K.global_norm(big)[0].view(torch.int32).item() for _ in range(3)}) == 1


# ----------------------------------------------------------------------------------------------------------
# Spectral ops
# ----------------------------------------------------------------------------------------------------------

def _poisoned_empty(real):
    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    return empty


def _matmul_bound(U, s, Vh, extra=None):
    """|W − W_ref| ≤ 2·γ_r·(|U|·|s|)·|Vh| (+ the same for a residual add): both sides are within γ_r of exact."""
    r = max(U.shape[1], 1)
    eps = torch.finfo(torch.float32).eps
    b = 2 * (r + 2) * eps * (U.float().abs() * s.abs()) @ Vh.float().abs()
    if extra is not None:
        b = b + 2 * eps * extra.float().abs()
    return b


@pytest.mark.parametrize("m,r,n,relative,residual,dtype,transposed", [
    (70, 20, 90, False, False, torch.float32, False),
    (70, 20, 90, True, True, torch.float32, True),
    (1, 1, 1, False, True, torch.float32, False),
    (65, 33, 17, True, False, torch.float16, False),
    (33, 40, 65, False, True, torch.float16, True),
    (5, 0, 7, False, True, torch.float32, False),
])
def test_spectral_weight_matches_reference(m, r, n, relative, residual, dtype, transposed):
    gen = torch.Generator().manual_seed(m * 1000 + r)
    U = torch.randn(m, r, generator=gen).to(dtype)
    S = (torch.rand(r, generator=gen) * 3).to(dtype)
    d = torch.randn(r, generator=gen).to(dtype)        # some s = S + δ < 0: relu active
    Vh = torch.randn(n, r, generator=gen).to(dtype).t() if transposed else torch.randn(r, n, generator=gen).to(dtype)
    res = torch.randn(m, n, generator=gen).to(dtype) if residual else None
    with mock.patch.object(torch, "empty", _poisoned_empty(torch.empty)):
        W = K.spectral_weight(U, S, d, Vh, res, relative)
    W_ref = R.spectral_weight(U, S, d, Vh, res, relative)
    assert W.dtype == dtype and W.shape == (m, n)
    assert not torch.isnan(W).any(), "an element of W was not written"
    s = torch.relu(S.float() * (1 + d.float()) if relative else S.float() + d.float())
    bound = _matmul_bound(U, s, Vh, res)
    if dtype != torch.float32:   # plus one rounding of the output to the narrow type on each side
        bound = bound + 2 * TOL[dtype]["rtol"] * W_ref.float().abs() + TOL[dtype]["atol"]
    assert ((W.float() - W_ref.float()).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("N,T,relative,dtype", [
    (7, None, False, torch.float32),
    (20, 5, True, torch.float32),
    (17, 3, False, torch.bfloat16),
    (0, None, False, torch.float32),
])
def test_spectral_linear_grad_matches_reference(N, T, relative, dtype):
    gen = torch.Generator().manual_seed(N + 100)
    m, n, r = 20, 24, 37                                 # r > BR: two blocks of directions, one partial
    U = torch.randn(m, r, generator=gen).to(dtype)
    S = torch.rand(r, generator=gen).to(dtype)
    d = (0.8 * torch.randn(r, generator=gen)).to(dtype)
    Vh = torch.randn(r, n, generator=gen).to(dtype)
    xs = (N, n) if T is None else (N, T, n)
    gs = (N, m) if T is None else (N, T, m)
    x = torch.randn(xs, generator=gen).to(dtype)
    go = torch.randn(gs, generator=gen).to(dtype)
    with mock.patch.object(torch, "empty", _poisoned_empty(torch.empty)):
        gd, ps = K.spectral_linear_grad(x, go, U, S, d, Vh, relative)
    gd_ref, ps_ref = R.spectral_linear_grad(x, go, U, S, d, Vh, relative)
    assert gd.shape == (r,) and ps.shape == (N, r) and gd.dtype == ps.dtype == torch.float32
    assert not torch.isnan(gd).any() and not torch.isnan(ps).any(), "an output element was not written"
    # a, b are the reference's own matmuls; only the token sum (T terms) and the sample sum (N terms) differ
    # in order: forward-error bounds of those sums
    eps = torch.finfo(torch.float32).eps
    x3 = x.float() if T is not None else x.float().unsqueeze(1)
    g3 = go.float() if T is not None else go.float().unsqueeze(1)
    ab = ((x3 @ Vh.float().t()) * (g3 @ U.float())).abs().sum(1)          # Σ_t |a ⊙ b|, (N, r)
    jac = (S.float() if relative else torch.ones(r)).abs()
    per = 2 * (x3.shape[1] + 1) * eps * ab * jac
    assert ((ps - ps_ref).abs() <= 2 * per * (ps_ref.sqrt() + per) + 1e-30).all()
    assert ((gd - gd_ref).abs() <= per.sum(0) + 2 * (N + 1) * eps * (ab * jac).sum(0) + 1e-30).all()


# ----------------------------------------------------------------------------------------------------------
# Through the dispatcher, through torch.library / torch.compile
# ----------------------------------------------------------------------------------------------------------

def test_dispatcher_runs_triton_on_cpu_under_the_interpreter():
    assert ops.availability("triton", "cpu") == (True, "")
    assert ops.get("fip_step_", impl="triton", device="cpu") is K.fip_step_
    gen = torch.Generator().manual_seed(11)
    run = _Run(SMALL_SHAPES, torch.float32, [True, False, True, True], True, gen)
    for t in range(1, 4):
        g = run.grads()
        hyper = dict(lr=torch.tensor(0.02), momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.5, beta=0.9,
                     mix=None, restore_scale=None, precondition=False, damping=0.0, step=t, next_pert_scale=0.01,
                     found_inf=torch.tensor(0.0))
        R.fip_step_(run.ref["params"], g, None, run.fisher0, run.anchor, run.ref["momentum_buf"],
                    run.ref["fisher"], run.ref["pert"], **hyper)
        with lc.counting() as launches:
            ops.fip_step_(run.tri["params"], g, None, run.fisher0, run.anchor, run.tri["momentum_buf"],
                          run.tri["fisher"], run.tri["pert"], impl="triton", **hyper)
        assert launches.total == 1
        run.check(f"dispatcher step {t}")
    n, _ = ops.global_norm(run.tri["params"], impl="triton")
    _close(n, R.global_norm(run.tri["params"])[0])


def test_available_reports_reasons():
    ok, why = K.available("meta")
    assert not ok and "meta" in why
    ok, why = K.available("cuda")
    assert not ok and why


_lib_ok = _OK and K._lib.AVAILABLE


@pytest.mark.skipif(not _lib_ok, reason="torch.library.custom_op needs torch >= 2.4")
@in_fresh_process
def test_custom_ops_opcheck():
    lib = K._lib
    gen = torch.Generator().manual_seed(12)
    ts = [torch.randn(n, generator=gen) for n in (3, 5)]
    opcheck = torch.library.opcheck
    opcheck(lib.fisher_accumulate_op, (_clone(ts), ts, 0.9, None, None, torch.tensor(0.1)))
    opcheck(lib.perturb_op, (_clone(ts), ts, None, torch.tensor(0.1), None, torch.tensor(0.0)))
    opcheck(lib.global_norm_op, ([ts[0], None, ts[1]],))
    opcheck(lib.fip_step_op, (
        _clone(ts), ts, ts, [None, torch.rand(5)], [None, torch.randn(5)], _clone(ts), [t.abs() for t in ts],
        _clone(ts), None, torch.tensor(0.01), 0.9, True, 0.01, 0.5, 0.9, 0.5, None, None, None, True, 1e-3,
        None, torch.tensor(3), [], 0.01, None, None, torch.tensor(0.0)))
    opcheck(lib.fip_step_op, (                      # per-tensor step counts (step_list)
        _clone(ts), ts, [], [None, torch.rand(5)], [None, torch.randn(5)], _clone(ts), [t.abs() for t in ts],
        [], 0.01, None, 0.9, False, 0.0, 0.5, 0.9, None, None, None, None, True, 1e-3,
        None, None, [torch.tensor(1.0), torch.tensor(7.0)], None, None, None, None))
    U, S, d, Vh = torch.randn(6, 4), torch.rand(4), torch.randn(4), torch.randn(4, 5)
    opcheck(lib.spectral_weight_op, (U, S, d, Vh, torch.randn(6, 5), True))
    opcheck(lib.spectral_linear_grad_op, (torch.randn(3, 2, 5), torch.randn(3, 2, 6), U, S, d, Vh, False))


@pytest.mark.skipif(not _lib_ok, reason="torch.library.custom_op needs torch >= 2.4")
@in_fresh_process
def test_torch_compile_traces_the_ops():
    """fullgraph=True: no graph break — the calls become custom ops with fake implementations."""
    gen = torch.Generator().manual_seed(13)
    shapes = [(3,), (5, 2)]
    p = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    m = [torch.zeros(s) for s in shapes]
    f = [torch.zeros(s) for s in shapes]
    U, S, d, Vh = torch.randn(6, 4), torch.rand(4), torch.randn(4), torch.randn(4, 5)

    def step(p, g, m, f, lr):
        n, fi = K.global_norm(g)
        K.fip_step_(p, g, None, [None, None], [None, None], m, f, None, lr=lr, momentum=0.9, nesterov=False,
                    weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None, restore_scale=None, precondition=False,
                    damping=0.0, step=1, next_pert_scale=None, found_inf=fi)
        return n, K.spectral_weight(U, S, d, Vh)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    pc, mc, fc = _clone(p), _clone(m), _clone(f)
    n_c, W_c = compiled(pc, g, mc, fc, torch.tensor(0.1))
    pe, me, fe = _clone(p), _clone(m), _clone(f)
    n_e, W_e = step(pe, g, me, fe, torch.tensor(0.1))
    _close(n_c, n_e)
    _close(W_c, W_e)
    for a, b in zip(pc + mc + fc, pe + me + fe):
        _close(a, b, what="compiled in-place update")


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90: a lowering check of every kernel variant (no GPU needed)
# ----------------------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import json, sys
from fip_fast.kernels import _aot
recs = _aot.compile_all(subset=sys.argv[1] == "subset")
print("AOT-JSON " + json.dumps(recs))
"""


def _start_aot(subset: bool) -> subprocess.Popen:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"     # real code generation: jit functions, not interpreted ones
    return subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, "subset" if subset else "all"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_aot(proc: subprocess.Popen):
    import json
    out, err = communicate(proc, "the AOT compile")
    assert proc.returncode == 0, err[-4000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("AOT-JSON "))
    return json.loads(line[len("AOT-JSON "):])


# The compile is CPU-bound and single-threaded, like the interpreter: start it when this module is collected so
# that it runs beside the interpreter tests on a second core (the test below only collects its result).
# atexit ends it if that test was deselected.
_AOT_OK, _AOT_WHY = _aot.aot_supported() if _OK else (False, _WHY)
_AOT_PROC = None
if _AOT_OK and os.environ.get("FIP_FAST_AOT_EARLY", "1") == "1":
    import atexit
    _AOT_PROC = _start_aot(subset=True)
    atexit.register(lambda p=_AOT_PROC: p.poll() is None and p.kill())


def _check_aot(recs):
    labels = [r["label"] for r in recs]
    for dt in ("fp32", "fp16", "bf16", "mixed"):
        assert any(lb.startswith(f"fip_step[{dt}") for lb in labels)
    for kernel in ("fip_step", "perturb", "fisher", "global_norm", "spectral_weight", "spectral_linear_grad"):
        assert any(lb.startswith(kernel + "[") for lb in labels)
    by = {r["label"]: r for r in recs}
    assert all(r["cubin_bytes"] > 0 for r in recs)
    # full blocks of aligned tensors are vectorized (128-bit loads); the unaligned variant cannot be
    assert by["fip_step[fp32,lagged,aligned=True]"]["ptx_v4"]
    assert not by["fip_step[fp32,lagged,aligned=False]"]["ptx_v4"]


@pytest.mark.skipif(not _AOT_OK, reason=_AOT_WHY)
def test_aot_compile_sm90_kernel_variants():
    """Every kernel, every parameter dtype (bf16 included), the richest switch setting of each: compiled to
    PTX and an sm_90 cubin."""
    _check_aot(_finish_aot(_AOT_PROC if _AOT_PROC is not None else _start_aot(subset=True)))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FIP_FAST_AOT_ALL") != "1",
                    reason="~35 s: set FIP_FAST_AOT_ALL=1 (or run python -m fip_fast.kernels._aot)")
@pytest.mark.skipif(not _AOT_OK, reason=_AOT_WHY)
def test_aot_compile_sm90_all_variants():
    _check_aot(_finish_aot(_start_aot(subset=False)))


# ----------------------------------------------------------------------------------------------------------
# Per-tensor step counts, lagged store-only, the anchor term by hand
# ----------------------------------------------------------------------------------------------------------

def _step_kind(steps, kind):
    """The per-tensor counts as the optimizer's fp32 0-dim tensors, Python numbers, or a mix of both."""
    if kind == "tensors":
        return [torch.tensor(float(s)) for s in steps]
    if kind == "numbers":
        return list(steps)
    return [torch.tensor(float(s)) if i % 2 else s for i, s in enumerate(steps)]


@pytest.mark.parametrize("kind", ["tensors", "numbers", "mixed"])
@pytest.mark.parametrize("lagged", [False, True])
def test_fip_step_per_tensor_steps_match_reference(kind, lagged):
    """Each tensor's own step count in its bias correction 1 − β^t_i (counts 1 and 7 at the first step, ...):
    20 steps against the reference, and really per tensor (one shared count gives other parameters)."""
    gen = torch.Generator().manual_seed(31 + lagged)
    run = _Run(SMALL_SHAPES, torch.float32, [True, False, True, True], lagged, gen)
    shared = {k: _clone(v) for k, v in run.ref.items()}
    offsets = [2, 6, 0, 1]                        # at the first step tensor 2 is at 1 while tensor 1 is at 7
    for t in range(1, 21):
        g = run.grads()
        steps = [t + o for o in offsets]
        hyper = dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01, eta_r=0.7, beta=0.9, mix=None,
                     restore_scale=None, precondition=True, damping=1e-3, step=_step_kind(steps, kind),
                     next_pert_scale=0.02 if lagged else None, found_inf=None)
        run.step(g, None, **hyper)
        run.check(f"step {t}")
        K.fip_step_(shared["params"], g, None, run.fisher0, run.anchor, shared["momentum_buf"], shared["fisher"],
                    shared["pert"], **dict(hyper, step=t))
    for i in (1, 3):          # the non-empty tensors whose count is not t
        assert not torch.equal(shared["params"][i], run.tri["params"][i]), f"tensor {i}: per-tensor step ignored"


def test_fip_step_per_tensor_steps_equal_counts_and_one_launch():
    """Equal host counts take the one-value path; device counts make a (T,) vector; one launch either way."""
    dmy = mt.dummy(torch.device("cpu"))
    _, v, m = kfs.bias_correction(0.9, [3, 3.0, torch.tensor(3)], 3, torch.device("meta"), dmy)
    assert m == mt.VALUE and v == (1.0 - torch.tensor(0.9) ** torch.tensor(3.0)).item()
    bc, _, m = kfs.bias_correction(0.9, [torch.tensor(1.0), torch.tensor(7.0)], 2, torch.device("cpu"), dmy)
    assert m == kfs.PER_TENSOR
    assert torch.equal(bc, 1.0 - torch.tensor(0.9) ** torch.tensor([1.0, 7.0]))
    p = [torch.randn(5), torch.randn(BLOCK + 3)]
    g = [torch.randn(5), torch.randn(BLOCK + 3)]
    z = lambda: [torch.zeros(5), torch.zeros(BLOCK + 3)]  # noqa: E731
    with lc.counting() as launches:
        K.fip_step_(p, g, None, [None] * 2, [None] * 2, z(), z(), None, lr=0.1, momentum=0.9, nesterov=False,
                    weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None, restore_scale=None, precondition=True,
                    damping=1e-3, step=[torch.tensor(1.0), torch.tensor(7.0)], next_pert_scale=None, found_inf=None)
    assert launches.by_kernel == {"_fip_step_kernel": 1}


@pytest.mark.parametrize("nps", [0.03, torch.tensor(0.03), None])
def test_fip_step_lagged_stores_pert_without_applying_it(nps):
    """θ ← θ − pert_old − lr·u and pert ← next_pert_scale·g (0 when None): θ is NOT perturbed by the step."""
    gen = torch.Generator().manual_seed(32)
    shapes = [(7,), (BLOCK + 5,)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    pert = [0.01 * torch.randn(s, generator=gen) for s in shapes]
    pert_old = _clone(pert)
    p = _clone(theta)
    K.fip_step_(p, g, None, [None] * 2, [None] * 2, [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes],
                pert, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=nps, found_inf=None)
    s = 0.0 if nps is None else float(nps)
    for i in range(2):
        assert torch.equal(p[i], (theta[i] - pert_old[i]) - 0.1 * g[i]), "θ must not be perturbed by the step"
        assert torch.equal(pert[i], s * g[i])


def test_fip_step_anchor_term_with_theta_ne_theta0():
    """One step from zero state, momentum 0, θ ≠ θ0, F0 ≠ 0: θ_new = θ − lr·(g + η_r·F0·(θ − θ0) + wd·θ), by
    hand (θ0 = θ makes the anchor term zero and hides a sign flip); fp16 anchors and a tensor without one."""
    gen = torch.Generator().manual_seed(33)
    shapes = [(9,), (BLOCK + 2,), (4,)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    f0 = [torch.rand(s, generator=gen) + 0.5 for s in shapes[:2]] + [None]
    a0 = [theta[0] + 1.0 + torch.rand(shapes[0], generator=gen),
          (theta[1] - 1.0 - torch.rand(shapes[1], generator=gen)).half(), None]
    lr, eta_r, wd = 0.1, 0.7, 0.01
    want = []
    for x, gg, f, a in zip(theta, g, f0, a0):
        d = gg.double() + wd * x.double()
        if f is not None:
            d = d + eta_r * f.double() * (x.double() - a.double())
        want.append(x.double() - lr * d)
    for impl in (R, K):
        p = _clone(theta)
        impl.fip_step_(p, g, None, f0, a0, [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes], None,
                       lr=lr, momentum=0.0, nesterov=False, weight_decay=wd, eta_r=eta_r, beta=0.9, mix=None,
                       restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=None,
                       found_inf=None)
        for i in range(3):
            torch.testing.assert_close(p[i].double(), want[i], rtol=1e-5, atol=1e-6, msg=f"{impl.__name__} [{i}]")


def test_global_norm_more_than_rblock_chunks():
    """More than RBLOCK (1024) chunks: the last program must sum every partial, not only the first RBLOCK —
    zeros in front, the values that matter in chunks 1024+ (≈1.05 M elements, ~0.5 s under the interpreter)."""
    assert kfs.RBLOCK == 1024
    n = (kfs.RBLOCK + 2) * BLOCK + 3           # 1027 chunks
    x = torch.zeros(n)
    x[-1] = 3.0                                # the last, partial chunk
    x[(kfs.RBLOCK + 1) * BLOCK + 10] = 4.0     # chunk 1025
    norm, fi = K.global_norm([x])
    assert norm.item() == 5.0 and fi.item() == 0.0
    assert R.global_norm([x])[0].item() == 5.0


# ----------------------------------------------------------------------------------------------------------
# Device guard (parameters on another GPU than the current one)
# ----------------------------------------------------------------------------------------------------------

class _FakeKernel:
    def __init__(self):
        self.fn = lambda: None
        self.fn.__name__ = "_fake_kernel"
        self.calls = []

    def __getitem__(self, grid):
        return lambda *a, **k: self.calls.append((grid, a, k))


def test_launch_enters_the_tensors_cuda_device():
    """A launch for tensors on cuda:1 while cuda:0 is current runs inside torch.cuda.device(1); same device or CPU
    tensors: no guard.  (Mocked: no GPU here; the real thing is test_triton_on_second_gpu.)"""
    entered = []

    class _Guard:
        def __init__(self, idx):
            self.idx = idx

        def __enter__(self):
            entered.append(self.idx)

        def __exit__(self, *exc):
            return False

    kern = _FakeKernel()
    with mock.patch.object(torch.cuda, "current_device", return_value=0), \
            mock.patch.object(torch.cuda, "device", _Guard):
        lc.launch(kern, (3,), 1, 2, device=torch.device("cuda", 1), BLOCK=4)
        assert entered == [1]
        lc.launch(kern, (3,), device=torch.device("cuda", 0))
        lc.launch(kern, (3,), torch.zeros(1))          # device inferred: CPU, no guard
        assert entered == [1]
    assert kern.calls[0] == ((3,), (1, 2), {"BLOCK": 4}), "device= must not be forwarded to the kernel"


def test_every_op_passes_its_tensors_device_to_launch():
    seen = []
    real = lc.launch

    def spy(kernel, grid, *args, device=None, **kwargs):
        seen.append(device)
        return real(kernel, grid, *args, device=device, **kwargs)

    ts = [torch.randn(5), torch.randn(3)]
    z = lambda: [torch.zeros(5), torch.zeros(3)]  # noqa: E731
    with mock.patch.multiple(kfs, launch=spy), mock.patch.multiple(K._fi, launch=spy), \
            mock.patch.multiple(K._sp, launch=spy):
        K.fip_step_(_clone(ts), ts, None, [None] * 2, [None] * 2, z(), z(), z(), lr=0.1, momentum=0.9,
                    nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None, restore_scale=None,
                    precondition=True, damping=1e-3, step=[1, 2], next_pert_scale=0.1, found_inf=None)
        K.perturb_(_clone(ts), ts, 0.1)
        K.fisher_accumulate_(z(), ts, 0.9, 0.1)
        K.global_norm(ts)
        K.spectral_weight(torch.randn(6, 4), torch.rand(4), torch.randn(4), torch.randn(4, 5))
        K.spectral_linear_grad(torch.randn(3, 5), torch.randn(3, 6), torch.randn(6, 4), torch.rand(4),
                               torch.randn(4), torch.randn(4, 5))
    assert seen == [torch.device("cpu")] * 6


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2),
                    reason="needs two CUDA devices")
def test_triton_on_second_gpu():
    """Parameters on cuda:1 while cuda:0 is current: every op runs on cuda:1 and matches the reference there."""
    ok, why = K.available("cuda")
    if not ok:
        pytest.skip(why)
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = [(BLOCK + 3,), (5, 7)]
    p = [torch.randn(s, generator=gen, device=dev) for s in shapes]
    g = [torch.randn(s, generator=gen, device=dev) for s in shapes]
    st = {k: [torch.zeros(s, device=dev) for s in shapes] for k in ("m", "f", "e")}
    st_r = {k: _clone(v) for k, v in st.items()}
    p_r = _clone(p)
    hyper = dict(lr=torch.tensor(0.1, device=dev), momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0,
                 beta=0.9, mix=None, restore_scale=None, precondition=True, damping=1e-3,
                 step=[torch.tensor(1.0, device=dev), torch.tensor(7.0, device=dev)], next_pert_scale=0.01,
                 found_inf=torch.tensor(0.0, device=dev))
    K.fip_step_(p, g, None, [None] * 2, [None] * 2, st["m"], st["f"], st["e"], **hyper)
    R.fip_step_(p_r, g, None, [None] * 2, [None] * 2, st_r["m"], st_r["f"], st_r["e"], **hyper)
    K.perturb_(p, g, 0.5)
    R.perturb_(p_r, g, 0.5)
    n, fi = K.global_norm(p)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
    for a, b in zip(p + st["m"] + st["e"], p_r + st_r["m"] + st_r["e"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(n, R.global_norm(p_r)[0], rtol=1e-5, atol=1e-6)
    assert n.device == dev and fi.item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# Non-contiguous (dense) layouts: channels_last; fallback to foreach for layouts the kernels cannot walk
# ----------------------------------------------------------------------------------------------------------

def _channels_last_model_tensors(gen):
    conv = torch.nn.Conv2d(3, 8, 3)
    conv2 = torch.nn.Conv2d(8, 4, 1)
    with torch.no_grad():
        for m in (conv, conv2):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), conv2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9, generator=gen).to(memory_format=torch.channels_last)
    model(x).square().sum().backward()
    ps = [q.detach() for q in model.parameters()]
    gs = [q.grad for q in model.parameters()]
    assert not ps[0].is_contiguous() and gs[0].stride() == ps[0].stride()
    return ps, gs


def test_channels_last_parameters_run_in_the_kernels(caplog):
    gen = torch.Generator().manual_seed(34)
    ps, gs = _channels_last_model_tensors(gen)
    like = lambda ts, f: [f(t.shape).to(memory_format=torch.channels_last) if t.dim() == 4 else f(t.shape)  # noqa: E731
                          for t in ts]
    f0 = like(ps, lambda s: torch.rand(s, generator=gen))
    a0 = [p + 0.1 * q for p, q in zip(ps, like(ps, lambda s: torch.randn(s, generator=gen)))]
    assert a0[0].stride() == ps[0].stride()
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, eta_r=0.7, beta=0.9, mix=None,
                 restore_scale=None, precondition=True, damping=1e-3, next_pert_scale=0.02, found_inf=None)
    out = {}
    with caplog.at_level("WARNING", logger="fip_fast"), lc.counting() as launches:
        for impl in (R, K):
            p = [t.clone(memory_format=torch.preserve_format) for t in ps]
            m, f = like(ps, torch.zeros), like(ps, torch.zeros)
            e = [0.01 * t for t in gs]
            for t in range(1, 4):
                impl.fip_step_(p, gs, None, f0, a0, m, f, e, step=[torch.tensor(float(t + i)) for i in range(len(p))],
                               **hyper)
            impl.perturb_(p, gs, 0.3)
            impl.fisher_accumulate_(f, gs, 0.9, 0.1)
            out[impl.__name__] = (p, m, f, e, impl.global_norm(p + gs))
    assert not caplog.records, "channels_last tensors fell back"
    assert launches.by_kernel == {"_fip_step_kernel": 3, "_perturb_kernel": 1, "_fisher_kernel": 1, "_norm_kernel": 1}
    (pr, mr, fr, er, nr), (pk, mk, fk, ek, nk) = out[R.__name__], out[K.__name__]
    for a, b in zip(pk + mk + fk + ek, pr + mr + fr + er):
        assert a.stride() == b.stride()
        _close(a, b, what="channels_last")
    torch.testing.assert_close(nk[0], nr[0], rtol=1e-6, atol=1e-7)


def test_mismatched_layouts_fall_back_to_foreach_with_a_warning(caplog):
    """A contiguous gradient beside a channels_last parameter (and a strided view): foreach for that call, same
    results, one WARNING per reason — never an exception for an input foreach handles."""
    gen = torch.Generator().manual_seed(35)
    p = torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 3, 3, generator=gen)                   # contiguous
    view = torch.randn(6, 8, generator=gen)[:, ::2]               # strided, not dense
    gv = torch.randn(6, 4, generator=gen)
    hyper = dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                 restore_scale=None, precondition=True, damping=1e-3, step=[2, 5], next_pert_scale=None,
                 found_inf=None)
    res = {}
    mt._fallback_logged.clear()
    with caplog.at_level("WARNING", logger="fip_fast"):
        for impl in (R, K):
            ps = [p.clone(memory_format=torch.preserve_format), view.clone()]
            ps[1] = torch.zeros(6, 8)[:, ::2].copy_(view)
            m = [torch.zeros_like(p), torch.zeros(6, 4)]
            f = [torch.zeros_like(p), torch.zeros(6, 4)]
            with lc.counting() as launches:
                impl.fip_step_(ps, [g, gv], None, [None] * 2, [None] * 2, m, f, None, **hyper)
                impl.perturb_(ps, [g, gv], 0.5)
                impl.fisher_accumulate_(f, [g, gv], 0.9, 0.1)
                n = impl.global_norm([view, g])
            res[impl.__name__] = (ps, m, f, n)
            if impl is K:
                assert launches.by_kernel == {"_norm_kernel": 1}   # the norm copies the strided view instead
    flat = {k: [t for lst in v[:3] for t in lst] for k, v in res.items()}
    for a, b in zip(flat[K.__name__], flat[R.__name__]):
        _close(a, b, what="fallback")
    torch.testing.assert_close(res[K.__name__][3][0], res[R.__name__][3][0], rtol=1e-6, atol=1e-7)
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for op in ("fip_step_", "perturb_", "fisher_accumulate_"):
        assert sum(f"impl='triton' {op} falls back to impl='foreach'" in m for m in msgs) == 1, msgs
    # once per reason: a second call logs nothing new
    caplog.clear()
    with caplog.at_level("WARNING", logger="fip_fast"):
        K.perturb_([p.clone(memory_format=torch.preserve_format), torch.zeros(6, 8)[:, ::2]], [g, gv], 0.5)
    assert not caplog.records
