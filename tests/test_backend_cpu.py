"""impl="cpu": the fused C++ CPU kernels against the reference (fip_fast.backends.cpu)."""
from __future__ import annotations

import logging

import pytest
import torch

from fip_fast import ops, reference
from fip_fast.backends import _cxx, cpu, foreach

OK, REASON = cpu.available(torch.device("cpu"))
pytestmark = pytest.mark.skipif(not OK, reason=f"impl='cpu' unavailable: {REASON}")

SIZES = [(1,), (7,), (1031,), (0,), (3, 5, 7), (70000,)]


def _rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _state(seed, sizes=SIZES, anchor_mask=None, pert=False, gp=False):
    ps = [_rand(s, seed + i) for i, s in enumerate(sizes)]
    anchor_mask = anchor_mask or [True] * len(sizes)
    st = dict(
        params=ps,
        fisher0=[_rand(s, seed + 100 + i).abs() if m else None for i, (s, m) in enumerate(zip(sizes, anchor_mask))],
        anchor=[(p + _rand(p.shape, seed + 200 + i, 0.1)) if m else None
                for i, (p, m) in enumerate(zip(ps, anchor_mask))],
        momentum_buf=[_rand(s, seed + 300 + i, 0.01) for i, s in enumerate(sizes)],
        fisher=[_rand(s, seed + 400 + i, 0.01).abs() for i, s in enumerate(sizes)],
        pert=[_rand(s, seed + 500 + i, 0.001) for i, s in enumerate(sizes)] if pert else None,
    )
    return st


def _clone(st):
    return {k: None if v is None else [None if t is None else t.clone() for t in v] for k, v in st.items()}


def _grads(sizes, seed, gp):
    g = [_rand(s, seed + 600 + i) for i, s in enumerate(sizes)]
    gps = [x + _rand(x.shape, seed + 700 + i, 0.1) for i, x in enumerate(g)] if gp else None
    return g, gps


VARIANTS = {
    "plain": dict(),
    "fd_restore": dict(gp=True, restore=True),
    "lagged": dict(pert=True),
    "lagged_none_scale": dict(pert=True, nps_none=True),
    "precondition_steps": dict(precondition=True, per_tensor_steps=True),
    "nesterov_wd": dict(nesterov=True, weight_decay=5e-4),
    "anchor_mixed": dict(anchor_mask=[True, False, True, False, True, False], weight_decay=1e-4),
    "everything_fd": dict(gp=True, restore=True, precondition=True, nesterov=True, weight_decay=1e-3,
                          anchor_mask=[False, True, True, True, False, True], tensor_scalars=True),
    "everything_lagged": dict(pert=True, precondition=True, per_tensor_steps=True, nesterov=True,
                              weight_decay=1e-3, anchor_mask=[True, False, True, True, False, True]),
}


def _hyper(v, k):
    sc = (lambda x: torch.tensor(x, dtype=torch.float32)) if v.get("tensor_scalars") else (lambda x: x)
    n = len(SIZES)
    step = [k + 1 + 3 * i for i in range(n)] if v.get("per_tensor_steps") else sc(float(k + 1))
    return dict(lr=sc(0.05), momentum=0.9, nesterov=v.get("nesterov", False), weight_decay=v.get("weight_decay", 0.0),
                eta_r=0.7, beta=0.95, mix=sc(0.3) if v.get("gp") else None,
                restore_scale=sc(0.02) if v.get("restore") else None, precondition=v.get("precondition", False),
                damping=1e-3, step=step, next_pert_scale=None if v.get("nps_none") else sc(0.01), found_inf=None)


def _run_step(fn, st, g, gp, h):
    fn(st["params"], g, gp, st["fisher0"], st["anchor"], st["momentum_buf"], st["fisher"], st["pert"], **h)


