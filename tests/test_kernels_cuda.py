"""The CUDA C++ kernels (``impl="cuda"``, :mod:`fip_fast.backends.cuda`, extension ``fip_fast._C``) on a GPU.

Skipped without a CUDA device.  With one, the extension must load (installed, or JIT-built on first use): a
failed build fails ``test_extension_loads`` instead of skipping everything.  Run on a GPU machine with::

    TRITON_INTERPRET=0 TORCH_CUDA_ARCH_LIST=9.0 python -m pytest -m gpu tests/test_kernels_cuda.py

(``TRITON_INTERPRET=0``: tests/conftest.py defaults the Triton kernels to the CPU interpreter; the CUDA-vs-Triton
comparison needs them compiled.)

Tolerances, kernel vs reference (the reference run on the same GPU), after 20 steps:

=========  ==================  ===================================================================================
params     rtol / atol         why
=========  ==================  ===================================================================================
fp32       2e-5 / 1e-6         same operation order, but nvcc contracts a·b+c into FMAs (one rounding instead of
                               two) and the reference divides by the bias correction as a multiply by its reciprocal
fp16       2⁻⁹ / 1e-4          two fp16 ulps: fp32 results a bit apart can round to neighbouring fp16 values, and
                               the difference is fed back through θ for 20 steps
bf16       2⁻⁶ / 1e-3          two bf16 ulps, same reason
=========  ==================  ===================================================================================

fp32 state is compared at 2e-5 / 1e-6, or 1e-3 / 1e-4 when the parameters are fp16/bf16 (the state depends on θ
through the anchor and weight-decay terms, and θ itself is only known to an ulp of its dtype).
"""
from __future__ import annotations

import math

import pytest
import torch

from fip_fast import ops, reference
from fip_fast.backends import cuda as _cuda

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (torch.cuda.is_available() is False)")]

DEV = torch.device("cuda")
PTOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float16: dict(rtol=2.0 ** -9, atol=1e-4),
        torch.bfloat16: dict(rtol=2.0 ** -6, atol=1e-3)}
STOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-4),
        torch.bfloat16: dict(rtol=1e-3, atol=1e-4)}
MIN_CHUNK = 2048  # csrc/tables.h kMinChunk: the chunk for calls under ~8 * SMs * 2048 elements


def _ext():
    ok, reason = _cuda.available(DEV)
    assert ok, f"CUDA extension unavailable on a GPU machine: {reason}"
    return _cuda._extension()[0]


def test_extension_loads():
    ext = _ext()
    assert ext.CHUNK_MIN == MIN_CHUNK
    assert ops.resolve("cuda", DEV) == "cuda"
    assert ops.resolve("auto", DEV) == "cuda"


# Shape grid: empty, one element, odd, just above a chunk, 2-d, many small + one large, and a view at a 4-byte
# offset (misaligned: scalar path).  Total < 8 * 132 * 2048, so the chunk is MIN_CHUNK.
SHAPES = [(0,), (1,), (7,), (MIN_CHUNK + 1,), (2 * MIN_CHUNK + 3,), (33, 17)] + [(3,)] * 40 + [(300_001,)]


def _params(dtype, gen):
    ps = [torch.randn(s, generator=gen, device=DEV).to(dtype) for s in SHAPES]
    ps.append(torch.randn(MIN_CHUNK + 9, generator=gen, device=DEV).to(dtype)[1:])
    return ps


def _clone(ts):
    return [None if t is None else t.clone() for t in ts]


MODES = {
    "plain": dict(),
    "fd": dict(fd=True, weight_decay=1e-3),
    "lagged": dict(lagged=True),
    "precond_nesterov": dict(precondition=True, nesterov=True, weight_decay=5e-4),
    # each parameter's own state["step"] (fp32 CUDA 0-dim tensors; counts differ: 1 and 7 at the first step)
    "per_tensor_steps": dict(precondition=True, per_tensor_steps=True, lagged=True),
}


