"""CI checks of the CUDA C++ backend that need no GPU (tests/test_kernels_cuda.py has the GPU ones).

* every ``csrc/*.cu`` compiles for sm_90 with the real toolkit (``nvcc -cubin``), with every dtype instantiation;
* the kernels' block bodies (``csrc/multi_tensor.cuh``), compiled as host code by g++ into a CPU emulator
  (``csrc/emulate.cpp``), match :mod:`fip_fast.reference` over 20 steps on the shape / dtype grid — arithmetic,
  chunk lookup, vector and scalar paths, found_inf skip, device-scalar reads;
* the build logic: no CUDA torch → pure-Python build, ``FIP_FAST_BUILD_CUDA=1`` → a clear error, and the
  dispatcher never picks or silently accepts ``impl="cuda"`` where it can't run.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from _hang import communicate, run

import fip_fast
from fip_fast import ops, reference
from fip_fast.backends import cuda as _cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
CUDA_HOME = _cuda.find_cuda_home()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
NO_NVCC = "no CUDA toolkit found (nvcc on PATH may be a wrapper; CUDA_HOME unset; /usr/local/cuda* absent)"

# Expected kernel instantiations per file: (name, count).  fip_step: P x G x A with A in {fp32, P}: 3*3 + 2*3.
INSTANTIATIONS = {
    "multi_tensor.cu": {"fisher_accumulate_kernel": 3, "perturb_kernel": 9, "fip_step_kernel": 15},
    "l2norm.cu": {"l2norm_partials_kernel": 3, "l2norm_finalize_kernel": 1},
}


# ------------------------------------------------------------------------------------------------------------------
# Builds, started together once per session (nvcc per .cu file, g++ for the emulator) to keep CI fast
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_build")
    procs = {}
    if NVCC:
        for f in CU_FILES:
            procs[f] = subprocess.Popen(
                [NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-cubin", "--Werror", "all-warnings", "-I", CSRC,
                 "-o", str(out / (f + ".cubin")), os.path.join(CSRC, f)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gxx = shutil.which("g++")
    if CUDA_HOME and gxx:
        procs["emulator"] = subprocess.Popen(
            [gxx, "-std=c++17", "-O0", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-shared",
             "-fPIC", "-I", os.path.join(CUDA_HOME, "include"), "-I", CSRC, "-o", str(out / "libfipemu.so"),
             os.path.join(CSRC, "emulate.cpp")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, p in procs.items():
        log, _ = communicate(p, name)
        results[name] = (p.returncode, log)
    return out, results


@pytest.mark.skipif(NVCC is None, reason=NO_NVCC)
@pytest.mark.parametrize("cu", CU_FILES)
def test_cu_compiles_for_sm90_with_every_instantiation(builds, cu):
    out, results = builds
    rc, log = results[cu]
    assert rc == 0, f"nvcc failed on csrc/{cu}:\n{log}"
    cubin = (out / (cu + ".cubin")).read_bytes()
    for kernel, n in INSTANTIATIONS.get(cu, {}).items():
        names = set(re.findall(rb"_Z\w*?" + kernel.encode() + rb"\w*", cubin))
        assert len(names) == n, f"{cu}: expected {n} instantiations of {kernel}, found {len(names)}"


def test_every_cu_file_is_known():
    assert set(CU_FILES) == set(INSTANTIATIONS), "a new .cu file needs its instantiations listed here"
    assert set(_cuda.CSRC_SOURCES) == {"bindings.cpp", *CU_FILES}, "setup.py / JIT source list out of date"


def test_nvcc_wrapper_is_resolved(tmp_path):
    """The nvcc on PATH here is a wrapper script; torch would take its folder for CUDA_HOME."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    wrapper = tmp_path / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{NVCC}" "$@"\n')
    wrapper.chmod(0o755)
    assert os.path.realpath(_cuda._nvcc_top(str(wrapper))) == os.path.realpath(CUDA_HOME)
    assert not _cuda._is_toolkit(str(tmp_path.parent))


# ------------------------------------------------------------------------------------------------------------------
# The CPU emulator: the kernels' block bodies against the reference
# ------------------------------------------------------------------------------------------------------------------

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VP = ctypes.c_void_p
I64P = ctypes.POINTER(ctypes.c_int64)


