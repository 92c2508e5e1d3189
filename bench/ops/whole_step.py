"""The whole optimizer step on a model's parameter list: ``FIP.step()`` (no suppressor, Fisher anchor on) per
implementation, against ``torch.optim.SGD(momentum=0.9, foreach=True).step()`` and, optionally, a
``torch.compile``-d for-loop of the same FIP math (the norm included) — measured in one run, so the ratios hold
under the machine load of that run.  The question it answers: what the step of our optimizer costs next to the
plain step every training loop already pays."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from fip_fast import reference

from .. import summarize, time_fn, time_interleaved


def _params(shapes, device: torch.device, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, device=device, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, device=device, generator=g)
    return ps


def _compiled_loop(ps: list, state: dict):
    """torch.compile of the reference step math for the whole list (global norm for found_inf, then the fused
    update), as a user would write it without fip_fast's kernels."""
    hyper = dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=1.0, beta=0.95, mix=None,
                 restore_scale=None, precondition=False, damping=1e-3, step=1.0, next_pert_scale=None)

    def step(params, grads, f0, anchor, mom, fis):
        _, found = reference.global_norm(grads)
        reference.fip_step_(params, grads, None, f0, anchor, mom, fis, None, found_inf=found, **hyper)

    fn = torch.compile(step, dynamic=False)
    grads = [p.grad for p in ps]
    return lambda: fn([p.detach() for p in ps], grads, state["f0"], state["anchor"], state["mom"], state["fis"])


def time_whole_step(case: dict, impls: dict[str, dict], device: torch.device, timing: dict,
                    compile_loop: bool = False) -> list[dict[str, Any]]:
    """One record per optimizer: median time per ``step()`` (and per-impl ratio to SGD) on ``case["shapes"]``.

    On the CPU the optimizers are timed *interleaved* — one step of each in turn, repeated — so that a drift of
    the machine's load or memory bandwidth during the run moves every row alike and the ratios hold (timed one
    after the other, the same ratio varied by ±15 % between runs on the shared 2-core VM).  On CUDA each is timed
    with :func:`time_fn` (device time)."""
    from fip_fast import FIP

    cands: list[tuple[str, str, Any, str]] = []
    ps = _params(case["shapes"], device)
    cands.append(("sgd_foreach", "foreach", torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True).step, ""))
    for name in ("reference", "foreach", "cpu", "triton", "cuda"):
        if not impls.get(name, {}).get("available"):
            continue
        ps = _params(case["shapes"], device)
        f0 = {p: torch.rand_like(p) for p in ps}
        opt = FIP(ps, lr=0.01, momentum=0.9, eta_F=0.0, eta_r=1.0, fisher0=f0, impl=name)
        cands.append(("fip", name, opt.step, "eta_F=0 (no suppressor), eta_r=1 (anchor on)"))
    if compile_loop:
        ps = _params(case["shapes"], device)
        state = dict(f0=[torch.rand_like(p) for p in ps], anchor=[p.detach().clone() for p in ps],
                     mom=[torch.zeros_like(p) for p in ps], fis=[torch.zeros_like(p) for p in ps])
        cands.append(("compiled_reference_loop", "compile", _compiled_loop(ps, state),
                      "torch.compile of the reference"))
    timed = _interleaved([c[2] for c in cands], device, timing)
    out: list[dict[str, Any]] = []
    for (name, impl, _, note), t in zip(cands, timed):
        if "error" in t:          # an impl that cannot run here: say why, keep the others
            out.append(dict(optimizer=name, impl=impl, error=t["error"]))
            continue
        out.append(dict(optimizer=name, impl=impl, median_s=t["median_s"], p20_s=t["p20_s"], p80_s=t["p80_s"],
                        first_call_s=t.get("first_call_s"), timer=t["timer"], note=note))
    base = out[0] if "median_s" in out[0] else None
    if base is not None:
        for r in out:
            if "median_s" in r:
                r["vs_sgd"] = r["median_s"] / base["median_s"]
    return out


def _interleaved(fns: list, device: torch.device, timing: dict) -> list[dict[str, Any]]:
    """Per function: the :func:`time_fn`-style summary, or ``{"error": ...}``.  CPU: warm each up, then cycles of
    one call of each (as many cycles as ``timing`` allows: at least ``min_reps``, at most ``max_reps``, within
    ``budget_s`` per function)."""
    if device.type != "cpu":
        res = []
        for fn in fns:
            try:
                res.append(time_fn(fn, device, **timing))
            except Exception as exc:
                res.append(dict(error=f"{type(exc).__name__}: {exc}"[:300]))
        return res
    first: dict[int, float] = {}
    errors: dict[int, str] = {}
    for i, fn in enumerate(fns):         # the first call alone (compilation included), or why it cannot run
        try:
            t0 = time.perf_counter()
            fn()
            first[i] = time.perf_counter() - t0
        except Exception as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    live = [i for i in range(len(fns)) if i not in errors]
    w, c = time_interleaved([fns[i] for i in live], min_rounds=timing.get("min_reps", 5),
                            max_rounds=timing.get("max_reps", 50), budget_s=timing.get("budget_s", 1.0) * len(live),
                            warmup=max(0, timing.get("warmup", 2) - 1))
    wall, cpu = dict(zip(live, w)), dict(zip(live, c))
    res = []
    for i in range(len(fns)):
        if i in errors:
            res.append(dict(error=errors[i]))
            continue
        c = summarize(cpu[i])
        res.append(dict(summarize(wall[i]), timer="time.perf_counter, interleaved", first_call_s=first[i],
                        cpu_median_s=c["median_s"]))
    return res
