"""One call of each op, ready to time: inputs drawn on the device, scalars in the form each implementation
takes; and the error against the reference."""
from __future__ import annotations

import torch

from .cases import HYPER


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