def _assert_same(a, b, exact=True):
    for k in a:
        if a[k] is None:
            continue
        for x, y in zip(a[k], b[k]):
            if x is None:
                continue
            if exact:
                assert torch.equal(x, y) or (x.numel() == 0), (k, (x - y).abs().max())
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fip_step_matches_reference_20_steps(variant):
    v = VARIANTS[variant]
    st_ref = _state(1, anchor_mask=v.get("anchor_mask"), pert=v.get("pert", False))
    st_cpu = _clone(st_ref)
    for k in range(20):
        g, gp = _grads(SIZES, 10 * k, v.get("gp", False))
        h = _hyper(v, k)
        _run_step(reference.fip_step_, st_ref, g, gp, h)
        _run_step(cpu.fip_step_, st_cpu, g, gp, h)
    # same fp32 operations in the same order: bit-identical (tolerance only as a safety margin if not)
    _assert_same(st_ref, st_cpu, exact=True)


def test_fip_step_found_inf_skips_bit_identical():
    v = VARIANTS["everything_lagged"]
    st = _state(3, pert=True)
    before = _clone(st)
    g, gp = _grads(SIZES, 5, False)
    for flag in (1.0, torch.tensor(1.0), torch.tensor(float("inf"))):
        h = dict(_hyper(v, 0), found_inf=flag)
        _run_step(cpu.fip_step_, st, g, gp, h)
        _assert_same(before, st, exact=True)
    p = [t.clone() for t in st["params"]]
    cpu.perturb_(p, g, 0.5, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(p, st["params"]))
    h = dict(_hyper(v, 0), found_inf=torch.tensor(0.0))   # a zero flag steps
    _run_step(cpu.fip_step_, st, g, gp, h)
    assert not torch.equal(st["params"][2], before["params"][2])


