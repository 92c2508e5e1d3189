"""The host-overhead measurement: time per ``optimizer.step()`` with tiny tensors."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from typing import Any

import torch
from torch import nn

from .. import time_fn

#: the configurations: name → FIP keyword arguments (None: torch's SGD)
CONFIGS = (("sgd_foreach", None), ("fip_plain", dict(eta_F=0.0)), ("fip_lagged", dict(trace_estimator="lagged")),
           ("fip_fd", dict(trace_estimator="fd")))
CYCLE = 5


@contextlib.contextmanager
def _launches_mocked():
    """Triton launches replaced by no-ops: what is left of a step is its host work (the kernels' Python wrappers,
    the tables, the optimizer) — the number a GPU host would pay, measurable on a CPU under the interpreter."""
    import fip_fast.kernels.fip_step as fs
    import fip_fast.kernels.fisher as fi

    def fake(kernel, grid, *args, **kwargs):
        if kernel is fs._norm_kernel:       # a finite norm, so that steps are not skipped
            args[9].fill_(1.0)
            args[10].zero_()

    saved = fs.launch, fi.launch
    fs.launch = fi.launch = fake
    try:
        yield
    finally:
        fs.launch, fi.launch = saved


@contextlib.contextmanager
def _host_helper(which: str):
    """The step's per-tensor host work in C++ (``"cpp"``: fip_fast.backends.host, built first if needed) or in
    its Python versions (``"python"``: what every step paid before the helper existed)."""
    from fip_fast.backends import host

    if which != "python":
        host.wait()
    with host.python_versions() if which == "python" else contextlib.nullcontext():
        yield host.status()


def _one(device: torch.device, impl_name: str, cname: str, kw, nt: int, steps: int,
         helper: str = "cpp") -> dict[str, Any]:
    with _host_helper(helper) as status:
        rec = _timed(device, impl_name, cname, kw, nt, steps)
    rec["host_helper"] = status if kw is not None else "-"
    return rec


def _timed(device: torch.device, impl_name: str, cname: str, kw, nt: int, steps: int) -> dict[str, Any]:
    from fip_fast import FIP

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
    lagged = cname == "fip_lagged"

    def run_cycle():
        for _ in range(CYCLE):
            if lagged:            # what the forward pre-hook does at the training forward
                opt.apply_perturbation()
            opt.step(closure if use_closure else None)
    reps = max(3, steps // CYCLE)
    t = time_fn(run_cycle, device, warmup=2, min_reps=reps, max_reps=reps, budget_s=0.0)
    return dict(impl=impl_name, optimizer=cname, ntensors=nt, numel_per_tensor=4,
                per_step_median_s=t["median_s"] / CYCLE, per_step_p20_s=t["p20_s"] / CYCLE,
                per_step_p80_s=t["p80_s"] / CYCLE, n_cycles=t["n_reps"], cycle=CYCLE, timer=t["timer"],
                per_step_cpu_median_s=(t["cpu_median_s"] / CYCLE) if t.get("cpu_median_s") else None)


def host_step_overhead(device: torch.device, impls: dict[str, dict], ntensors_list=(62, 224, 300), steps: int = 200,
                       quick: bool = False, mocked_triton: bool = True) -> list[dict[str, Any]]:
    """Host time per ``optimizer.step()`` with tiny tensors (4 elements each): the Python + dispatch overhead.

    Per configuration: ``torch.optim.SGD(momentum=0.9, foreach=True)`` (reference point), and ``FIP`` with
    ``eta_F=0`` (plain steps), ``trace_estimator="lagged"`` (closure-free; the mean over a cycle of
    ``trace_every`` = 5 calls, each preceded by the ``apply_perturbation`` its training forward would do) and
    ``"fd"`` (a closure that only re-assigns the stored gradients — so the time is the optimizer's, not a model's;
    mean over a cycle of 5 calls, one of which runs the closure twice).  On the CPU, also ``triton (launch
    mocked)``: the Triton path under the interpreter with its launches replaced by no-ops, in a subprocess (the
    interpreter must be chosen before Triton is imported) — the host cost a GPU step would pay.
    """
    out = []
    if quick:
        ntensors_list, steps = (8,), 20
    for nt in ntensors_list:
        for impl_name in [n for n in ("reference", "foreach", "triton", "cuda", "cpu")
                          if impls.get(n, {}).get("available")]:
            for cname, kw in CONFIGS:
                if cname == "sgd_foreach" and impl_name != "foreach":
                    continue
                out.append(_one(device, impl_name, cname, kw, nt, steps))
            if impl_name in ("cpu", "triton", "cuda"):      # the same plain step with the Python host work
                out.append(_one(device, impl_name, "fip_plain", CONFIGS[1][1], nt, steps, helper="python"))
    if device.type == "cpu" and mocked_triton and not impls.get("triton", {}).get("available"):
        out += _mocked_triton_subprocess(ntensors_list, steps)
    return out


def _mocked_triton_subprocess(ntensors_list, steps: int) -> list[dict[str, Any]]:
    code = ("import json, sys, torch; torch.set_num_threads(1); from bench.ops import host; "
            f"print(json.dumps(host.mocked_triton({list(ntensors_list)!r}, {steps})))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                           timeout=1800)
    except subprocess.TimeoutExpired:
        return []
    if r.returncode != 0:
        return [dict(impl="triton (launch mocked)", optimizer="-", ntensors=0, error=r.stderr[-500:])]
    return json.loads(r.stdout.strip().splitlines()[-1])


def mocked_triton(ntensors_list, steps: int) -> list[dict[str, Any]]:
    """The Triton rows of :func:`host_step_overhead` with launches mocked (run under ``TRITON_INTERPRET=1``)."""
    from fip_fast import ops

    ok, why = ops.availability("triton", "cpu")
    if not ok:
        return [dict(impl="triton (launch mocked)", optimizer="-", ntensors=0, error=why)]
    out = []
    with _launches_mocked():
        for nt in ntensors_list:
            for cname, kw, helper in [(c, k, "cpp") for c, k in CONFIGS[1:]] + [("fip_plain", CONFIGS[1][1], "python")]:
                rec = _one(torch.device("cpu"), "triton", cname, kw, nt, steps, helper)
                rec["impl"] = "triton (launch mocked)"
                out.append(rec)
    return out
