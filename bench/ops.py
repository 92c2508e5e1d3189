"""Microbenchmarks of the fused ops of fip_fast, every implementation side by side in one run.

::

    python -m bench ops                 # defaults for the device (CPU: seconds-scale sizes)
    python -m bench ops --quick         # tiny sizes (CI smoke)
    python -m bench ops --device cuda   # GPU sizes (flat tensor of 128 M elements, GPT-2 124 M, ...)

Ops and variants
----------------
``fisher_accumulate_``, ``global_norm``, ``perturb_``, ``fip_step_`` (``plain``: d = g + anchor;
``fd_mix``: a finite-difference suppressor step — restore θ = (θ+e) − e and mix g + c·(g' − g); ``lagged``: restore
from and write back the lagged perturbation), ``spectral_weight`` and ``spectral_linear_grad``.

Implementations
---------------
``reference`` (the spec: a Python for-loop over tensors, unfused), ``foreach`` (``torch._foreach_*``),
``compile`` (``torch.compile`` of the *reference's per-tensor math*: for the list ops, the reference op applied to a
one-element list of a **flat view** of each tensor is compiled once with ``dynamic=True`` and called tensor by
tensor — one fused kernel per tensor; for the spectral ops, the reference function itself is compiled),
``compile_loop`` (opt-in with ``--compile-loop``: the whole reference for-loop compiled, unrolled over the list),
``triton`` and ``cuda`` (when :func:`fip_fast.ops.availability` says they can run on the device; otherwise they
are listed as skipped with the reason).  Triton on CPU runs only in its interpreter (``TRITON_INTERPRET=1``),
which says nothing about speed: it is skipped on CPU unless ``--impls`` names it.

Scalars are given the way each implementation is used in :class:`fip_fast.FIP`: device 0-dim tensors for the mix
coefficient, restore / perturbation scales, step count and ``found_inf`` for ``foreach``/``triton``/``cuda``
(no host sync in the fused kernels; ``foreach`` reads ``found_inf`` on the host — one sync per call, as in the
optimizer); Python floats for ``reference`` and ``compile`` (a 0-dim tensor would force ``.item()``).

Bytes moved per element (fp32 everywhere; the *minimum* traffic of a fused one-pass implementation — unfused
paths move more, which is what the GB/s column shows)
-------------------------------------------------------------------------------------------------------------
See :data:`BYTES_ACCOUNTING`.  Achieved GB/s = bytes / median time; "% copy" divides by the bandwidth of a large
``dst.copy_(src)`` (8 bytes per element: one read, one write) measured in the same run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from fip_fast import ops as fops
from fip_fast import reference

from . import RESULTS_DIR, device_tag, environment, loadavg, pick_device, save_results, time_fn

SCHEMA = "fip_fast.bench.ops/1"

#: op/variant → (bytes per element of the list ops, the accounting in words)
BYTES_ACCOUNTING: dict[str, tuple[Optional[int], str]] = {
    "fisher_accumulate_": (12, "read F, read g, write F"),
    "global_norm": (4, "read g (one scalar out)"),
    "perturb_": (12, "read θ, read g, write θ"),
    "fip_step_/plain": (36, "read θ, g, F0, θ0, buf, F; write θ, buf, F"),
    "fip_step_/fd_mix": (40, "plain + read g′ (restore θ −= s·g uses the g already read)"),
    "fip_step_/lagged": (44, "plain + read pert, write pert"),
    "spectral_weight": (None, "read U (m·r), Vh (r·n), S, δ (2r); write W (m·n); FLOPs 2·m·r·n + m·r"),
    "spectral_linear_grad": (None, "read x (NT·n), g_out (NT·m), U (m·r), Vh (r·n); write grad (r), per-sample "
                                   "(N·r); FLOPs 2·NT·r·(n+m) + 2·NT·r"),
}

HYPER = dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=1.0, beta=0.95, precondition=False,
             damping=1e-3)


# ------------------------------------------------------------------------------------------------ parameter lists
def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2 (Hugging Face layout, tied LM head counted once): 148 tensors, 124.4 M
    elements for GPT-2 small (the defaults)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama7b_delta_shapes(n_layer: int = 32, d: int = 4096, ff: int = 11008) -> list[tuple[int, ...]]:
    """Fast FIP's δ tensors for a 7B Llama-style transformer: 7 projections per layer (q, k, v, o: d×d;
    gate, up: ff×d; down: d×ff), r = min(out, in) singular values each — which is d = 4096 for all seven."""
    mats = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)]
    return [(min(m, n),) for _ in range(n_layer) for (m, n) in mats]


def model_shapes(name: str) -> list[tuple[int, ...]]:
    from fip_fast.evaluation.models import build_model
    in_ch = 3 if "resnet" in name else 1
    return [tuple(p.shape) for p in build_model(name, 10, in_ch).parameters()]


def list_cases(device: torch.device, quick: bool, flat_numel: Optional[int] = None) -> dict[str, dict[str, Any]]:
    gpu = device.type == "cuda"
    if quick:
        cases = {
            "flat": dict(shapes=[(flat_numel or 65536,)], desc="one flat tensor (quick)"),
            "demo_cnn": dict(shapes=model_shapes("demo_cnn"), desc="DemoCNN parameter list (quick stand-in for "
                                                                   "ResNet-18)"),
            "gpt2_tiny": dict(shapes=gpt2_shapes(1, 64, 1000, 128), desc="GPT-2 layout, 1 layer, d=64 (quick)"),
            "deltas_small": dict(shapes=llama7b_delta_shapes(2, 64, 172), desc="δ of a 2-layer d=64 "
                                                                               "transformer (quick)"),
        }
    else:
        n = flat_numel or (128 * 2**20 if gpu else 4 * 2**20)
        cases = {
            "flat": dict(shapes=[(n,)], desc=f"one flat tensor of {n / 2**20:g} Mi elements"
                                            + ("" if gpu else " (CPU size: runs in seconds)")),
            "resnet18": dict(shapes=model_shapes("resnet18"), desc="ResNet-18 (CIFAR, fip_fast.evaluation.models) parameters"),
            "gpt2": dict(shapes=gpt2_shapes() if gpu else gpt2_shapes(n_layer=2),
                         desc="GPT-2 small parameter shapes (124 M)" if gpu else
                         "GPT-2 small shapes, 2 of 12 blocks + embeddings (CPU size; --gpt2-layers 12 for all)"),
            "deltas_7b": dict(shapes=llama7b_delta_shapes(), desc="Fast FIP δ of a 7B transformer: 32 layers × 7 "
                                                                  "projections, r = 4096"),
        }
    for c in cases.values():
        c["numel"] = sum(_numel(s) for s in c["shapes"])
        c["ntensors"] = len(c["shapes"])
    return cases


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def spectral_cases(device: torch.device, quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"weight": [dict(name="tiny 48×64", m=48, n=64)],
                "linear_grad": [dict(name="tiny N=4,T=2, 48×64", N=4, T=2, m=48, n=64)]}
    if device.type == "cuda":
        return {"weight": [dict(name="7B attn proj 4096×4096", m=4096, n=4096),
                           dict(name="7B MLP up 11008×4096", m=11008, n=4096),
                           dict(name="ResNet-18 layer4 conv 512×4608", m=512, n=4608)],
                "linear_grad": [dict(name="7B attn proj, N=8, T=512, 4096×4096", N=8, T=512, m=4096, n=4096),
                                dict(name="DemoCNN fc, N=128, 256×1024", N=128, T=1, m=256, n=1024)]}
    return {"weight": [dict(name="ResNet-18 layer4 conv 512×4608", m=512, n=4608),
                       dict(name="GPT-2 MLP 3072×768", m=3072, n=768)],
            "linear_grad": [dict(name="GPT-2 attn proj, N=8, T=64, 768×768", N=8, T=64, m=768, n=768),
                            dict(name="DemoCNN fc, N=128, 256×1024", N=128, T=1, m=256, n=1024)]}


# ------------------------------------------------------------------------------------------------ implementations
class _Compiled:
    """``torch.compile`` of the reference's per-tensor math (see the module docstring)."""

    def __init__(self, loop: bool = False):
        self.loop = loop
        self._fns: dict[str, Callable] = {}

    def _c(self, key: str, fn: Callable, dynamic: Optional[bool]) -> Callable:
        if key not in self._fns:
            self._fns[key] = torch.compile(fn, dynamic=dynamic)
        return self._fns[key]

    def fisher_accumulate_(self, fisher, grads, beta, alpha):
        if self.loop:
            return self._c("fa_loop", reference.fisher_accumulate_, False)(fisher, grads, beta, alpha)
        one = self._c("fa", lambda f, g, b, a: reference.fisher_accumulate_([f], [g], b, a), True)
        for f, g in zip(fisher, grads):
            one(f.view(-1), g.view(-1), beta, alpha)

    def global_norm(self, tensors):
        if self.loop:
            return self._c("gn_loop", reference.global_norm, False)(tensors)
        one = self._c("gn", lambda t: t.float().pow(2).sum(), True)
        sq = torch.stack([one(t.view(-1)) for t in tensors]).sum()
        norm = sq.sqrt()
        return norm, (~torch.isfinite(norm)).float()

    def perturb_(self, params, grads, scale, found_inf=None):
        if self.loop:
            return self._c("pt_loop", reference.perturb_, False)(params, grads, scale, found_inf)
        one = self._c("pt", lambda p, g, s: reference.perturb_([p], [g], s), True)
        for p, g in zip(params, grads):
            one(p.view(-1), g.view(-1), scale)

    def fip_step_(self, params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, **h):
        if self.loop:
            fn = self._c(f"fs_loop{grads_pert is None}{pert is None}", reference.fip_step_, False)
            return fn(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, **h)

        def step_one(p, g, gp, f0, a, b, f, e):
            reference.fip_step_([p], [g], None if gp is None else [gp], [f0], [a], [b], [f],
                                None if e is None else [e], **h)

        one = self._c(f"fs{grads_pert is None}{pert is None}", step_one, True)
        v = lambda t: None if t is None else t.view(-1)  # noqa: E731
        for i, p in enumerate(params):
            one(v(p), v(grads[i]), None if grads_pert is None else v(grads_pert[i]), v(fisher0[i]), v(anchor[i]),
                v(momentum_buf[i]), v(fisher[i]), None if pert is None else v(pert[i]))

    def spectral_weight(self, U, S, delta, Vh, residual=None, relative=False):
        return self._c("sw", reference.spectral_weight, False)(U, S, delta, Vh, residual, relative)

    def spectral_linear_grad(self, x, grad_out, U, S, delta, Vh, relative=False):
        return self._c("slg", reference.spectral_linear_grad, False)(x, grad_out, U, S, delta, Vh, relative)