@pytest.fixture(scope="session")
def emu(builds):
    out, results = builds
    if "emulator" not in results:
        pytest.skip("g++ or the CUDA headers are missing: cannot build the CPU emulator")
    rc, log = results["emulator"]
    assert rc == 0, f"g++ failed on csrc/emulate.cpp:\n{log}"
    lib = ctypes.CDLL(str(out / "libfipemu.so"))
    lib.fipemu_pick_chunk.restype = ctypes.c_int64
    lib.fipemu_pick_chunk.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.fipemu_fisher_accumulate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(VP), ctypes.POINTER(VP),
                                             I64P, ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_double,
                                             ctypes.c_int]
    lib.fipemu_perturb.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(VP), ctypes.POINTER(VP),
                                   I64P, ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                                   ctypes.c_double, ctypes.c_int]
    lib.fipemu_fip_step.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int] + \
        [ctypes.POINTER(VP)] * 8 + [I64P, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    lib.fipemu_global_norm.argtypes = [ctypes.c_int, ctypes.POINTER(VP), ctypes.POINTER(ctypes.c_int), I64P,
                                       ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    for f in ("fisher_accumulate", "perturb", "fip_step", "global_norm"):
        getattr(lib, "fipemu_" + f).restype = ctypes.c_int
    return lib


def _ptrs(ts):
    return (VP * max(len(ts), 1))(*[None if t is None else t.data_ptr() for t in ts])


def _numel(ts):
    return (ctypes.c_int64 * max(len(ts), 1))(*[t.numel() for t in ts])


def _assert_same(a, b, what):
    """Bit-identical.

    The emulator runs the kernels' fp32 arithmetic in the reference's order, compiled with -ffp-contract=off, so on
    the CPU it reproduces every rounding of fip_fast.reference (torch's CPU ops round each op to fp32 too).  (On a
    GPU nvcc contracts into FMAs; tests/test_kernels_cuda.py uses tolerances.)"""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), \
        f"{what} differs: max |diff| {(a.double() - b.double()).abs().max().item() if a.numel() else 0}"


# Shape grid: empty, one element, odd, just above a chunk (chunk 64 here), 2-d, many small + one large, plus a
# tensor at a 4-byte offset (misaligned for vector loads: the scalar path).
CHUNK, NTHREADS = 64, 8
SHAPES = [(0,), (1,), (7,), (CHUNK + 1,), (3, 5)] + [(2,)] * 5 + [(1000,)]


def _make_params(dtype, gen):
    ps = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    base = torch.randn(CHUNK * 2 + 3, generator=gen).to(dtype)
    ps.append(base[1:])  # storage offset 1: misaligned
    return ps


def _emu_fip_step(emu, P, G, A, params, grads, gpert, f0, anchor, mom, fisher, pert, h, ptr_mode, chunk, nthreads):
    """One emulated step; ``h["step"]`` is one count or a list of per-tensor counts (read through per-entry
    pointers, like the binding's state["step"] tensors)."""
    per_tensor = isinstance(h["step"], (list, tuple))
    steps = (ctypes.c_float * len(h["step"]))(*[float(s) for s in h["step"]]) if per_tensor else None
    scal = (ctypes.c_double * 11)(h["lr"], h["mix"] or 0.0, h["restore_scale"] or 0.0, 1.0 if per_tensor else h["step"],
                                 h["next_pert_scale"] or 0.0, h["found_inf"] or 0.0, h["momentum"],
                                 h["weight_decay"], h["eta_r"], h["beta"], h["damping"])
    flags = (ctypes.c_int * 7)(int(h["nesterov"]), int(gpert is not None), int(h["restore_scale"] is not None),
                               int(pert is not None), int(h["precondition"]), int(h["found_inf"] is not None),
                               int(h["next_pert_scale"] is not None))
    n = len(params)
    none = [None] * n
    rc = emu.fipemu_fip_step(CODE[P], CODE[G], CODE[A], n, _ptrs(params), _ptrs(grads), _ptrs(gpert or none),
                             _ptrs(f0), _ptrs(anchor), _ptrs(mom), _ptrs(fisher), _ptrs(pert or none),
                             _numel(params), chunk, nthreads, scal, flags, ptr_mode, steps)
    assert rc == 0


MODES = {
    "plain": dict(),
    "fd": dict(fd=True, weight_decay=1e-3),
    "lagged": dict(lagged=True),
    "precond_nesterov": dict(precondition=True, nesterov=True, weight_decay=5e-4),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("P,G,A", [(torch.float32, torch.float32, torch.float32),
                                   (torch.float16, torch.float16, torch.float32),
                                   (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                   (torch.bfloat16, torch.float32, torch.float32)])
def test_emulated_fip_step_matches_reference_20_steps(emu, mode, P, G, A):
    m = MODES[mode]
    gen = torch.Generator().manual_seed(hash((mode, str(P), str(G), str(A))) % 2**31)
    params_ref = _make_params(P, gen)
    params_emu = [p.clone() if p.storage_offset() == 0 else
                  torch.cat([p.new_zeros(1), p])[1:] for p in params_ref]  # keep the misalignment
    assert params_emu[-1].storage_offset() == 1
    n = len(params_ref)
    fisher0 = [None if i % 3 == 1 else torch.rand(p.shape, generator=gen) for i, p in enumerate(params_ref)]
    anchor = [None if f is None else (p.float() + 0.1 * torch.randn(p.shape, generator=gen)).to(A)
              for f, p in zip(fisher0, params_ref)]

    def state():
        return [torch.zeros(p.shape) for p in params_ref]

    st = {k: (state(), state()) for k in ("mom", "fisher", "pert")}
    ptr_mode = 0
    for step in range(1, 21):
        grads = [torch.randn(p.shape, generator=gen).to(G) for p in params_ref]
        gpert = [(g.float() + 0.3 * torch.randn(g.shape, generator=gen)).to(G) for g in grads] if m.get("fd") else None
        h = dict(lr=0.05, momentum=0.9, nesterov=m.get("nesterov", False), weight_decay=m.get("weight_decay", 0.0),
                 eta_r=0.5, beta=0.95, mix=0.7 if m.get("fd") else None,
                 restore_scale=0.01 * step if m.get("fd") else None, precondition=m.get("precondition", False),
                 damping=1e-3, step=step, next_pert_scale=(0.02 if step % 5 else None) if m.get("lagged") else None,
                 found_inf=None if step % 2 else 0.0)
        pert_r = st["pert"][0] if m.get("lagged") else None
        pert_e = st["pert"][1] if m.get("lagged") else None
        reference.fip_step_(params_ref, grads, gpert, fisher0, anchor, st["mom"][0], st["fisher"][0], pert_r, **h)
        _emu_fip_step(emu, P, G, A, params_emu, grads, gpert, fisher0, anchor, st["mom"][1], st["fisher"][1], pert_e,
                      h, ptr_mode, CHUNK, NTHREADS)
        ptr_mode = (ptr_mode + 7) % 32  # alternate device-pointer and by-value scalars
    for i in range(n):
        _assert_same(params_emu[i], params_ref[i], f"param {i}")
        for k in ("mom", "fisher") + (("pert",) if m.get("lagged") else ()):
            _assert_same(st[k][1][i], st[k][0][i], f"{k} {i}")


@pytest.mark.parametrize("flag", [1.0, float("nan"), float("inf")])
def test_emulated_fip_step_found_inf_writes_nothing(emu, flag):
    gen = torch.Generator().manual_seed(1)
    for P in (torch.float32, torch.bfloat16):
        params = _make_params(P, gen)
        grads = [torch.randn(p.shape, generator=gen).to(P) for p in params]
        grads[2].view(-1)[0] = float("nan")
        f0 = [torch.rand(p.shape, generator=gen) for p in params]
        anchor = [torch.randn(p.shape, generator=gen) for p in params]
        mom, fisher, pert = ([torch.randn(p.shape, generator=gen) for p in params] for _ in range(3))
        before = [t.clone() for t in params + mom + fisher + pert]
        h = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, eta_r=1.0, beta=0.9, mix=None,
                 restore_scale=None, precondition=True, damping=1e-3, step=3, next_pert_scale=0.1, found_inf=flag)
        for ptr_mode in (0, 31):
            _emu_fip_step(emu, P, P, torch.float32, params, grads, None, f0, anchor, mom, fisher, pert, h, ptr_mode,
                          CHUNK, NTHREADS)
        for a, b in zip(params + mom + fisher + pert, before):
            _assert_same(a, b, "a tensor after a skipped step")


@pytest.mark.parametrize("lagged", [False, True])
def test_emulated_fip_step_per_tensor_steps(emu, lagged):
    """Each tensor's own step count (state["step"]) in its bias correction: counts that differ between tensors
    (1 and 7 at the first step, a late starter, ...), 20 steps, bit-identical to the reference; and really per
    tensor: one shared count gives other results."""
    gen = torch.Generator().manual_seed(21)
    params = _make_params(torch.float32, gen)
    n = len(params)
    f0 = [None if i % 3 == 1 else torch.rand(p.shape, generator=gen) for i, p in enumerate(params)]
    anchor = [None if f is None else p + 0.1 * torch.randn(p.shape, generator=gen) for f, p in zip(f0, params)]
    offsets = [(0, 6, 2, 11)[i % 4] for i in range(n)]      # tensor i has seen `offset` more steps
    ref = {k: [torch.zeros(p.shape) for p in params] for k in ("mom", "fisher", "pert")}
    em = {k: [torch.zeros(p.shape) for p in params] for k in ("mom", "fisher", "pert")}
    shared = {k: [torch.zeros(p.shape) for p in params] for k in ("mom", "fisher", "pert")}
    p_ref, p_emu, p_shared = [p.clone() for p in params], [p.clone() for p in params], [p.clone() for p in params]
    for t in range(1, 21):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        steps = [t + o for o in offsets]
        assert steps[0] == 1 and steps[1] == 7 if t == 1 else True
        h = dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=1e-3, eta_r=0.5, beta=0.9, mix=None,
                 restore_scale=None, precondition=True, damping=1e-3, step=steps,
                 next_pert_scale=0.02 if lagged else None, found_inf=None)
        reference.fip_step_(p_ref, grads, None, f0, anchor, ref["mom"], ref["fisher"],
                            ref["pert"] if lagged else None, **h)
        _emu_fip_step(emu, torch.float32, torch.float32, torch.float32, p_emu, grads, None, f0, anchor, em["mom"],
                      em["fisher"], em["pert"] if lagged else None, h, (3 * t) % 32, CHUNK, NTHREADS)
        _emu_fip_step(emu, torch.float32, torch.float32, torch.float32, p_shared, grads, None, f0, anchor,
                      shared["mom"], shared["fisher"], shared["pert"] if lagged else None, dict(h, step=t), 0,
                      CHUNK, NTHREADS)
    for i in range(n):
        _assert_same(p_emu[i], p_ref[i], f"param {i}")
        _assert_same(em["mom"][i], ref["mom"][i], f"momentum {i}")
    moved = [i for i in range(n) if offsets[i] and p_shared[i].numel() and not torch.equal(p_shared[i], p_ref[i])]
    assert moved, "per-tensor step counts made no difference: the kernel ignores them"


def test_emulated_lagged_step_stores_pert_without_applying_it(emu):
    """Lagged estimator: θ ← θ − pert_old − lr·u, pert ← next_pert_scale·g; θ is NOT perturbed by the step."""
    gen = torch.Generator().manual_seed(22)
    params = _make_params(torch.float32, gen)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    pert_old = [0.01 * torch.randn(p.shape, generator=gen) for p in params]
    none = [None] * len(params)
    for nps in (0.03, None):
        p, pert = [x.clone() for x in params], [e.clone() for e in pert_old]
        mom, fis = [torch.zeros(x.shape) for x in params], [torch.zeros(x.shape) for x in params]
        h = dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
                 restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=nps, found_inf=None)
        _emu_fip_step(emu, torch.float32, torch.float32, torch.float32, p, grads, None, none, none, mom, fis, pert,
                      h, 0, CHUNK, NTHREADS)
        for i in range(len(params)):
            _assert_same(p[i], (params[i] - pert_old[i]) - 0.1 * grads[i], f"param {i} (nps={nps})")
            _assert_same(pert[i], (nps or 0.0) * grads[i], f"pert {i} (nps={nps})")