def _run(impl, P, G, A, mode, steps=20, seed=0, device_scalars=True):
    """`steps` steps of fip_step_ with `impl` from a seeded start; returns (params, mom, fisher, pert)."""
    m = MODES[mode]
    gen = torch.Generator(device=DEV).manual_seed(seed)
    params = _params(P, gen)
    fisher0 = [None if i % 3 == 1 else torch.rand(p.shape, generator=gen, device=DEV) for i, p in enumerate(params)]
    anchor = [None if f is None else (p.float() + 0.1 * torch.randn(p.shape, generator=gen, device=DEV)).to(A)
              for f, p in zip(fisher0, params)]
    mom = [torch.zeros(p.shape, device=DEV) for p in params]
    fisher = [torch.zeros(p.shape, device=DEV) for p in params]
    pert = [torch.zeros(p.shape, device=DEV) for p in params] if m.get("lagged") else None

    def sc(x):
        return torch.tensor(float(x), device=DEV) if (device_scalars and x is not None) else x

    offsets = [(0, 6, 2, 11)[i % 4] for i in range(len(params))]
    state_steps = [torch.tensor(float(o), device=DEV) for o in offsets]   # like the optimizer's state["step"]

    for step in range(1, steps + 1):
        for s in state_steps:
            s.add_(1.0)
        grads = [torch.randn(p.shape, generator=gen, device=DEV).to(G) for p in params]
        gpert = [(g.float() + 0.3 * torch.randn(g.shape, generator=gen, device=DEV)).to(G) for g in grads] \
            if m.get("fd") else None
        ops.fip_step_(params, grads, gpert, fisher0, anchor, mom, fisher, pert, impl=impl,
                      lr=sc(0.05), momentum=0.9, nesterov=m.get("nesterov", False),
                      weight_decay=m.get("weight_decay", 0.0), eta_r=0.5, beta=0.95,
                      mix=sc(0.7) if m.get("fd") else None, restore_scale=sc(0.01 * step) if m.get("fd") else None,
                      precondition=m.get("precondition", False), damping=1e-3,
                      step=(state_steps if device_scalars else [float(s) for s in state_steps])
                      if m.get("per_tensor_steps") else sc(step),
                      next_pert_scale=(sc(0.02) if step % 5 else None) if m.get("lagged") else None,
                      found_inf=sc(0.0) if step % 2 else None)
    return params, mom, fisher, pert


def _compare(got, want, P):
    names = ("param", "momentum", "fisher", "pert")
    for name, gs, ws in zip(names, got, want):
        if gs is None:
            continue
        for i, (g, w) in enumerate(zip(gs, ws)):
            tol = PTOL[P] if name == "param" else STOL[P]
            torch.testing.assert_close(g, w, **tol, msg=lambda s: f"{name}[{i}] shape {tuple(w.shape)}: {s}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("P,G,A", [(torch.float32, torch.float32, torch.float32),
                                   (torch.float16, torch.float16, torch.float32),
                                   (torch.bfloat16, torch.bfloat16, torch.float32),
                                   (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                   (torch.bfloat16, torch.float32, torch.float32)])
def test_fip_step_matches_reference_20_steps(mode, P, G, A):
    _ext()
    _compare(_run("cuda", P, G, A, mode), _run("reference", P, G, A, mode), P)