def resolve_impls(device: torch.device, wanted: Optional[list[str]], compile_loop: bool,
                  explicit: bool = False) -> dict[str, dict]:
    """name → {available, reason, module-or-object, device_scalars}."""
    names = wanted or ["reference", "foreach", "compile"] + (["compile_loop"] if compile_loop else []) + \
        ["triton", "cuda"]
    out: dict[str, dict] = {}
    for name in names:
        if name in ("compile", "compile_loop"):
            out[name] = dict(available=True, reason="", obj=_Compiled(loop=name == "compile_loop"),
                             device_scalars=False)
            continue
        ok, reason = fops.availability(name, device)
        if ok and name == "triton" and device.type == "cpu" and not explicit:
            ok, reason = False, ("CPU tensors run only in the Triton interpreter (TRITON_INTERPRET=1), which is not "
                                 "meaningful for timing; pass --impls triton to run it anyway")
        obj = None
        if ok:
            obj = fops._module(name)[0] if name != "reference" else reference
        out[name] = dict(available=ok, reason=reason, obj=obj, device_scalars=name in ("foreach", "triton", "cuda"))
    return out


# ------------------------------------------------------------------------------------------------ op set-ups
def _lists(shapes, device, k: int, gen: torch.Generator) -> list[list[torch.Tensor]]:
    return [[torch.randn(s, generator=gen, device=device) for s in shapes] for _ in range(k)]


