"""``hutchinson``: Tr(H) by Hutchinson against PyHessian (:mod:`bench.peers`)."""
from __future__ import annotations

import torch
from torch import nn

from ._records import Config, Row, Side, _missing, _version, fill, measure


# ------------------------------------------------------------------------------------------------ Hutchinson
def _pyhessian_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probes: int) -> float:
    """PyHessian's Tr(H): its gradient graph, then ``probes`` products (``tol=-inf``: its relative-change stop
    is never taken, so every call makes the same number of products — with ``tol=0`` it stops as soon as the
    running mean is negative)."""
    from pyhessian import hessian

    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
    vhv = h.trace(maxIter=probes, tol=float("-inf"))
    model.zero_grad(set_to_none=True)       # its backward(create_graph=True) leaves graphs in .grad
    if len(vhv) != probes:
        raise RuntimeError(f"PyHessian made {len(vhv)} products, not {probes}")
    return sum(vhv) / probes


def group_hutchinson(cfg: "Config") -> list[Row]:
    from bench.fast_fip import SmallPreActResNet
    from fip_fast.evaluation.smoothness import hessian_trace

    b, w, k = (8, 4, 2) if cfg.quick else (32, 8, cfg.probes)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
    x, y = x.to(cfg.device), y.to(cfg.device)
    torch.manual_seed(0)
    model = SmallPreActResNet(w).to(cfg.device).eval()
    n = sum(p.numel() for p in model.parameters())
    work = f"Hutchinson Tr(H), SmallPreActResNet(width={w}, {n} params), batch {b}, {k} probes per call"
    label = "fip_fast.evaluation.smoothness.hessian_trace"
    rows = [Row("hutchinson", work, label + " (default)", "PyHessian hessian.trace", _version("pyhessian"),
                "per probe", "<= 1.0x"),
            Row("hutchinson", work, label + "(batch_size=16)", "PyHessian hessian.trace", _version("pyhessian"),
                "per probe", "none: vmapped blocks, the path of the former default (32), for the record")]
    why = _missing("pyhessian", "pyhessian")
    if why:
        print(f"[peers] hutchinson: PyHessian skipped: {why}")
        for r in rows:
            r.status, r.reason = "skipped", why
        return rows
    sides = [Side("ours", lambda: hessian_trace(model, x, y, samples=k, seed=0), k),
             Side("ours_b16", lambda: hessian_trace(model, x, y, samples=k, seed=0, batch_size=16), k),
             Side("pyhessian", lambda: _pyhessian_trace(model, x, y, k), k)]
    t = measure(sides, cfg, 1, min(cfg.warmup, 1))
    # Seeded alike, PyHessian's global generator and ours draw the same Rademacher probes: the two estimates
    # then differ by rounding only.
    ours_est = hessian_trace(model, x, y, samples=4 * k, seed=0)
    torch.manual_seed(0)
    theirs = _pyhessian_trace(model, x, y, 4 * k)
    for r in rows:
        r.check = dict(ours=ours_est, pyhessian=theirs, rel_diff=abs(ours_est - theirs) / abs(theirs),
                       note=f"{4 * k} probes, the same on both sides (seed 0)")
    return [fill(rows[0], t, "ours", "pyhessian"), fill(rows[1], t, "ours_b16", "pyhessian")]