def test_fip_step_host_scalars_match_device_scalars():
    _ext()
    a = _run("cuda", torch.float32, torch.float32, torch.float32, "fd", steps=5, device_scalars=True)
    b = _run("cuda", torch.float32, torch.float32, torch.float32, "fd", steps=5, device_scalars=False)
    for xs, ys in zip(a, b):
        if xs is not None:
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("flag", [1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("P", [torch.float32, torch.float16, torch.bfloat16])
def test_found_inf_skips_bit_identically(flag, P):
    _ext()
    gen = torch.Generator(device=DEV).manual_seed(1)
    params = _params(P, gen)
    grads = [torch.randn(p.shape, generator=gen, device=DEV).to(P) for p in params]
    f0 = [torch.rand(p.shape, generator=gen, device=DEV) for p in params]
    anchor = [torch.randn(p.shape, generator=gen, device=DEV) for p in params]
    mom, fisher, pert = ([torch.randn(p.shape, generator=gen, device=DEV) for p in params] for _ in range(3))
    before = _clone(params + mom + fisher + pert)
    found_inf = torch.tensor(flag, device=DEV)
    ops.fip_step_(params, grads, None, f0, anchor, mom, fisher, pert, impl="cuda", lr=torch.tensor(0.1, device=DEV),
                  momentum=0.9, nesterov=True, weight_decay=0.1, eta_r=1.0, beta=0.9, mix=None, restore_scale=None,
                  precondition=True, damping=1e-3, step=torch.tensor(3.0, device=DEV), next_pert_scale=0.1,
                  found_inf=found_inf)
    ops.perturb_(params, grads, 0.5, found_inf, impl="cuda")
    for a, b in zip(params + mom + fisher + pert, before):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("P,G", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                 (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_perturb_and_fisher_match_reference(P, G):
    _ext()
    gen = torch.Generator(device=DEV).manual_seed(2)
    params = _params(P, gen)
    grads = [torch.randn(p.shape, generator=gen, device=DEV).to(G) for p in params]
    ref = _clone(params)
    for scale in (0.3, torch.tensor(-0.2, device=DEV), torch.tensor(0.1)):
        ops.perturb_(params, grads, scale, torch.tensor(0.0, device=DEV), impl="cuda")
        reference.perturb_(ref, grads, scale)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, **PTOL[P])
    fisher = [torch.rand(p.shape, generator=gen, device=DEV) for p in params]
    fref = _clone(fisher)
    for beta, alpha in ((0.9, 0.1), (torch.tensor(0.5, device=DEV), torch.tensor(0.5, device=DEV))):
        ops.fisher_accumulate_(fisher, grads, beta, alpha, impl="cuda")
        reference.fisher_accumulate_(fref, grads, beta, alpha)
    for a, b in zip(fisher, fref):
        torch.testing.assert_close(a, b, **STOL[torch.float32])


def test_global_norm_matches_reference_and_flags_nonfinite():
    _ext()
    gen = torch.Generator(device=DEV).manual_seed(3)
    ts = _params(torch.float32, gen) + _params(torch.float16, gen) + _params(torch.bfloat16, gen) + [None]
    norm, fi = ops.global_norm(ts, impl="cuda")
    rn, rfi = reference.global_norm(ts)
    assert norm.device.type == "cuda" and norm.dim() == 0 and fi.dim() == 0 and norm.dtype == torch.float32
    torch.testing.assert_close(norm, rn, rtol=1e-5, atol=0)
    assert fi.item() == 0.0 == rfi.item()
    for bad in (float("nan"), float("inf")):
        t = ts[3].clone()
        t[7] = bad
        assert ops.global_norm([ts[0], t], impl="cuda")[1].item() == 1.0
    big = torch.full((1000,), 3e19, device=DEV)  # squares overflow fp32: non-finite by contract
    assert ops.global_norm([big], impl="cuda")[1].item() == 1.0
    zero = ops.global_norm([torch.zeros(0, device=DEV)], impl="cuda")
    assert zero[0].item() == 0.0 and zero[1].item() == 0.0
    # deterministic: the same bits every call
    assert torch.equal(ops.global_norm(ts, impl="cuda")[0], norm)


def test_one_launch_per_call_and_cached_tables():
    ext = _ext()
    gen = torch.Generator(device=DEV).manual_seed(4)
    params = _params(torch.float32, gen)
    grads = [torch.randn(p.shape, generator=gen, device=DEV) for p in params]
    mom = [torch.zeros(p.shape, device=DEV) for p in params]
    fisher = [torch.zeros(p.shape, device=DEV) for p in params]
    none = [None] * len(params)
    kw = dict(lr=torch.tensor(0.1, device=DEV), momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9,
              mix=None, restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=None,
              found_inf=torch.tensor(0.0, device=DEV))
    ops.fip_step_(params, grads, None, none, none, mom, fisher, None, impl="cuda", **kw)  # warm: uploads the table
    c0 = ext.launch_counts()
    ops.fip_step_(params, grads, None, none, none, mom, fisher, None, impl="cuda", **kw)
    c1 = ext.launch_counts()
    assert c1["fip_step_kernel"] - c0["fip_step_kernel"] == 1
    assert c1["table_uploads"] == c0["table_uploads"], "same tensors: the cached table must be reused"
    # mixed dtypes: one launch per dtype combination
    half = [p.to(torch.bfloat16) for p in params]
    ops.fip_step_(params + half, grads + [g.to(torch.bfloat16) for g in grads], None, none * 2, none * 2,
                  mom + _clone(mom), fisher + _clone(fisher), None, impl="cuda", **kw)
    c2 = ext.launch_counts()
    assert c2["fip_step_kernel"] - c1["fip_step_kernel"] == 2
    ops.global_norm(grads, impl="cuda")
    c3 = ext.launch_counts()
    assert c3["l2norm_partials_kernel"] - c2["l2norm_partials_kernel"] == 1
    assert c3["l2norm_finalize_kernel"] - c2["l2norm_finalize_kernel"] == 1

    # What the GPU saw: exactly one kernel for a warm fip_step_ call (if the profiler sees CUDA activity here).
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ops.fip_step_(params, grads, None, none, none, mom, fisher, None, impl="cuda", **kw)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no CUDA activity here (CUPTI unavailable); counters checked above")
    assert len([k for k in kernels if "fip_step_kernel" in k]) == 1, kernels
    assert not [k for k in kernels if "emcpy" in k], f"no host-device copies expected, got {kernels}"


def test_cuda_graph_capture_replays_the_step():
    _ext()
    gen = torch.Generator(device=DEV).manual_seed(5)
    params = _params(torch.float32, gen)
    grads = [torch.randn(p.shape, generator=gen, device=DEV) for p in params]
    mom = [torch.zeros(p.shape, device=DEV) for p in params]
    fisher = [torch.zeros(p.shape, device=DEV) for p in params]
    none = [None] * len(params)
    lr, step, fi = (torch.tensor(v, device=DEV) for v in (0.1, 1.0, 0.0))
    kw = dict(lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4, eta_r=0.0, beta=0.9, mix=None,
              restore_scale=None, precondition=True, damping=1e-3, step=step, next_pert_scale=None, found_inf=fi)
    ref = (_clone(params), _clone(mom), _clone(fisher))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.fip_step_(params, grads, None, none, none, mom, fisher, None, impl="cuda", **kw)  # warm-up (table)
    torch.cuda.current_stream().wait_stream(s)
    reference.fip_step_(ref[0], grads, None, none, none, ref[1], ref[2], None, **kw)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.fip_step_(params, grads, None, none, none, mom, fisher, None, impl="cuda", **kw)
    for t in (2.0, 3.0):
        step.fill_(t)  # device scalars are read at replay time
        g.replay()
        reference.fip_step_(ref[0], grads, None, none, none, ref[1], ref[2], None, **{**kw, "step": t})
    torch.cuda.synchronize()
    # the capture itself ran nothing: warm-up + 2 replays = 3 steps, like the reference
    for a, b in zip(params + mom + fisher, ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(a, b, **STOL[torch.float32])


def test_unsupported_inputs_fall_back_to_foreach(caplog):
    _ext()
    _cuda._fallback_logged.clear()  # each fallback reason is logged once per process
    gen = torch.Generator(device=DEV).manual_seed(6)
    # fp64 parameters: no kernel instantiation -> foreach, logged
    params = [torch.randn(10, generator=gen, device=DEV, dtype=torch.float64)]
    grads = [torch.randn(10, generator=gen, device=DEV, dtype=torch.float64)]
    ref = _clone(params)
    with caplog.at_level("WARNING", logger="fip_fast"):
        ops.perturb_(params, grads, 0.5, impl="cuda")
    reference.perturb_(ref, grads, 0.5)
    torch.testing.assert_close(params[0], ref[0])
    assert "falls back to impl='foreach'" in caplog.text
    # a transposed (non-dense-compatible) gradient view
    p = torch.randn(8, 5, generator=gen, device=DEV)
    g = torch.randn(5, 8, generator=gen, device=DEV).t()
    pr = p.clone()
    ops.perturb_([p], [g], 0.5, impl="cuda")
    reference.perturb_([pr], [g], 0.5)
    torch.testing.assert_close(p, pr)


def test_channels_last_parameters_run_in_the_kernel():
    ext = _ext()
    gen = torch.Generator(device=DEV).manual_seed(7)
    p = torch.randn(4, 3, 5, 5, generator=gen, device=DEV).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 5, 5, generator=gen, device=DEV).to(memory_format=torch.channels_last)
    pr = p.clone()
    c0 = ext.launch_counts()["perturb_kernel"]
    ops.perturb_([p], [g], 0.25, impl="cuda")
    assert ext.launch_counts()["perturb_kernel"] == c0 + 1
    reference.perturb_([pr], [g], 0.25)
    torch.testing.assert_close(p, pr)


def test_int64_indexing_beyond_2_31_elements():
    _ext()
    n = 2 ** 31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip(f"needs {3 * n * 2 / 2**30:.1f} GiB free on the GPU")
    p = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    g = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    ops.perturb_([p], [g], 0.5, impl="cuda")
    assert p[-5:].float().eq(0.5).all() and p[:5].float().eq(0.5).all()
    assert p[2 ** 31 - 3: 2 ** 31 + 3].float().eq(0.5).all()
    assert int((p == 0.5).sum()) == n
    del g
    norm, fi = ops.global_norm([p], impl="cuda")
    assert math.isclose(norm.item(), math.sqrt(0.25 * n), rel_tol=1e-5) and fi.item() == 0.0


def test_per_tensor_steps_change_the_result_and_keep_the_table():
    """Per-tensor counts really are per tensor (differ from one shared count), and the optimizer's fp32 CUDA
    state["step"] tensors are used in place: the table is uploaded once, not every step."""
    ext = _ext()
    a = _run("cuda", torch.float32, torch.float32, torch.float32, "per_tensor_steps", steps=3)
    b = _run("cuda", torch.float32, torch.float32, torch.float32, "per_tensor_steps", steps=3, device_scalars=False)
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)        # device counts == the same counts as numbers
    gen = torch.Generator(device=DEV).manual_seed(9)
    p = [torch.randn(100, generator=gen, device=DEV) for _ in range(2)]
    g = [torch.randn(100, generator=gen, device=DEV) for _ in range(2)]
    st = [torch.tensor(1.0, device=DEV), torch.tensor(7.0, device=DEV)]
    kw = dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
              restore_scale=None, precondition=True, damping=1e-3, next_pert_scale=None, found_inf=None)
    z = lambda: [torch.zeros(100, device=DEV) for _ in range(2)]  # noqa: E731
    q1, q2 = _clone(p), _clone(p)
    ops.fip_step_(q1, g, None, [None] * 2, [None] * 2, z(), z(), None, impl="cuda", step=st, **kw)
    ops.fip_step_(q2, g, None, [None] * 2, [None] * 2, z(), z(), None, impl="cuda", step=1, **kw)
    assert torch.equal(q1[0], q2[0]) and not torch.equal(q1[1], q2[1])
    m, f = z(), z()
    ops.fip_step_(q1, g, None, [None] * 2, [None] * 2, m, f, None, impl="cuda", step=st, **kw)
    u0 = ext.launch_counts()["table_uploads"]
    for _ in range(3):
        for s in st:
            s.add_(1.0)
        ops.fip_step_(q1, g, None, [None] * 2, [None] * 2, m, f, None, impl="cuda", step=st, **kw)
    assert ext.launch_counts()["table_uploads"] == u0


def test_lagged_step_stores_pert_without_applying_it():
    _ext()
    gen = torch.Generator(device=DEV).manual_seed(10)
    p = [torch.randn(3000, generator=gen, device=DEV)]
    g = [torch.randn(3000, generator=gen, device=DEV)]
    pert = [0.01 * torch.randn(3000, generator=gen, device=DEV)]
    theta = p[0] - pert[0] - 0.1 * g[0]
    ops.fip_step_(p, g, None, [None], [None], [torch.zeros(3000, device=DEV)], [torch.zeros(3000, device=DEV)], pert,
                  impl="cuda", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                  restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=0.03, found_inf=None)
    torch.testing.assert_close(p[0], theta, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pert[0], 0.03 * g[0], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_first_is_current():
    """Parameters on cuda:1, current device cuda:0: the binding's CUDAGuard launches on cuda:1."""
    _ext()
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    gen = torch.Generator(device=dev).manual_seed(11)
    p = [torch.randn(5000, generator=gen, device=dev)]
    g = [torch.randn(5000, generator=gen, device=dev)]
    pr = _clone(p)
    mom, fis = [torch.zeros(5000, device=dev)], [torch.zeros(5000, device=dev)]
    mr, fr = _clone(mom), _clone(fis)
    kw = dict(lr=torch.tensor(0.1, device=dev), momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9,
              mix=None, restore_scale=None, precondition=True, damping=1e-3, step=[torch.tensor(3.0, device=dev)],
              next_pert_scale=None, found_inf=torch.tensor(0.0, device=dev))
    ops.fip_step_(p, g, None, [None], [None], mom, fis, None, impl="cuda", **kw)
    reference.fip_step_(pr, g, None, [None], [None], mr, fr, None, **kw)
    n, _ = ops.global_norm(p, impl="cuda")
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0 and n.device == dev
    torch.testing.assert_close(p[0], pr[0], **PTOL[torch.float32])


@pytest.mark.parametrize("mode", ["plain", "fd", "lagged", "precond_nesterov", "per_tensor_steps"])
@pytest.mark.parametrize("P", [torch.float32, torch.bfloat16])
def test_cuda_agrees_with_triton(mode, P):
    from fip_fast import kernels
    ok, why = kernels.available(DEV)
    if not ok:
        pytest.skip(f"Triton kernels unavailable on CUDA: {why} (run with TRITON_INTERPRET=0)")
    _ext()
    _compare(_run("cuda", P, P, torch.float32, mode), _run("triton", P, P, torch.float32, mode), P)


def test_spectral_ops_match_reference_on_gpu():
    _ext()
    gen = torch.Generator(device=DEV).manual_seed(8)
    m, n, r, N, T = 64, 48, 48, 16, 4
    U = torch.randn(m, r, generator=gen, device=DEV)
    S = torch.rand(r, generator=gen, device=DEV) + 0.1
    Vh = torch.randn(r, n, generator=gen, device=DEV)
    d = 0.3 * torch.randn(r, generator=gen, device=DEV)
    res = torch.randn(m, n, generator=gen, device=DEV)
    for rel in (False, True):
        torch.testing.assert_close(ops.spectral_weight(U, S, d, Vh, res, rel, impl="cuda"),
                                   reference.spectral_weight(U, S, d, Vh, res, rel), rtol=1e-4, atol=1e-4)
        x = torch.randn(N, T, n, generator=gen, device=DEV)
        go = torch.randn(N, T, m, generator=gen, device=DEV)
        for a, b in zip(ops.spectral_linear_grad(x, go, U, S, d, Vh, rel, impl="cuda"),
                        reference.spectral_linear_grad(x, go, U, S, d, Vh, rel)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