def _gen(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device``: inputs are drawn where they live (drawing 128 M elements on the host and copying
    them would dominate the GPU run)."""
    return torch.Generator(device=device).manual_seed(seed)


def _scalar(x: float, device: torch.device, as_tensor: bool):
    return torch.tensor(float(x), dtype=torch.float32, device=device) if as_tensor else float(x)


def make_list_op(op: str, variant: str, shapes, device: torch.device, impl: dict, seed: int = 0):
    """(callable running one call of the op with ``impl``, dict of the tensors it writes)."""
    gen = _gen(device, seed)
    obj, ds = impl["obj"], impl["device_scalars"]
    if op == "fisher_accumulate_":
        g, = _lists(shapes, device, 1, gen)
        F = [torch.rand(s, generator=gen, device=device) for s in shapes]
        return (lambda: obj.fisher_accumulate_(F, g, 0.95, 0.05)), dict(F=F)
    if op == "global_norm":
        g, = _lists(shapes, device, 1, gen)
        res = {}

        def run():
            res["out"] = obj.global_norm(g)
        return run, res
    if op == "perturb_":
        p, g = _lists(shapes, device, 2, gen)
        scale = _scalar(1e-3, device, ds)
        fi = _scalar(0.0, device, ds) if ds else None
        return (lambda: obj.perturb_(p, g, scale, fi)), dict(p=p)
    assert op == "fip_step_"
    p, g, gp, a, buf = _lists(shapes, device, 5, gen)
    a = [x.mul_(0.1).add_(y) for x, y in zip(a, p)]            # θ0 near θ
    f0 = [torch.rand(s, generator=gen, device=device) for s in shapes]
    fisher = [torch.rand(s, generator=gen, device=device) for s in shapes]
    pert = [torch.randn(s, generator=gen, device=device).mul_(1e-3) for s in shapes] if variant == "lagged" else None
    h = dict(HYPER)
    h.update(lr=_scalar(HYPER["lr"], device, ds) if ds else HYPER["lr"],
             mix=_scalar(0.5, device, ds) if variant == "fd_mix" else None,
             restore_scale=_scalar(1e-4, device, ds) if variant == "fd_mix" else None,
             step=_scalar(3.0, device, ds), next_pert_scale=_scalar(1e-4, device, ds) if variant == "lagged" else None,
             found_inf=_scalar(0.0, device, ds))
    if not ds:
        h["lr"] = HYPER["lr"]
    gpl = gp if variant == "fd_mix" else None

    def run():
        obj.fip_step_(p, g, gpl, f0, a, buf, fisher, pert, **h)
    return run, dict(p=p, buf=buf, fisher=fisher, **({"pert": pert} if pert is not None else {}))


def make_spectral_op(op: str, case: dict, device: torch.device, impl: dict, seed: int = 0):
    gen = _gen(device, seed)
    m, n = case["m"], case["n"]
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, device=device))[0].contiguous()
    Vh = torch.linalg.qr(torch.randn(n, r, generator=gen, device=device))[0].t().contiguous()
    S = torch.rand(r, generator=gen, device=device).mul_(5)
    delta = torch.randn(r, generator=gen, device=device).mul_(0.1)
    obj = impl["obj"]
    res: dict = {}
    if op == "spectral_weight":
        def run():
            res["out"] = obj.spectral_weight(U, S, delta, Vh, None, False)
        nbytes = 4 * (m * r + r * n + 2 * r + m * n)
        flops = 2 * m * r * n + m * r
        return run, res, nbytes, flops, m * n
    N, T = case["N"], case["T"]
    shape_x = (N, T, n) if T > 1 else (N, n)
    shape_g = (N, T, m) if T > 1 else (N, m)
    x = torch.randn(shape_x, generator=gen, device=device)
    go = torch.randn(shape_g, generator=gen, device=device)

    def run():
        res["out"] = obj.spectral_linear_grad(x, go, U, S, delta, Vh, False)
    nbytes = 4 * (N * T * (n + m) + r * (m + n) + r + N * r)
    flops = 2 * N * T * r * (n + m) + 2 * N * T * r
    return run, res, nbytes, flops, N * T * (n + m)


def _max_err(a: dict, b: dict) -> float:
    err = 0.0
    for k in a:
        xa, xb = a[k], b[k]
        if isinstance(xa, torch.Tensor) or isinstance(xa, (list, tuple)):
            la = xa if isinstance(xa, (list, tuple)) else [xa]
            lb = xb if isinstance(xb, (list, tuple)) else [xb]
            for u, v in zip(la, lb):
                if isinstance(u, (list, tuple)):
                    err = max(err, _max_err({"x": u}, {"x": v}))
                    continue
                d = (u.double().cpu() - v.double().cpu()).abs()
                err = max(err, float(d.max()) if d.numel() else 0.0)
    return err


# ------------------------------------------------------------------------------------------------ copy bandwidth
def copy_bandwidth(device: torch.device, numel: int, timing: dict) -> dict[str, Any]:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **dict(timing, min_reps=max(10, timing["min_reps"]),
                                                         max_reps=max(100, timing["max_reps"]),
                                                         budget_s=max(1.0, timing["budget_s"])))
    nbytes = 8 * numel
    if t.get("cpu_median_s"):
        t["gbps_cpu_time"] = nbytes / t["cpu_median_s"] / 1e9
    t.update(numel=numel, bytes=nbytes, gbps=nbytes / t["median_s"] / 1e9,
             gbps_p20_time=nbytes / t["p20_s"] / 1e9, what="dst.copy_(src), fp32, 4 B read + 4 B write per element")
    del src, dst
    return t


# ------------------------------------------------------------------------------------------------ host step time
def host_step_overhead(device: torch.device, impls: dict[str, dict], ntensors_list=(62, 224), steps: int = 200,
                       quick: bool = False) -> list[dict[str, Any]]:
    """Host time per ``optimizer.step()`` with tiny tensors (4 elements each): the Python + dispatch overhead.

    Per configuration: ``torch.optim.SGD(momentum=0.9, foreach=True)`` (reference point), and ``FIP`` with
    ``eta_F=0`` (plain steps), ``trace_estimator="lagged"`` (closure-free; the mean over a cycle of
    ``trace_every`` = 5 calls) and ``"fd"`` (a closure that only re-assigns the stored gradients — so the time is
    the optimizer's, not a model's; mean over a cycle of 5 calls, one of which runs the closure twice).
    """
    from fip_fast import FIP

    out = []
    if quick:
        ntensors_list, steps = (8,), 20
    for nt in ntensors_list:
        for impl_name in [n for n in ("reference", "foreach", "triton", "cuda") if impls.get(n, {}).get("available")]:
            configs = [("sgd_foreach", None), ("fip_plain", dict(eta_F=0.0)),
                       ("fip_lagged", dict(trace_estimator="lagged")), ("fip_fd", dict(trace_estimator="fd"))]
            for cname, kw in configs:
                if cname == "sgd_foreach" and impl_name != "foreach":
                    continue
                ps = [nn.Parameter(torch.randn(4, device=device)) for _ in range(nt)]
                grads = [torch.randn(4, device=device) for _ in range(nt)]
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                if kw is None:
                    opt = torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True)
                else:
                    f0 = {p: torch.rand_like(p) for p in ps}
                    opt = FIP(ps, lr=0.01, momentum=0.9, fisher0=f0, impl=impl_name, **kw)

                def closure():
                    for p, g in zip(ps, grads):
                        p.grad = g.clone()
                    return None
                use_closure = cname == "fip_fd"
                cycle = 5

                def run_cycle():
                    for _ in range(cycle):
                        opt.step(closure if use_closure else None)
                reps = max(3, steps // cycle)
                t = time_fn(run_cycle, device, warmup=2, min_reps=reps, max_reps=reps, budget_s=0.0)
                rec = dict(impl=impl_name, optimizer=cname, ntensors=nt, numel_per_tensor=4,
                           per_step_median_s=t["median_s"] / cycle, per_step_p20_s=t["p20_s"] / cycle,
                           per_step_p80_s=t["p80_s"] / cycle, n_cycles=t["n_reps"], cycle=cycle, timer=t["timer"],
                           per_step_cpu_median_s=(t["cpu_median_s"] / cycle) if t.get("cpu_median_s") else None)
                out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    quick = args.quick
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:   # the per-tensor compiled functions share one code object per op: allow their variants to coexist
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 0), 64)
    except Exception:
        pass
    timing = dict(warmup=1 if quick else 2, min_reps=3 if quick else 5, max_reps=5 if quick else 50,
                  budget_s=0.0 if quick else args.budget)
    env = environment(device)
    wanted = args.impls
    if wanted is None and quick:   # compiling takes ~10-30 s per graph on a CPU: not in the smoke run
        wanted = ["reference", "foreach", "triton", "cuda"]
    impls = resolve_impls(device, wanted, args.compile_loop, explicit=args.impls is not None)
    cases = list_cases(device, quick, args.flat_numel)
    if args.gpt2_layers is not None and "gpt2" in cases:
        c = cases["gpt2"]
        c["shapes"] = gpt2_shapes(n_layer=args.gpt2_layers)
        c["numel"], c["ntensors"] = sum(_numel(s) for s in c["shapes"]), len(c["shapes"])
        c["desc"] = f"GPT-2 small shapes, {args.gpt2_layers} blocks + embeddings"
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases}
    ops_wanted = args.ops or ["fisher_accumulate_", "global_norm", "perturb_", "fip_step_", "spectral_weight",
                              "spectral_linear_grad"]
    say = (lambda *a: None) if args.silent else (lambda *a: print(*a, flush=True))

    # Copy bandwidth, measured at the start and again at the end of the run (machine load drifts); the better of
    # the two is the denominator of "% copy".  CPU: the size of the flat case (the working set of the ops);
    # CUDA: 256 Mi elements (2 GiB moved per copy, far beyond L2).
    copy_numel = args.copy_numel or (256 * 2**20 if device.type == "cuda" else
                                     max(cases["flat"]["numel"] if "flat" in cases else 0, 2**22))
    bw_runs = [copy_bandwidth(device, copy_numel, timing)]
    bw = dict(bw_runs[0])
    say(f"copy bandwidth: {bw['gbps']:.1f} GB/s ({copy_numel} elements)")

    results: list[dict[str, Any]] = []
    verify_max = args.verify_numel

    def record(base: dict, impl_name: str, t: Optional[dict], status: str, reason: str = "", err=None):
        rec = dict(base, impl=impl_name, status=status, reason=reason, max_abs_err_vs_reference=err)
        if t is not None:
            rec.update({k: t.get(k) for k in ("median_s", "p20_s", "p80_s", "n_reps", "first_call_s", "timer",
                                              "cpu_median_s", "cpu_p20_s", "cpu_p80_s")})
            if rec.get("bytes"):
                rec["gbps"] = rec["bytes"] / t["median_s"] / 1e9
                rec["pct_copy_bw"] = 100.0 * rec["gbps"] / bw["gbps"]
                if t.get("cpu_median_s"):
                    rec["gbps_cpu_time"] = rec["bytes"] / t["cpu_median_s"] / 1e9
                    rec["pct_copy_bw_cpu_time"] = 100.0 * rec["gbps_cpu_time"] / bw["gbps_cpu_time"]
            if rec.get("flops"):
                rec["gflops"] = rec["flops"] / t["median_s"] / 1e9
        results.append(rec)
        if t is not None:
            say(f"  {base['op']:<22}{base.get('variant') or '':<8}{base['case']:<14}{impl_name:<13}"
                f"{t['median_s'] * 1e3:10.3f} ms  [{t['p20_s'] * 1e3:.3f}, {t['p80_s'] * 1e3:.3f}]"
                + (f"  {rec['gbps']:7.2f} GB/s ({rec['pct_copy_bw']:.0f}% copy)" if "gbps" in rec else "")
                + (f"  {rec['gflops']:.1f} GFLOP/s" if "gflops" in rec else ""))
        else:
            say(f"  {base['op']:<22}{base.get('variant') or '':<8}{base['case']:<14}{impl_name:<13}{status}: "
                f"{reason[:90]}")

    list_ops = [("fisher_accumulate_", None), ("global_norm", None), ("perturb_", None), ("fip_step_", "plain"),
                ("fip_step_", "fd_mix"), ("fip_step_", "lagged")]
    for op, variant in list_ops:
        if op not in ops_wanted:
            continue
        key = op if variant is None else f"{op}/{variant}"
        bpe, _ = BYTES_ACCOUNTING[key]
        for cname, case in cases.items():
            base = dict(op=op, variant=variant, case=cname, case_desc=case["desc"], numel=case["numel"],
                        ntensors=case["ntensors"], bytes_per_elem=bpe, bytes=bpe * case["numel"], flops=None)
            ref_state = None
            if case["numel"] <= verify_max:
                rrun, ref_state = make_list_op(op, variant, case["shapes"], device, dict(obj=reference,
                                                                                          device_scalars=False))
                rrun()
            for impl_name, impl in impls.items():
                if not impl["available"]:
                    record(base, impl_name, None, "skipped", impl["reason"])
                    continue
                try:
                    fn, state = make_list_op(op, variant, case["shapes"], device, impl)
                    err = None
                    if ref_state is not None:
                        fn()
                        err = _max_err(ref_state, state)
                        fn, state = make_list_op(op, variant, case["shapes"], device, impl)
                    t = time_fn(fn, device, **timing)
                    record(base, impl_name, t, "ok", err=err)
                except Exception as exc:  # an impl failing must not lose the other numbers
                    record(base, impl_name, None, "error", f"{type(exc).__name__}: {exc}")
                finally:
                    state = fn = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ref_state = None

    sp_cases = spectral_cases(device, quick)
    for op, key in (("spectral_weight", "weight"), ("spectral_linear_grad", "linear_grad")):
        if op not in ops_wanted:
            continue
        for case in sp_cases[key]:
            ref_res = None
            for impl_name, impl in impls.items():
                if impl_name == "foreach":
                    base = dict(op=op, variant=None, case=case["name"], case_desc=case["name"], numel=None,
                                ntensors=1, bytes_per_elem=None, bytes=None, flops=None)
                    record(base, impl_name, None, "skipped", "the foreach backend delegates the spectral ops to "
                                                              "the reference (same numbers)")
                    continue
                if not impl["available"]:
                    base = dict(op=op, variant=None, case=case["name"], case_desc=case["name"], numel=None,
                                ntensors=1, bytes_per_elem=None, bytes=None, flops=None)
                    record(base, impl_name, None, "skipped", impl["reason"])
                    continue
                try:
                    fn, res, nbytes, flops, numel = make_spectral_op(op, case, device, impl)
                    base = dict(op=op, variant=None, case=case["name"], case_desc=case["name"], numel=numel,
                                ntensors=1, bytes_per_elem=None, bytes=nbytes, flops=flops)
                    fn()
                    err = None
                    if impl_name == "reference":
                        ref_res = {"out": res["out"]}
                    elif ref_res is not None:
                        err = _max_err(ref_res, {"out": res["out"]})
                    t = time_fn(fn, device, **timing)
                    record(base, impl_name, t, "ok", err=err)
                except Exception as exc:
                    base = dict(op=op, variant=None, case=case["name"], case_desc=case["name"], numel=None,
                                ntensors=1, bytes_per_elem=None, bytes=None, flops=None)
                    record(base, impl_name, None, "error", f"{type(exc).__name__}: {exc}")

    bw_runs.append(copy_bandwidth(device, copy_numel, timing))
    say(f"copy bandwidth at the end: {bw_runs[-1]['gbps']:.1f} GB/s")
    best = max(bw_runs, key=lambda b: b["gbps"])
    if best is not bw_runs[0]:      # re-express "% copy" against the better measurement
        for r in results:
            if r.get("gbps") is not None:
                r["pct_copy_bw"] = 100.0 * r["gbps"] / best["gbps"]
            if r.get("gbps_cpu_time") is not None and best.get("gbps_cpu_time"):
                r["pct_copy_bw_cpu_time"] = 100.0 * r["gbps_cpu_time"] / best["gbps_cpu_time"]
    bw.clear()
    bw.update(best, runs=[{k: b.get(k) for k in ("gbps", "gbps_cpu_time", "median_s", "p20_s", "p80_s")}
                          for b in bw_runs], note="the better of the measurements at the start and at the end")
    host = [] if args.no_host_step else host_step_overhead(device, impls, quick=quick)
    for h in host:
        say(f"  step() host  {h['optimizer']:<12}{h['impl']:<10}{h['ntensors']:>4} tensors "
            f"{h['per_step_median_s'] * 1e6:9.1f} µs  [{h['per_step_p20_s'] * 1e6:.1f}, "
            f"{h['per_step_p80_s'] * 1e6:.1f}]")

    out = dict(schema=SCHEMA, **env, load_after=loadavg(), quick=quick,
               config=dict(timing=timing, hyper=HYPER, dtype="float32",
                           cases={k: dict(desc=v["desc"], numel=v["numel"], ntensors=v["ntensors"])
                                  for k, v in cases.items()},
                           spectral_cases=sp_cases, verify_numel=verify_max,
                           compile_note=("compile = torch.compile(dynamic=True) of the reference op applied to a "
                                         "one-element list of a flat view, called once per tensor; compile_loop "
                                         "= torch.compile of the whole reference for-loop; spectral ops: "
                                         "torch.compile(reference function)")),
               impls={k: dict(available=v["available"], reason=v["reason"]) for k, v in impls.items()},
               bytes_accounting={k: dict(bytes_per_elem=v[0], what=v[1]) for k, v in BYTES_ACCOUNTING.items()},
               copy_bandwidth=bw, results=results, host_step=host)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI smoke)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="implementations (reference foreach compile compile_loop triton cuda); default: all but "
                        "compile_loop")
    p.add_argument("--compile-loop", action="store_true",
                   help="also time torch.compile of the whole reference for-loop (slow to compile)")
    p.add_argument("--ops", nargs="+", default=None, help="subset of ops")
    p.add_argument("--cases", nargs="+", default=None, help="subset of list cases (flat resnet18 gpt2 deltas_7b)")
    p.add_argument("--flat-numel", type=int, default=None, help="elements of the flat tensor")
    p.add_argument("--gpt2-layers", type=int, default=None, help="GPT-2 blocks in the gpt2 case (12 = full)")
    p.add_argument("--copy-numel", type=int, default=None, help="elements of the copy-bandwidth tensor")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per measurement (CPU)")
    p.add_argument("--verify-numel", type=int, default=2_000_000,
                   help="check each impl against the reference on cases up to this many elements")
    p.add_argument("--no-host-step", action="store_true", help="skip the FIP.step() host-overhead measurement")
    p.add_argument("--out", default=None, help="output JSON (default bench/results/ops_<device>.json; "
                                               "ops_<device>_quick.json with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: per-core numbers; with several threads on a shared machine "
                        "OpenMP barriers wait for preempted threads and the timings become meaningless)")
    p.add_argument("--silent", action="store_true")
    p.add_argument("--markdown", action="store_true", help="also write the markdown report next to the JSON")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench ops", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    device = torch.device(res["device"]["type"])
    tag = device_tag(device) if device.type != "cuda" else device_tag(torch.device("cuda"))
    path = Path(args.out) if args.out else RESULTS_DIR / f"ops_{tag}{'_quick' if args.quick else ''}.json"
    return save_results(res, path, markdown=args.markdown, silent=args.silent)


if __name__ == "__main__":
    main()
