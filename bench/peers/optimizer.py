"""``optimizer``: ``FIP.step()`` against torch's fused AdamW and SGD (:mod:`bench.peers`)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from ._records import Config, Row, Side, fill, measure

# ------------------------------------------------------------------------------------------------ optimizer
#: per element, arrays read / written by each side of the optimizer group (fp32, 4 bytes each); "+ g" is the
#: separate read of the gradients that decides, before anything is written, whether the step is skipped
OPT_TRAFFIC = dict(fip="reads p g F0 θ0 buf fisher + g, writes p buf fisher",
                   fip_noanchor="reads p g buf fisher + g, writes p buf fisher",
                   adamw="reads p g m v, writes p m v", adamw_guard="reads p g m v + g, writes p m v",
                   sgd="reads p g buf, writes p buf", kernel="reads p g F0 θ0 buf fisher, writes p buf fisher",
                   passes="reads g, then p g F0 θ0 buf fisher, writes p buf fisher")


def _opt_params(shapes: list, seed: int, device: str) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return ps


def _fip(ps: list[nn.Parameter], anchor: bool):
    """The FIP of the optimizer rows: SGD-momentum 0.9, no suppressor (η_F = 0: every call is a plain step), the
    F0 anchor on (η_r = 1, random F0) or off (η_r = 0, no F0: no θ0 copy either)."""
    from fip_fast import FIP
    f0 = {p: torch.rand_like(p) for p in ps} if anchor else None
    return FIP(ps, lr=0.01, momentum=0.9, eta_F=0.0, eta_r=1.0 if anchor else 0.0, fisher0=f0, impl="auto")


def _guarded_adamw(ps: list[nn.Parameter]) -> Callable[[], Any]:
    """``AdamW(fused=True).step()`` with the guarantee FIP gives: a step whose gradients hold a NaN/Inf writes
    nothing.  One read of the gradients (``torch._foreach_norm``) decides ``found_inf``, which the fused kernel
    takes as ``torch.amp.GradScaler`` hands it over (the optimizer's ``found_inf`` attribute) and then skips."""
    opt = torch.optim.AdamW(ps, lr=1e-3, fused=True)

    def step():
        grads = [p.grad for p in ps]
        total = torch.stack(torch._foreach_norm(grads)).sum()
        opt.found_inf = (~torch.isfinite(total)).float()
        opt.step()
    return step


def _guard_check(shapes: list, device: str) -> dict:
    """Both guarded sides skip a step whose last gradient's last element is NaN (params bit-identical)."""
    out = {}
    log = logging.getLogger("fip_fast")
    for name, make in (("fip", lambda ps: _fip(ps, True).step), ("adamw_guard", _guarded_adamw)):
        ps = _opt_params(shapes, 7, device)
        step = make(ps)
        step()                                        # state exists
        ps[-1].grad.view(-1)[-1] = float("nan")
        before = [p.detach().clone() for p in ps]
        level, log.level = log.level, logging.ERROR       # FIP's one-time skip warning: expected here
        try:
            step()
        finally:
            log.level = level
        out[f"{name}_skips_nan_in_last_element"] = all(torch.equal(a, p) for a, p in zip(before, ps))
    return out


def _breakdown_sides(shapes: list, device: str) -> list[Side]:
    """Where the anchor-on FIP step's time goes: its fused step kernel alone (``fip_fast.ops.fip_step_`` on the
    state FIP made, no finiteness pass), and its two passes as ``FIP.step`` makes them (``fip_fast.ops.global_norm``
    of the gradients, then the kernel with that flag) without the rest of the step's host work; both with the cache
    keys FIP's step plans give them (no per-tensor host work).  FIP.step − passes = host work; passes − kernel =
    the finiteness pass in place (the gradients cold)."""
    from fip_fast import ops
    ps = _opt_params(shapes, 5, device)
    opt = _fip(ps, True)
    opt.step()
    impl = opt._impl_of(ps[0].device)
    st = [opt.state[p] for p in ps]
    grads = [p.grad for p in ps]
    lists = [[s[k] for s in st] for k in ("fisher0", "anchor", "momentum_buffer", "fisher", "step")]
    gptrs = tuple(g.data_ptr() for g in grads)
    h = opt.param_groups[0]
    hyper = dict(lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"], weight_decay=h["weight_decay"],
                 eta_r=h["eta_r"], beta=h["beta"], mix=None, restore_scale=None, precondition=False,
                 damping=h["damping"], step=lists[4], next_pert_scale=None, found_inf=None)

    def kernel():
        ops.fip_step_(ps, grads, None, *lists[:4], None, impl=impl,
                      cache_key=(("bench.peers", "kernel"), (gptrs, None)), **hyper)

    def passes():
        # the finiteness pass reads g cold, as in FIP.step (timed alone, 4 calls in a row, g would stay in cache)
        _, found_inf = ops.global_norm(grads, impl=impl, cache_key=(("bench.peers", "check"), (gptrs,)))
        ops.fip_step_(ps, grads, None, *lists[:4], None, impl=impl,
                      cache_key=(("bench.peers", "kernel"), (gptrs, None)), **{**hyper, "found_inf": found_inf})
    return [Side("kernel", kernel), Side("passes", passes)]


def group_optimizer(cfg: "Config") -> list[Row]:
    """FIP.step against torch's fused AdamW and SGD per plain step, the anchor on (the default use) and off (the
    same arrays as AdamW), against an AdamW that guards against non-finite gradients as FIP does, and FIP's
    kernel alone and its two passes without the step's other host work (where the time goes).

    Each set of rows is timed in its own interleaved rounds, over only the sides it compares: how much memory the
    other sides of a round stream through the caches changes what every side pays (on the 2-core VM the first
    two rows read about 0.1× apart timed with three sides or with seven), so the first two rows keep the three sides
    (FIP, AdamW, SGD) they have always had."""
    from bench.ops.cases import model_shapes

    shapes = model_shapes("demo_cnn" if cfg.quick else "resnet18")
    numel = sum(torch.Size(s).numel() for s in shapes)
    dev = cfg.device
    sides = {s.name: s for s in (
        Side("fip", _fip(_opt_params(shapes, 0, dev), True).step),
        Side("fip_noanchor", _fip(_opt_params(shapes, 4, dev), False).step),
        Side("adamw", torch.optim.AdamW(_opt_params(shapes, 1, dev), lr=1e-3, fused=True).step),
        Side("adamw_guard", _guarded_adamw(_opt_params(shapes, 3, dev))),
        Side("sgd", torch.optim.SGD(_opt_params(shapes, 2, dev), lr=0.01, momentum=0.9, fused=True).step),
        *_breakdown_sides(shapes, dev))}
    work = (f"optimizer step, {'DemoCNN' if cfg.quick else 'ResNet-18 (CIFAR)'} parameter list: {len(shapes)} "
            f"tensors, {numel / 1e6:.2f} M elements")
    tv = torch.__version__
    on, off = "FIP.step, anchor on (impl auto, eta_F=0, eta_r=1)", "FIP.step, anchor off (impl auto, eta_F=0, eta_r=0)"
    adamw, sgd = "torch.optim.AdamW(fused=True)", "torch.optim.SGD(momentum=0.9, fused=True)"
    guard = "torch.optim.AdamW(fused=True) + non-finite check (torch._foreach_norm → found_inf)"
    kernel = "fip_fast.ops.fip_step_ alone (anchor on; no finiteness pass)"
    passes = "fip_fast.ops.global_norm(grads) + fip_step_ (the two passes of FIP.step, anchor on, no other host work)"
    same = "none: the same skip guarantee on both sides"
    # (the sides of one interleaved measurement, [(ours, side, peer, side, goal) of its rows])
    sets = [(("fip", "adamw", "sgd"), [(on, "fip", adamw, "adamw", "<= 1.0x"), (on, "fip", sgd, "sgd", "<= 1.4x")]),
            (("fip_noanchor", "adamw", "sgd"), [(off, "fip_noanchor", adamw, "adamw", "<= 1.0x"),
                                                (off, "fip_noanchor", sgd, "sgd", "<= 1.4x")]),
            (("fip", "fip_noanchor", "adamw_guard"), [(on, "fip", guard, "adamw_guard", same),
                                                       (off, "fip_noanchor", guard, "adamw_guard", same)]),
            (("fip", "passes", "kernel", "adamw"), [(kernel, "kernel", adamw, "adamw", "none: where the time goes"),
                                                    (passes, "passes", adamw, "adamw", "none: where the time goes"),
                                                    (on, "fip", passes, "passes", "none: the step's other host work")])]
    rows = []
    for names, spec in sets:
        t = measure([sides[n] for n in names], cfg, cfg.steps * 4, cfg.warmup)
        for ours, o, peer, q, goal in spec:
            row = fill(Row("optimizer", work, ours, peer, tv, "per step", goal), t, o, q)
            row.check = {"traffic": f"ours {OPT_TRAFFIC[o]}; peer {OPT_TRAFFIC[q]}", "timed_with": list(names)}
            rows.append(row)
    rows[4].check.update(_guard_check(model_shapes("demo_cnn"), dev))
    return rows