def test_non_contiguous_layouts():
    # channels-last parameters with matching state: the kernels (same layout); a transposed grad: fallback
    p = _rand((4, 3, 5, 5), 0).to(memory_format=torch.channels_last)
    g = _rand((4, 3, 5, 5), 1).to(memory_format=torch.channels_last)
    st = dict(params=[p], fisher0=[None], anchor=[None], momentum_buf=[torch.zeros_like(p)],
              fisher=[torch.zeros_like(p)], pert=None)
    ref = _clone(st)
    h = _hyper({}, 0)
    _run_step(reference.fip_step_, ref, [g], None, h)
    _run_step(cpu.fip_step_, st, [g], None, h)
    _assert_same(ref, st)
    q = _rand((6, 5), 2)
    gq = _rand((5, 6), 3).t()
    q2 = q.clone()
    cpu.perturb_([q], [gq], 0.1)
    reference.perturb_([q2], [gq], 0.1)
    assert torch.equal(q, q2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_fp32_falls_back_to_foreach(dtype, caplog):
    sizes = [(7,), (1031,)]
    ps = [_rand(s, i).to(dtype) for i, s in enumerate(sizes)]
    g = [_rand(s, 10 + i).to(dtype) for i, s in enumerate(sizes)]
    mk = lambda: dict(params=[p.clone() for p in ps], fisher0=[None, None], anchor=[None, None],  # noqa: E731
                      momentum_buf=[torch.zeros(s) for s in sizes], fisher=[torch.zeros(s) for s in sizes], pert=None)
    if dtype == torch.float64:
        mk0 = mk
        mk = lambda: {k: (None if v is None else [None if t is None else t.double() for t in v])  # noqa: E731
                      for k, v in mk0().items()}
    a, b = mk(), mk()
    h = _hyper({}, 0)
    with caplog.at_level(logging.INFO, logger="fip_fast"):
        _run_step(cpu.fip_step_, a, g, None, h)
    _run_step(foreach.fip_step_, b, g, None, h)
    _assert_same(a, b)
    f1, f2 = [torch.ones(s) for s in sizes], [torch.ones(s) for s in sizes]
    cpu.fisher_accumulate_(f1, g, 0.9, 0.1)
    foreach.fisher_accumulate_(f2, g, 0.9, 0.1)
    assert all(torch.equal(x, y) for x, y in zip(f1, f2))
    n1, i1 = cpu.global_norm(g)
    n2, i2 = foreach.global_norm(g)
    assert torch.equal(n1, n2) and torch.equal(i1, i2)


class _Sub(torch.Tensor):
    pass


def test_tensor_subclass_falls_back():
    # DTensor (FSDP2) and other subclasses: data_ptr need not be the elements -> the foreach backend
    p = _rand((9,), 0).as_subclass(_Sub)
    g = _rand((9,), 1).as_subclass(_Sub)
    q = p.clone()
    cpu.perturb_([p], [g], 0.5)
    foreach.perturb_([q], [g], 0.5)
    assert torch.equal(p.as_subclass(torch.Tensor), q.as_subclass(torch.Tensor))
    n1, _ = cpu.global_norm([g])
    n2, _ = foreach.global_norm([g])
    assert torch.equal(n1.as_subclass(torch.Tensor), n2.as_subclass(torch.Tensor))


@pytest.mark.parametrize("case", ["finite", "inf", "nan", "overflow", "empty", "none"])
def test_global_norm(case):
    ts = [_rand(s, i) for i, s in enumerate(SIZES)]
    if case == "inf":
        ts[2][5] = float("inf")
    elif case == "nan":
        ts[1][3] = float("nan")
    elif case == "overflow":   # every element finite, the fp32 sum of squares is not
        ts[2][0] = 3e19
    elif case == "empty":
        ts = [torch.zeros(0)]
    elif case == "none":
        ts = [None, ts[2], None]
    n_ref, f_ref = reference.global_norm(ts)
    n, f = cpu.global_norm(ts)
    assert n.dtype == torch.float32 and f.dtype == torch.float32 and n.shape == () and f.shape == ()
    assert torch.equal(f, f_ref), (f, f_ref)
    if case in ("finite", "empty", "none"):
        torch.testing.assert_close(n, n_ref, rtol=1e-6, atol=0)
    else:
        assert not torch.isfinite(n)


def test_perturb_and_fisher_accumulate_match_reference():
    ps = [_rand(s, i) for i, s in enumerate(SIZES)]
    g = [_rand(s, 50 + i) for i, s in enumerate(SIZES)]
    p1, p2 = [p.clone() for p in ps], [p.clone() for p in ps]
    for scale in (0.3, torch.tensor(-0.7), -1.0):
        cpu.perturb_(p1, g, scale)
        reference.perturb_(p2, g, scale)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    f1, f2 = [p.abs() for p in ps], [p.abs() for p in ps]
    for beta, alpha in ((0.95, 0.05), (torch.tensor(0.5), torch.tensor(0.25)), (1.0, 1.0 / 3)):
        cpu.fisher_accumulate_(f1, g, beta, alpha)
        reference.fisher_accumulate_(f2, g, beta, alpha)
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))


def test_threads_give_the_same_bits():
    sizes = [(300_000,), (1031,)]
    st = _state(7, sizes=sizes, pert=True)
    st2 = _clone(st)
    g, _ = _grads(sizes, 1, False)
    h = _hyper(dict(pert=True, precondition=True), 0)
    h["step"] = 1.0
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _run_step(cpu.fip_step_, st, g, None, h)
        torch.set_num_threads(2)
        _run_step(cpu.fip_step_, st2, g, None, h)
    finally:
        torch.set_num_threads(old)
    _assert_same(st, st2)


def test_ops_registry_and_version_bump():
    assert "cpu" in ops.IMPLS and ops.resolve("cpu", "cpu") == "cpu"
    with pytest.raises(ops.ImplUnavailableError):
        ops.resolve("cpu", "meta")
    p = torch.zeros(5)
    v = p._version
    ops.perturb_([p], [torch.ones(5)], 1.0, impl="cpu")
    assert p._version > v and torch.equal(p, torch.ones(5))


