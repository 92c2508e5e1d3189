"""The whole optimizer step on a model's parameter list: ``FIP.step()`` (no suppressor, Fisher anchor on) per
implementation, against ``torch.optim.SGD(momentum=0.9, foreach=True).step()`` and, optionally, a
``torch.compile``-d for-loop of the same FIP math (the norm included) — measured in one run, so the ratios hold
under the machine load of that run.  The question it answers: what the step of our optimizer costs next to the
plain step every training loop already pays."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from fip_fast import reference

from .. import time_fn


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
    """One record per optimizer: median time per ``step()`` (and per-impl ratio to SGD) on ``case["shapes"]``."""
    from fip_fast import FIP

    out: list[dict[str, Any]] = []

    def rec(name: str, impl: str, fn, note: str = "") -> Optional[dict]:
        try:
            t = time_fn(fn, device, **timing)
        except Exception as exc:          # an impl that cannot run here: say why, keep the others
            out.append(dict(optimizer=name, impl=impl, error=f"{type(exc).__name__}: {exc}"[:300]))
            return None
        r = dict(optimizer=name, impl=impl, median_s=t["median_s"], p20_s=t["p20_s"], p80_s=t["p80_s"],
                 first_call_s=t.get("first_call_s"), timer=t["timer"], note=note)
        out.append(r)
        return r

    ps = _params(case["shapes"], device)
    sgd = torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True)
    base = rec("sgd_foreach", "foreach", sgd.step)
    for name in ("reference", "foreach", "cpu", "triton", "cuda"):
        if not impls.get(name, {}).get("available"):
            continue
        ps = _params(case["shapes"], device)
        f0 = {p: torch.rand_like(p) for p in ps}
        opt = FIP(ps, lr=0.01, momentum=0.9, eta_F=0.0, eta_r=1.0, fisher0=f0, impl=name)
        rec("fip", name, opt.step, "eta_F=0 (no suppressor), eta_r=1 (anchor on)")
    if compile_loop:
        ps = _params(case["shapes"], device)
        state = dict(f0=[torch.rand_like(p) for p in ps], anchor=[p.detach().clone() for p in ps],
                     mom=[torch.zeros_like(p) for p in ps], fis=[torch.zeros_like(p) for p in ps])
        rec("compiled_reference_loop", "compile", _compiled_loop(ps, state), "torch.compile of the reference")
    if base is not None:
        for r in out:
            if "median_s" in r:
                r["vs_sgd"] = r["median_s"] / base["median_s"]
    return out
