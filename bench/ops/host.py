"""The host-overhead measurement: time per ``optimizer.step()`` with tiny tensors."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import time_fn


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
        for impl_name in [n for n in ("reference", "foreach", "triton", "cuda", "cpu")
                          if impls.get(n, {}).get("available")]:
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