def test_auto_picks_cpu_on_cpu_tensors():
    assert ops.resolve("auto", "cpu") == "cpu"
    assert ops.get("fip_step_", "auto", "cpu") is cpu.fip_step_
    assert ops.get("spectral_update_", "auto", "cpu") is cpu.spectral_update_


def test_auto_falls_back_to_foreach_when_unavailable(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda device: (False, "compiling fip_cpu.cpp failed: (test)"))
    assert ops.resolve("auto", "cpu") == "foreach"
    with pytest.raises(ops.ImplUnavailableError, match="failed"):
        ops.resolve("cpu", "cpu")


@pytest.mark.parametrize("env", [dict(FIP_FAST_CPU="0"), dict(broken_source=True)])
def test_auto_falls_back_to_foreach_when_the_build_fails(tmp_path, env):
    """A fresh process where the kernels can't be had: auto steps with foreach, an explicit impl="cpu" raises."""
    import os
    import sys

    from _hang import run

    e = dict(os.environ, FIP_FAST_CPU_CACHE=str(tmp_path / "cache"))
    if env.get("broken_source"):
        (tmp_path / "csrc" / "cpu").mkdir(parents=True)
        (tmp_path / "csrc" / "cpu" / cpu.SOURCE_NAME).write_text("not C++\n")
        e["FIP_FAST_CSRC"] = str(tmp_path / "csrc")
    else:
        e.update(env)
    code = (
        "import torch\n"
        "from fip_fast import ops, FIP\n"
        "assert ops.resolve('auto', 'cpu') == 'foreach', ops.resolve('auto', 'cpu')\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "FIP([p], lr=0.1, momentum=0.0, eta_F=0.0).step()\n"
        "assert torch.allclose(p.detach(), torch.full((3,), 0.9)), p\n"
        "try:\n"
        "    ops.resolve('cpu', 'cpu')\n"
        "except ops.ImplUnavailableError as exc:\n"
        "    print('unavailable:', exc)\n"
        "else:\n"
        "    raise SystemExit('impl=cpu resolved')\n"
    )
    r = run([sys.executable, "-c", code], env=e)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "unavailable:" in r.stdout and ("FIP_FAST_CPU=0" in r.stdout or "failed" in r.stdout), r.stdout