def test_emulated_anchor_term_with_theta_ne_theta0(emu):
    """One step from zero state, momentum 0, θ ≠ θ0, F0 ≠ 0: θ_new = θ − lr·(g + η_r·F0·(θ − θ0) + wd·θ) — the
    anchor's sign and scale by hand (θ0 = θ would hide a sign flip)."""
    gen = torch.Generator().manual_seed(23)
    params = _make_params(torch.float32, gen)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    f0 = [torch.rand(p.shape, generator=gen) + 0.5 for p in params]
    anchor = [p + 1.0 + torch.rand(p.shape, generator=gen) for p in params]   # θ − θ0 ≤ −1 everywhere
    lr, eta_r, wd = 0.1, 0.7, 0.01
    want = [p.double() - lr * (g.double() + eta_r * f.double() * (p.double() - a.double()) + wd * p.double())
            for p, g, f, a in zip(params, grads, f0, anchor)]
    p = [x.clone() for x in params]
    mom, fis = [torch.zeros(x.shape) for x in params], [torch.zeros(x.shape) for x in params]
    h = dict(lr=lr, momentum=0.0, nesterov=False, weight_decay=wd, eta_r=eta_r, beta=0.9, mix=None,
             restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=None, found_inf=None)
    _emu_fip_step(emu, torch.float32, torch.float32, torch.float32, p, grads, None, f0, anchor, mom, fis, None, h,
                  0, CHUNK, NTHREADS)
    for i in range(len(params)):
        torch.testing.assert_close(p[i].double(), want[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("P,G", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_emulated_perturb_and_fisher_match_reference(emu, P, G):
    gen = torch.Generator().manual_seed(2)
    params = _make_params(P, gen)
    grads = [torch.randn(p.shape, generator=gen).to(G) for p in params]
    p_ref = [p.clone() for p in params]
    for ptr_mode, scale in ((0, 0.3), (1, -0.3)):
        reference.perturb_(p_ref, grads, scale)
        rc = emu.fipemu_perturb(CODE[P], CODE[G], len(params), _ptrs(params), _ptrs(grads), _numel(params), CHUNK,
                                NTHREADS, scale, 1, 0.0, ptr_mode)
        assert rc == 0
    for a, b in zip(params, p_ref):
        _assert_same(a, b, "perturbed param")
    before = [p.clone() for p in params]
    emu.fipemu_perturb(CODE[P], CODE[G], len(params), _ptrs(params), _ptrs(grads), _numel(params), CHUNK, NTHREADS,
                       0.3, 1, 1.0, 1)
    for a, b in zip(params, before):
        _assert_same(a, b, "param after a skipped perturb")

    fisher = [torch.rand(p.shape, generator=gen) for p in params]
    f_ref = [f.clone() for f in fisher]
    for ptr_mode in (0, 3):
        reference.fisher_accumulate_(f_ref, grads, 0.9, 0.1)
        rc = emu.fipemu_fisher_accumulate(CODE[G], len(params), _ptrs(fisher), _ptrs(grads), _numel(params), CHUNK,
                                          NTHREADS, 0.9, 0.1, ptr_mode)
        assert rc == 0
    for a, b in zip(fisher, f_ref):
        _assert_same(a, b, "fisher")


def _emu_norm(emu, ts, chunk=CHUNK, nthreads=NTHREADS):
    out = (ctypes.c_float * 2)()
    codes = (ctypes.c_int * max(len(ts), 1))(*[CODE[t.dtype] for t in ts])
    assert emu.fipemu_global_norm(len(ts), _ptrs(ts), codes, _numel(ts), chunk, nthreads, out) == 0
    return out[0], out[1]


def test_emulated_global_norm(emu):
    gen = torch.Generator().manual_seed(3)
    ts = _make_params(torch.float32, gen) + _make_params(torch.float16, gen) + _make_params(torch.bfloat16, gen)
    norm, fi = _emu_norm(emu, ts)
    ref_norm, ref_fi = reference.global_norm(ts)
    assert fi == 0.0 and float(ref_fi) == 0.0
    assert abs(norm - float(ref_norm)) <= 1e-5 * float(ref_norm)
    assert _emu_norm(emu, [torch.zeros(0)]) == (0.0, 0.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = ts[3].clone()
        t[5] = bad
        assert _emu_norm(emu, ts[:3] + [t])[1] == 1.0
    # squares that overflow fp32 count as non-finite (reference.global_norm's contract)
    big = torch.full((10,), 3e19)
    assert _emu_norm(emu, [big])[1] == 1.0 and float(reference.global_norm([big])[1]) == 1.0


def test_emulated_global_norm_sums_every_partial(emu):
    """More partials than the finalize block has threads (512) and than 1024: zeros in front, the values that
    matter in the last chunks (a finalize that stops early, or reads only its first stride, gives 0 or too little)."""
    n_chunks = 1100
    x = torch.zeros(n_chunks * CHUNK + 5)
    x[-1] = 3.0                            # the last, partial chunk
    x[(n_chunks - 2) * CHUNK + 7] = 4.0    # chunk 1098
    norm, fi = _emu_norm(emu, [x])
    assert fi == 0.0 and norm == 5.0
    y = torch.zeros(600 * CHUNK)           # 600 partials: just over one finalize stride
    y[-1] = 2.0
    assert _emu_norm(emu, [y, x]) == (float(torch.tensor(29.0).sqrt()), 0.0)


def test_emulated_default_geometry(emu):
    """The real launch geometry (256 threads, the chunk the binding picks for an H100's 132 SMs) on one step."""
    for total, sms in ((1, 132), (10**6, 132), (10**8, 132), (10**7, 1)):
        c = emu.fipemu_pick_chunk(total, sms)
        assert 2048 <= c <= 65536 and c & (c - 1) == 0
    gen = torch.Generator().manual_seed(4)
    sizes = [0, 1, 5, 2049, 4096 * 3 + 3, 70000]
    params = [torch.randn(s, generator=gen) for s in sizes]
    grads = [torch.randn(s, generator=gen) for s in sizes]
    chunk = emu.fipemu_pick_chunk(sum(sizes), 132)
    norm, _ = _emu_norm(emu, grads, chunk, 256)
    assert abs(norm - float(reference.global_norm(grads)[0])) <= 1e-5 * norm
    p_ref = [p.clone() for p in params]
    mom = [torch.zeros(s) for s in sizes]
    fis = [torch.zeros(s) for s in sizes]
    mom_r, fis_r = [m.clone() for m in mom], [f.clone() for f in fis]
    h = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None,
             restore_scale=None, precondition=False, damping=0.0, step=1, next_pert_scale=None, found_inf=None)
    none = [None] * len(sizes)
    reference.fip_step_(p_ref, grads, None, none, none, mom_r, fis_r, None, **h)
    _emu_fip_step(emu, torch.float32, torch.float32, torch.float32, params, grads, None, none, none, mom, fis, None,
                  h, 0, chunk, 256)
    for a, b in zip(params, p_ref):
        _assert_same(a, b, "param")


# ------------------------------------------------------------------------------------------------------------------
# Build logic and dispatch
# ------------------------------------------------------------------------------------------------------------------

def _setup_ext():
    spec = importlib.util.spec_from_file_location("_setup_ext_under_test", os.path.join(CSRC, "setup_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")


@cpu_torch
def test_setup_ext_without_cuda_torch(monkeypatch):
    se = _setup_ext()
    monkeypatch.delenv("FIP_FAST_BUILD_CUDA", raising=False)
    assert se.build_kwargs() == {}
    monkeypatch.setenv("FIP_FAST_BUILD_CUDA", "0")
    assert se.build_kwargs() == {}
    monkeypatch.setenv("FIP_FAST_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"FIP_FAST_BUILD_CUDA=1 .*CPU-only"):
        se.build_kwargs()
    monkeypatch.setenv("FIP_FAST_BUILD_CUDA", "yes")
    with pytest.raises(RuntimeError, match="must be 0, 1 or unset"):
        se.build_kwargs()


def test_setup_ext_forced_off_needs_nothing(monkeypatch):
    monkeypatch.setenv("FIP_FAST_BUILD_CUDA", "0")
    assert _setup_ext().build_kwargs() == {}


@cpu_torch
def test_setup_py_runs_pure_python():
    env = {k: v for k, v in os.environ.items() if k != "FIP_FAST_BUILD_CUDA"}
    r = run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "fip_fast"
    assert "building without the CUDA extension" in r.stderr


def test_package_imports_and_cuda_reports_why_not():
    assert fip_fast.ops is ops
    ok, reason = _cuda.available("cpu")
    assert not ok and "CUDA tensors only" in reason
    if not torch.cuda.is_available():
        ok, reason = _cuda.available("cuda")
        assert not ok and reason
        with pytest.raises(RuntimeError, match="CUDA extension unavailable"):
            _cuda.perturb_([torch.zeros(3)], [torch.zeros(3)], 1.0)


def test_resolve_cuda_on_cpu_raises_clearly():
    with pytest.raises(ops.ImplUnavailableError, match=r"impl='cuda' is not available for cpu tensors: .*CUDA"):
        ops.resolve("cuda", "cpu")
    with pytest.raises(ops.ImplUnavailableError):
        ops.get("fip_step_", impl="cuda", device="cpu")


def test_auto_never_picks_cuda_where_it_cannot_run():
    assert ops.resolve("auto", "cpu") != "cuda"
    if not torch.cuda.is_available():
        assert ops.resolve("auto", "cuda") != "cuda"


def test_scalar_conversion_keeps_host_values_on_host():
    dev = torch.device("cuda")
    assert _cuda._scalar(0.5, dev, "x") == (None, 0.5)
    assert _cuda._scalar(torch.tensor(2.0), dev, "x") == (None, 2.0)
    assert _cuda._scalar(torch.tensor([3], dtype=torch.int64), dev, "x") == (None, 3.0)
    with pytest.raises(ValueError, match="one-element"):
        _cuda._scalar(torch.ones(2), dev, "x")
    assert _cuda._found_inf(None, dev) == (False, None)
    assert _cuda._found_inf(torch.tensor(1.0), dev) == (True, None)
    assert _cuda._found_inf(float("nan"), dev) == (True, None)
    assert _cuda._found_inf(0.0, dev) == (False, None)


def test_per_tensor_step_counts_conversion():
    """_cuda._step_counts: equal host counts → the single-count path; differing ones → one fp32 tensor per entry
    on the device (CPU here, standing in for the device: the conversion is device-agnostic)."""
    cpu = torch.device("cpu")
    assert _cuda._step_counts([3, 3.0, torch.tensor(3)], cpu, 3) == (None, 3.0, None)
    t, v, steps = _cuda._step_counts([1, torch.tensor(7, dtype=torch.int64)], cpu, 2)
    assert t is None and [s.dtype for s in steps] == [torch.float32] * 2
    assert [float(s) for s in steps] == [1.0, 7.0] and all(s.dim() == 0 for s in steps)
    with pytest.raises(ValueError, match="one step count per tensor"):
        _cuda._step_counts([1, 2], cpu, 3)


# Spectral ops of impl="cuda" are torch ops (cuBLAS on a GPU): they run on CPU tensors too, so check them here.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relative", [False, True])
def test_cuda_spectral_ops_match_reference(dtype, relative):
    gen = torch.Generator().manual_seed(5)
    m, n, r, N, T = 7, 5, 5, 6, 3
    U = torch.randn(m, r, generator=gen, dtype=dtype)
    S = torch.rand(r, generator=gen, dtype=dtype) + 0.1
    Vh = torch.randn(r, n, generator=gen, dtype=dtype)
    delta = torch.randn(r, generator=gen, dtype=dtype) * 0.5
    res = torch.randn(m, n, generator=gen, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for residual in (None, res):
        torch.testing.assert_close(_cuda.spectral_weight(U, S, delta, Vh, residual, relative),
                                   reference.spectral_weight(U, S, delta, Vh, residual, relative), **tol)
    for shape_x, shape_g in (((N, n), (N, m)), ((N, T, n), (N, T, m))):
        x = torch.randn(shape_x, generator=gen, dtype=dtype)
        go = torch.randn(shape_g, generator=gen, dtype=dtype)
        got = _cuda.spectral_linear_grad(x, go, U, S, delta, Vh, relative)
        want = reference.spectral_linear_grad(x, go, U, S, delta, Vh, relative)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