def test_build_failure_is_reported(broken_csrc, monkeypatch):
    broken_csrc(cpu.SOURCE_NAME)
    with pytest.raises(RuntimeError, match="failed"):
        cpu._build()
    monkeypatch.setenv("FIP_FAST_CXX", "/nonexistent-compiler")
    monkeypatch.setenv("CXX", "/nonexistent-compiler")
    monkeypatch.setattr(_cxx.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu._build()


def test_build_cache_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FIP_FAST_CPU_CACHE", str(tmp_path))
    cpu._build()
    assert cpu.build_seconds > 0
    sos = list(tmp_path.glob("fip_cpu_*.so"))
    assert len(sos) == 1 and not list(tmp_path.glob(".fip_cpu_*"))
    cpu._build()
    assert cpu.build_seconds == 0.0


def test_concurrent_first_builds_do_not_clash(tmp_path):
    """Two processes building into one empty cache at once: both load a complete library, one .so remains."""
    import os
    import subprocess
    import sys

    from _hang import communicate

    e = dict(os.environ, FIP_FAST_CPU_CACHE=str(tmp_path))
    code = "import torch; from fip_fast.backends import cpu; ok, why = cpu.available(torch.device('cpu')); " \
           "assert ok, why; p = torch.zeros(3); cpu.perturb_([p], [torch.ones(3)], 2.0); assert p.sum() == 6"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=e, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for pr in procs:
        _, err = communicate(pr, "a concurrent build")
        assert pr.returncode == 0, err
    assert len(list(tmp_path.glob("fip_cpu_*.so"))) == 1 and not list(tmp_path.glob(".fip_cpu_*"))


@pytest.mark.parametrize("kw", [
    dict(trace_estimator="fd", trace_every=2, weight_decay=1e-3, anchored=True),
    dict(trace_estimator="lagged", trace_every=1, nesterov=True, precondition="fisher", anchored=True),
    dict(trace_estimator="batch", eta_F=0.0),
])
def test_fip_end_to_end_matches_reference(kw):
    from fip_fast.optim import FIP

    kw = dict(kw)
    anchored = kw.pop("anchored", False)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))

    def setup(impl):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        f0 = {p: torch.rand_like(p) for p in list(m.parameters())[:2]} if anchored else None
        return m, FIP(m.parameters(), lr=0.05, momentum=0.9, rho=0.05, fisher0=f0, impl=impl, **kw)

    runs = []
    for impl in ("reference", "cpu"):
        m, o = setup(impl)

        def closure():
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        for _ in range(10):
            o.step(closure)
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ spectral_update_
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_base", [True, False])
def test_spectral_update_matches_reference(dtype, tol, with_base):
    """W ← B + U·diag(s_new − s_old)·Vh: contiguous weights through addmm, a transposed (non-contiguous) weight
    view through the reference's form."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5, 3), (16, 24, 16), (1, 9, 1), (12, 6, 4)]
    W = [torch.randn(m, n, generator=g, dtype=dtype) for m, n, _ in shapes]
    W[-1] = torch.randn(6, 12, generator=g, dtype=dtype).t()                    # a (12, 6) view, not contiguous
    U = [torch.randn(m, k, generator=g, dtype=dtype) for m, _, k in shapes]
    Vh = [torch.randn(k, n, generator=g, dtype=dtype) for _, n, k in shapes]
    so = [torch.rand(k, generator=g, dtype=dtype) for *_, k in shapes]
    sn = [torch.rand(k, generator=g, dtype=dtype) for *_, k in shapes]
    base = [torch.randn(m, n, generator=g, dtype=dtype) for m, n, _ in shapes] if with_base else None
    a, b = [w.clone() for w in W], [w.clone() for w in W]
    b[-1] = W[-1].clone().t().contiguous().t()                                   # keep the transposed layout
    reference.spectral_update_(a, U, Vh, so, sn, base)
    ops.spectral_update_(b, U, Vh, so, sn, base, impl="cpu")
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=tol, atol=tol)
    assert ops.get("spectral_update_", "cpu", "cpu") is cpu.spectral_update_


def _spectral_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_reparameterize_with_impl_cpu_matches_reference():
    """Fast FIP in place with impl="cpu" (the name FIP and purify take) trains like impl="reference"."""
    from fip_fast import spectral

    x = torch.randn(10, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    outs, merged = [], []
    for impl in ("reference", "cpu"):
        m = _spectral_model()
        opt = torch.optim.SGD(spectral.reparameterize(m, impl=impl), lr=0.05)
        seen = []
        for _ in range(4):
            opt.zero_grad()
            y = m(x)
            seen.append(y.detach())
            y.pow(2).mean().backward()
            opt.step()
        seen.append(m(x).detach())
        spectral.merge(m)
        outs.append(seen)
        merged.append([p.detach().clone() for p in m.parameters()])
    assert not torch.equal(outs[0][0], outs[0][-1])                               # δ did train
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for a, b in zip(*merged):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_purify_fast_fip_with_impl_cpu_matches_reference():
    from fip_fast.pipeline.run import purify

    g = torch.Generator().manual_seed(2)
    data = (torch.randn(48, 2, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    got = []
    for impl in ("reference", "cpu"):
        m, _ = purify(_spectral_model(), data, method="fast_fip", steps=4, batch_size=16, impl=impl, mix_band=0,
                      val_fraction=0, progress=False)
        got.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_every_impl_name_implements_spectral_update_():
    """reparameterize(impl=...) takes the impl names FIP and purify take: every backend has the in-place update,
    and those that run here (triton under TRITON_INTERPRET=1) compute the reference's."""
    import importlib

    g = torch.Generator().manual_seed(3)
    U, Vh = torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)
    so, sn, W0 = torch.rand(2, generator=g), torch.rand(2, generator=g), torch.randn(5, 4, generator=g)
    want = W0.clone()
    reference.spectral_update_([want], [U], [Vh], [so], [sn])
    for name in ops.IMPLS:
        mod = importlib.import_module(ops._MODULES[name])
        assert callable(getattr(mod, "spectral_update_", None)), f"impl={name!r} lacks spectral_update_"
        if ops.availability(name, "cpu")[0]:
            W = W0.clone()
            ops.spectral_update_([W], [U], [Vh], [so], [sn], impl=name)
            torch.testing.assert_close(W, want, rtol=1e-6, atol=1e-6)


def test_sumsq_of_a_tensor_larger_than_a_block_matches_fp64():
    """The global norm's register-held fp32 lanes (16 per block, prefetched 1 KiB ahead) sum a 1 MiB tensor to the
    fp64 sum.  Its speed against ``torch.dot`` is a benchmark's business (docs/peers.md), not a test's."""
    lib = cpu._load()
    x = _rand((1 << 18,), 0)                      # 1 MiB
    tab = cpu._Table([[x]])
    ref = float((x.double() ** 2).sum())
    assert lib.sumsq_multi_f32(tab.ptrs, tab.sizes, tab.n, 1) == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------------------------------------------ skipped steps
#: the last tensor: eight blocks of 4096 elements (the parts the finiteness pass reads side by side) and a
#: 37-element tail summed on its own; the middle one above the kernels' OpenMP threshold
_SKIP_SHAPES = [(3, 5), (70_001,), (8 * 4096 + 37,)]
_SKIP_AT = {"last element of the last tensor": (2, -1), "end of the last tensor's parts": (2, 8 * 4096 - 1),
            "first element of the last tensor": (2, 0), "last element of the middle tensor": (1, -1),
            "first tensor": (0, 7)}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e19])
@pytest.mark.parametrize("where", list(_SKIP_AT))
def test_fip_step_cpu_skips_a_non_finite_gradient_anywhere(where, value):
    """``FIP.step`` with ``impl="cpu"`` (the finiteness pass over every gradient, then the fused kernel, through
    the step plan's cached pointer tables) skips a step whose gradients hold a NaN or ±Inf at any position — the
    tail of the last tensor included — or a finite value whose square overflows fp32 (3e19² > 3.4e38: the
    reference's fp32 sum of squares is inf there): parameters and every state tensor keep their bits, the skip is
    counted, and the next finite step moves every parameter."""
    from fip_fast.optim import FIP

    ps = [torch.nn.Parameter(_rand(s, 10 + i)) for i, s in enumerate(_SKIP_SHAPES)]
    opt = FIP(ps, lr=0.01, momentum=0.9, eta_F=0.0, eta_r=1.0, weight_decay=1e-4, impl="cpu",
              fisher0={p: _rand(p.shape, 20 + i).abs() for i, p in enumerate(ps)})
    for k in range(2):                          # state, a step plan and its cached tables exist
        for i, p in enumerate(ps):
            p.grad = _rand(p.shape, 30 + 10 * k + i)
        opt.step()
    t, pos = _SKIP_AT[where]
    ps[t].grad.view(-1)[pos] = value
    before = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, ps))
    for s, p in zip(state, ps):
        assert s.keys() == opt.state[p].keys()
        assert all(torch.equal(v, opt.state[p][k]) for k, v in s.items()), where
    ps[t].grad.view(-1)[pos] = 0.5
    opt.step()
    assert opt.skipped_steps == 1 and not any(torch.equal(a, p) for a, p in zip(before, ps))
