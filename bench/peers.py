"""fip_fast next to the libraries a user would otherwise reach for, on the same inputs (``docs/peers.md``).

::

    python -m bench peers                 # → bench/results/peers_cpu.json + .md
    python -m bench peers --quick         # smoke test (tiny sizes, 2 rounds; the numbers mean nothing)

Every group below builds fip_fast's side and each peer's side on the same inputs, then times them in
*interleaved rounds* in this one process on one torch thread (:func:`bench.time_interleaved`: every round calls
each side ``--steps`` times, in an order rotated from round to round, so that a drift of the machine's load hits
every side alike).  Each round gives one time per side and one *paired* ratio ours / peer; a row reports the
median and the spread (min–max and the 25th–75th percentiles) over rounds, of process CPU time (what the work
needed) and of wall time, plus the peer's version and the load average before and after.

Groups (the rows of issue 30's table):

* ``optimizer``: ``FIP.step()`` (impl ``auto``, no suppressor), the F0 anchor on (9 arrays per element) and off (7,
  as AdamW), vs ``torch.optim.AdamW(fused=True)``, vs ``torch.optim.SGD(momentum=0.9, fused=True)`` and vs an AdamW
  guarded against non-finite gradients as FIP is (one read of the gradients before the step, ``found_inf``), plus
  where FIP's time goes (the fused kernel alone; the finiteness pass and the kernel without the step's other host
  work), on the ResNet-18 (CIFAR) parameter list
  that ``python -m bench ops`` uses (``bench.ops.cases.model_shapes``), random gradients.  Each row's ``check``
  says which arrays each side reads and writes per element.
* ``fisher_cnn`` / ``fisher_tokens``: the per-sample diagonal Fisher Σ_n g_n² (``fip_fast.estimate_fisher``,
  estimator ``per_sample``) on a conv-BatchNorm(eval)-ReLU CNN with a Linear head, and on an Embedding + Linear
  token model (token losses summed per sequence), vs one ``torch.func`` ``vmap(grad)`` over all parameters and vs
  BackPACK (``SumGradSquared``, or ``BatchGrad`` squared where the former does not cover a layer).
* ``hutchinson``: Tr(H) by Hutchinson (``fip_fast.evaluation.smoothness.hessian_trace``, its default and with
  ``batch_size=16``) vs PyHessian's ``hessian(...).trace`` on a small PreAct-ResNet, per probe (each call builds
  its gradient graph once, then ``--probes`` products).
* ``fast_fip``: one purification step (the fd suppressor every step, the FIP loop of ``purify``) on a small
  PreAct-ResNet at full rank: Fast FIP in place vs the authors' Fast FIP (:class:`AuthorsSVDConv2d` /
  :class:`AuthorsSVDLinear`, their layer rewritten here; module swap, W rebuilt every forward) with the same
  optimizer, groups and options on δ; and the shipped Fast FIP in place vs full FIP.

A peer that is not installed is skipped, with the reason printed and kept in the JSON.
Install the optional peers without letting pip replace the CPU torch (BackPACK declares torchvision, which it
imports only in its examples)::

    pip install --no-deps backpack-for-pytorch einops unfoldNd pyhessian
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import RESULTS_DIR, device_tag, environment, loadavg, percentile, time_interleaved, write_json

SCHEMA = "fip_fast.bench.peers/1"


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Spread:
    """Seconds (or a ratio) over rounds."""
    median: float
    min: float
    max: float
    p25: float
    p75: float

    @classmethod
    def of(cls, xs: list[float]) -> "Spread":
        return cls(percentile(xs, 50), min(xs), max(xs), percentile(xs, 25), percentile(xs, 75))


@dataclass
class Row:
    """One line of the table: fip_fast's side against one peer, or why the peer was skipped."""
    group: str
    work: str
    ours: str
    peer: str
    peer_version: Optional[str]
    unit: str                                  # what one timed call is, e.g. "per step", "per probe"
    goal: str
    status: str = "ok"                         # "ok" | "skipped"
    reason: str = ""
    ours_cpu_s: Optional[Spread] = None
    peer_cpu_s: Optional[Spread] = None
    ours_wall_s: Optional[Spread] = None
    peer_wall_s: Optional[Spread] = None
    ratio_cpu: Optional[Spread] = None         # ours / peer, paired per round
    ratio_wall: Optional[Spread] = None
    check: dict[str, Any] = field(default_factory=dict)   # correctness of the pair on these inputs


@dataclass
class Side:
    """A timed callable; ``per`` divides its time (e.g. the number of probes one call makes)."""
    name: str
    fn: Callable[[], Any]
    per: int = 1


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _missing(module: str, dist: str) -> Optional[str]:
    """Why the peer ``module`` cannot be used here, or None; ``dist``: what to ``pip install --no-deps``."""
    try:
        __import__(module)
    except Exception as exc:       # not installed, or broken by its own imports
        return (f"{module} not importable ({type(exc).__name__}: {exc}); install with "
                f"`pip install --no-deps {dist}` (docs/peers.md)")
    return None


def _synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)       # the work, not its launch
    return call


def measure(sides: list[Side], cfg: "Config", steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Per side: ``{"cpu": [...], "wall": [...]}`` seconds per call / ``per``, one value per interleaved round."""
    dev = torch.device(cfg.device)
    w, c = time_interleaved([_synced(s.fn, dev) for s in sides], min_rounds=cfg.rounds, max_rounds=cfg.rounds,
                            steps=steps, warmup=warmup)
    return {s.name: dict(wall=[x / s.per for x in wi], cpu=[x / s.per for x in ci]) for s, wi, ci in zip(sides, w, c)}


def fill(row: Row, t: dict, ours: str, peer: str) -> Row:
    a, b = t[ours], t[peer]
    row.ours_cpu_s, row.peer_cpu_s = Spread.of(a["cpu"]), Spread.of(b["cpu"])
    row.ours_wall_s, row.peer_wall_s = Spread.of(a["wall"]), Spread.of(b["wall"])
    row.ratio_cpu = Spread.of([x / y for x, y in zip(a["cpu"], b["cpu"])])
    row.ratio_wall = Spread.of([x / y for x, y in zip(a["wall"], b["wall"])])
    return row


def _max_rel(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """max |a − b| / max |b| over all tensors (one scale for the whole model)."""
    scale = max(float(b.abs().max()) for b in theirs) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) / scale


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


# ------------------------------------------------------------------------------------------------ Fisher
class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool ×2 → Linear: the conv, norm and Linear layers of a vision model (no in-place ops, so
    that vmap and BackPACK take it as it is)."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.b2(self.c2(x))), 4)
        return self.fc(x.flatten(1))


class TokenModel(nn.Module):
    """Embedding(vocab, d) → Linear(d, vocab): next-token logits ``(N, T, vocab)`` from ids ``(N, T)``."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.emb(ids))


def _seq_nll_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over samples (and tokens) of −log p: the per-sample losses summed, so per-sample gradients are g_n."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def vmap_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Σ_n g_n² for every trainable parameter by one ``torch.func.vmap(grad)`` over the batch (eval mode)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p, xn, yn):
        return _seq_nll_sum(functional_call(model, {**p, **buffers}, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [gs[n].pow(2).sum(0) for n in params]


def backpack_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, how: str) -> list[torch.Tensor]:
    """Σ_n g_n² by BackPACK on an ``extend``-ed model: ``SumGradSquared`` directly, or ``BatchGrad`` squared and
    summed (``how`` = "sum_grad_squared" | "batch_grad")."""
    from backpack import backpack
    from backpack.extensions import BatchGrad, SumGradSquared

    model.zero_grad(set_to_none=True)
    loss = _seq_nll_sum(model(x), y)
    with backpack(SumGradSquared() if how == "sum_grad_squared" else BatchGrad()):
        loss.backward()
    ps = list(model.parameters())
    return [p.sum_grad_squared if how == "sum_grad_squared" else p.grad_batch.pow(2).sum(0) for p in ps]


BACKPACK_LABELS = dict(sum_grad_squared="BackPACK SumGradSquared", batch_grad="BackPACK BatchGrad (squared, summed)")


def _backpack_sides(model_fn: Callable[[], nn.Module], x, y, ref: list[torch.Tensor]
                    ) -> tuple[list[Side], dict[str, Any], str]:
    """BackPACK's two ways to Σ_n g_n² (``SumGradSquared``; ``BatchGrad`` squared and summed) as sides named
    after the extension, the check of each (relative difference to ours, or the error where an extension does not
    cover a layer), and why BackPACK is skipped ("" if it is not)."""
    why = _missing("backpack", "backpack-for-pytorch einops unfoldNd")
    if why:
        return [], {}, why
    from backpack import extend

    sides, checks = [], {}
    for how in BACKPACK_LABELS:
        model = extend(model_fn().eval())
        try:
            got = backpack_fisher(model, x, y, how)
        except Exception as exc:          # a layer this extension does not cover: the other one may
            checks[how] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
            continue
        sides.append(Side(how, (lambda m, h: lambda: backpack_fisher(m, x, y, h))(model, how)))
        checks[how] = dict(max_rel_diff=_max_rel(got, ref))
    return sides, checks, "" if sides else f"BackPACK ran with neither extension: {checks}"


@contextlib.contextmanager
def _without_guard(x_leaf: torch.Tensor):
    """Diagnostic only (a "where the time goes" row, never a result): ``estimate_fisher`` with its guard off — the
    hooked backward asks autograd for the gradient of ``x_leaf`` (the batch, requiring grad) instead of the batch
    gradients of the hooked parameters, and every hooked parameter's squares are taken as they are.  Hooks,
    rules and squares run unchanged; what disappears is autograd's batch weight gradient of every hooked layer and
    the comparison."""
    from fip_fast._fisher_capture import _HookCapture

    grad, flush = torch.autograd.grad, _HookCapture.flush

    def grad_of_input(outputs, inputs, *args, **kwargs):
        grad(outputs, [x_leaf], *args, **kwargs)
        return [None] * len(inputs)

    def flush_unchecked(self, grads, out):
        for k in list(self.records):
            self._process(k)
        for k, sq in self.sq.items():
            out[self.params[k]] += sq
        for d in (self.expected, self.records, self.sq, self.check):
            d.clear()

    torch.autograd.grad, _HookCapture.flush = grad_of_input, flush_unchecked
    try:
        yield
    finally:
        torch.autograd.grad, _HookCapture.flush = grad, flush


def _fisher_group(name: str, work: str, model_fn: Callable[[], nn.Module], x, y, cfg: "Config",
                  goals: tuple[str, str]) -> list[Row]:
    from fip_fast import estimate_fisher

    model_fn = (lambda make: lambda: make().to(cfg.device))(model_fn)
    x, y = x.to(cfg.device), y.to(cfg.device)
    model = model_fn().eval()
    ps = list(model.parameters())

    def ours():
        return estimate_fisher(model, [(x, y)], estimator="per_sample", chunk_size=x.shape[0])

    ref = [f * x.shape[0] for f in (lambda d: [d[p] for p in ps])(ours())]     # estimate_fisher is the mean
    vm = model_fn().eval()
    sides = [Side("ours", ours), Side("vmap", lambda: vmap_fisher(vm, x, y))]
    vmap_check = dict(max_rel_diff=_max_rel(vmap_fisher(vm, x, y), ref))
    if x.is_floating_point():        # the guard's share (the leaf it backpropagates to must be a float batch)
        m2, x_leaf = model_fn().eval(), x.clone().requires_grad_()

        def unguarded():
            with _without_guard(x_leaf):
                return estimate_fisher(m2, [(x_leaf, y)], estimator="per_sample", chunk_size=x.shape[0])
        ps2 = list(m2.parameters())
        unguarded_check = dict(max_rel_diff=_max_rel([f * x.shape[0] for f in map(unguarded().get, ps2)], ref),
                               timed_with=["ours", "unguarded", "vmap"])
    bp_sides, bp_checks, why = _backpack_sides(model_fn, x, y, ref)
    t = measure(sides + bp_sides, cfg, cfg.steps, cfg.warmup)
    ours_label = "fip_fast.estimate_fisher(estimator='per_sample')"
    vmap_label = "torch.func vmap(grad) over all parameters"
    rows = [fill(Row(name, work, ours_label, vmap_label, torch.__version__, "per batch", goals[0], check=vmap_check),
                 t, "ours", "vmap")]
    if x.is_floating_point():
        # the diagnostic in its own rounds, as the optimizer's breakdown: a side's cost depends on what else runs
        # in the rotation (the allocator's and the caches' state), so it does not join the peers' rounds
        t2 = measure(sides + [Side("unguarded", unguarded)], cfg, cfg.steps, cfg.warmup)
        diag = "the same without its guard (diagnostic: no batch weight gradients, no comparison)"
        rows.append(fill(Row(name, work, diag, vmap_label, torch.__version__, "per batch",
                             "none: where the time goes", check=unguarded_check), t2, "unguarded", "vmap"))
        rows.append(fill(Row(name, work, diag, ours_label + " (with its guard, the same rounds)", "n/a",
                             "per batch", "none: the guard's share", check=unguarded_check), t2, "unguarded", "ours"))
    if why:
        print(f"[peers] {name}: BackPACK skipped: {why}")
        rows.append(Row(name, work, ours_label, "BackPACK", _version("backpack-for-pytorch"), "per batch", goals[1],
                        status="skipped", reason=why))
        return rows
    # BackPACK at its best on this model: the faster of its two extensions (both times kept in the check).
    best = min(bp_sides, key=lambda s: percentile(t[s.name]["cpu"], 50)).name
    for s in bp_sides:
        bp_checks[s.name]["cpu_median_s"] = percentile(t[s.name]["cpu"], 50)
    rows.append(fill(Row(name, work, ours_label, BACKPACK_LABELS[best] + " (the faster extension here)",
                         _version("backpack-for-pytorch"), "per batch", goals[1], check=bp_checks), t, "ours", best))
    return rows


def group_fisher_cnn(cfg: "Config") -> list[Row]:
    b, w, hw = (8, 4, 8) if cfg.quick else (64, 16, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 3, hw, hw, generator=g), torch.randint(0, 10, (b,), generator=g)

    def model_fn():
        torch.manual_seed(0)
        m = SmallCNN(w)
        for bn in (m.b1, m.b2):              # non-trivial running statistics, as in a trained model
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return m
    n = sum(p.numel() for p in model_fn().parameters())
    work = f"per-sample Fisher, CNN (2 conv + BatchNorm eval + Linear, {n} params), batch {b}, 3x{hw}x{hw}"
    return _fisher_group("fisher_cnn", work, model_fn, x, y, cfg, ("<= 1.0x", "<= 0.8x"))


def group_fisher_tokens(cfg: "Config") -> list[Row]:
    b, t, vocab, d = (4, 5, 50, 8) if cfg.quick else (32, 32, 512, 64)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)

    def model_fn():
        torch.manual_seed(0)
        return TokenModel(vocab, d)
    work = f"per-sample Fisher, Embedding({vocab}, {d}) + Linear({d}, {vocab}), batch {b} x {t} tokens"
    return _fisher_group("fisher_tokens", work, model_fn, x, y, cfg, ("<= 1.0x", "<= 0.8x"))


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


# ------------------------------------------------------------------------------------------------ Fast FIP
#: the authors' code this layer is rewritten from (repository, commit, file)
AUTHORS = "nazmul-karim170/FIP@b787f04 src/networks/svd_layers.py, rewritten"


def _authors_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The authors' per-forward weight of both layers: U·diag(relu(S + scale·δ))·Vh, in x's device and dtype."""
    cast = dict(device=x.device, dtype=x.dtype)
    return layer.U.to(**cast) @ torch.diag(F.relu(layer.S.to(**cast) + layer.scale * layer.delta)) @ layer.Vh.to(**cast)


class AuthorsSVDConv2d(nn.Conv2d):
    """The authors' Fast FIP convolution, rewritten from nazmul-karim170/FIP (commit b787f04),
    ``src/networks/svd_layers.py`` (class ``SVDConv2d``): W = U·diag(relu(S + scale·δ))·Vh, from the thin SVD of
    the weight reshaped to ``co × (cin·h·w)``, rebuilt on *every* forward, then ``F.conv2d``.  Their
    ``einops.rearrange`` is the plain reshape here; the SVD is taken on the first forward after the weights are
    loaded, as theirs (``done_svd``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, scale: float = 1.0, **kwargs):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        assert type(kernel_size) is int
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight.reshape(out_channels, -1), full_matrices=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))        # initialized to 0 for smooth tuning
        self.weight.requires_grad = False
        self.done_svd = False
        self.scale = scale

    def perform_svd(self):
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight.reshape(self.weight.shape[0], -1),
                                                   full_matrices=False)
        self.done_svd = True

    def forward(self, x: torch.Tensor):
        if not self.done_svd:
            self.perform_svd()
        w = _authors_weight(self, x).reshape(self.weight.shape)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class AuthorsSVDLinear(nn.Linear):
    """The authors' ``SVDLinear`` (same file): W = U·diag(relu(S + scale·δ))·Vh every forward, then
    ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight, full_matrices=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))
        self.weight.requires_grad = False
        self.done_svd = False
        self.scale = scale

    def perform_svd(self):
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight, full_matrices=False)
        self.done_svd = True

    def forward(self, x: torch.Tensor):
        if not self.done_svd:
            self.perform_svd()
        return F.linear(x, _authors_weight(self, x), bias=self.bias)


def authors_swap(model: nn.Module) -> list[nn.Parameter]:
    """Replace every Conv2d / Linear by the authors' layer holding the same weights (their model is built with
    the SVD layers and the checkpoint loaded into it); returns the δ parameters in module order."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (AuthorsSVDConv2d, AuthorsSVDLinear)) or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(m, nn.Conv2d):
            new = AuthorsSVDConv2d(m.in_channels, m.out_channels, m.kernel_size[0], stride=m.stride,
                                   padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
        else:
            new = AuthorsSVDLinear(m.in_features, m.out_features, bias=m.bias is not None)
        new.load_state_dict(m.state_dict(), strict=False)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    return [m.delta for m in model.modules() if isinstance(m, (AuthorsSVDConv2d, AuthorsSVDLinear))]


def _authors_purifier(model: nn.Module, ctx, *, relative=True, rank=None, **opts):
    """The δ-only Fast FIP of ``bench.fast_fip`` (FIP on δ; biases and norm affine as extras; the same F0, options
    and spectral penalty: :func:`bench.fast_fip.delta_fip_purifier`) on the authors' layers instead of fip_fast's."""
    from .fast_fip import delta_fip_purifier

    if rank is not None:
        raise ValueError("the authors' layer is full rank only")

    def reparameterize(m: nn.Module):
        for p in m.parameters():
            p.requires_grad_(False)
        deltas = authors_swap(m)
        layers = [x for x in m.modules() if isinstance(x, (AuthorsSVDConv2d, AuthorsSVDLinear))]
        return deltas, lambda: (x.S + x.scale * x.delta for x in layers)
    return delta_fip_purifier(model, ctx, reparameterize, **opts)


def group_fast_fip(cfg: "Config") -> list[Row]:
    from dataclasses import fields

    from bench.fast_fip import DELTA_ONLY, SmallPreActResNet, _purifier
    from fip_fast.pipeline.holding import HOLDING_DEFAULTS
    from fip_fast.pipeline.methods import DEFAULTS
    from fip_fast.pipeline.options import LoopOptions
    from fip_fast.pipeline.purifier import MethodContext

    b, w = (4, 4) if cfg.quick else (32, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
    x, y = x.to(cfg.device), y.to(cfg.device)
    ctx = MethodContext(x_train=x[:16], y_train=y[:16], device=torch.device(cfg.device), loss_fn=F.cross_entropy,
                        seed=0, progress=False)
    sides = []
    for v in ("fip", "inplace", "inplace_delta_only", "authors"):
        torch.manual_seed(0)
        model = SmallPreActResNet(w).to(cfg.device)
        if v == "authors":
            loop = {f.name for f in fields(LoopOptions)} | {"steps", "batch_size"}   # the loop's, as bench.fast_fip
            opts = {k: val for k, val in DEFAULTS["fast_fip"].items()
                    if k not in loop and k not in DELTA_ONLY and k not in HOLDING_DEFAULTS}
            pur = _authors_purifier(model, ctx, **opts)
        else:
            pur = _purifier(v, model, ctx, None)
        sides.append(Side(v, (lambda p: lambda: p.step(x, y))(pur)))
    t = measure(sides, cfg, cfg.steps, cfg.warmup)
    work = f"purification step (fd suppressor every step), SmallPreActResNet(width={w}), full rank, batch {b}"
    return [fill(Row("fast_fip", work, "Fast FIP in place, delta only (FIP on δ, no mixing band)",
                     "the authors' Fast FIP (module swap, W rebuilt every forward; FIP on δ)", AUTHORS, "per step",
                     "<= 0.8x"), t, "inplace_delta_only", "authors"),
            fill(Row("fast_fip", work, "Fast FIP in place (shipped defaults)",
                     "the authors' Fast FIP (module swap, W rebuilt every forward; FIP on δ)", AUTHORS, "per step",
                     "<= 0.8x"), t, "inplace", "authors"),
            fill(Row("fast_fip", work, "Fast FIP in place (shipped defaults)", "full FIP (fip_fast, fd suppressor)",
                     None, "per step", "<= 1.0x"), t, "inplace", "fip")]


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Config:
    quick: bool = False
    rounds: int = 9
    steps: int = 1              # calls per side per round (the optimizer group makes 4× as many: a step is short)
    warmup: int = 2
    probes: int = 16            # Hutchinson products per call
    threads: int = 1
    device: str = "cpu"


GROUPS: dict[str, Callable[[Config], list[Row]]] = dict(
    optimizer=group_optimizer, fisher_cnn=group_fisher_cnn, fisher_tokens=group_fisher_tokens,
    hutchinson=group_hutchinson, fast_fip=group_fast_fip)


def _ms(s: Optional[Spread]) -> str:
    return "–" if s is None else f"{s.median * 1e3:.3g} ({s.min * 1e3:.3g}–{s.max * 1e3:.3g})"


def _ratio(s: Optional[Spread]) -> str:
    return "–" if s is None else f"**{s.median:.2f}×** ({s.min:.2f}–{s.max:.2f}; IQR {s.p25:.2f}–{s.p75:.2f})"


def describe(r: Row) -> str:
    """One printed line per row."""
    if r.status != "ok":
        return f"{r.group}: {r.ours} vs {r.peer}: skipped ({r.reason})"
    return (f"{r.group}: {r.ours} {_ms(r.ours_cpu_s)} ms vs {r.peer} {r.peer_version or ''} {_ms(r.peer_cpu_s)} ms "
            f"CPU {r.unit} → ratio {_ratio(r.ratio_cpu)} (wall {_ratio(r.ratio_wall)}), goal {r.goal}")


def markdown(d: dict) -> str:
    """The table: on the CPU the headline is process CPU time (a shared machine), on CUDA synchronized wall time."""
    env = d["env"]
    dev, ver = env["device"], env["versions"]
    cpu = d["config"]["device"] == "cpu"
    main, other = ("cpu", "wall") if cpu else ("wall", "cpu")
    md = [f"# fip_fast vs its peers — {dev.get('name') if not cpu else 'CPU'}", "",
          f"* **Date**: {env['date']}; **machine**: {dev.get('name')}, {dev.get('cpu_count')} logical CPUs, "
          f"torch threads {dev.get('torch_threads')}; load average before {env['load_before']}, after "
          f"{env['load_after']}" + (" (a shared machine: read the CPU-time ratios, and as ranges)" if cpu else ""),
          f"* **Versions**: torch {ver.get('torch')}, python {ver.get('python')}, "
          f"git {str(ver.get('git_commit'))[:10]}",
          f"* **Command**: `{d['command']}`",
          f"* Interleaved rounds ({d['config']['rounds']}), one process, {d['config']['threads']} torch thread(s); "
          f"time = {'process CPU time' if cpu else 'wall time, synchronized'}, median (min–max) over rounds; "
          "ratio = ours / peer paired per round, median (min–max; IQR)."]
    if d["quick"]:
        md.append("* **--quick** run: tiny sizes, smoke test only — these numbers mean nothing")
    md += ["", f"| work | ours | peer (version) | ours ms | peer ms | ours / peer ({main}) | {other} ratio | goal |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        peer = f"{r['peer']} ({r['peer_version'] or 'n/a'})"
        if r["status"] != "ok":
            md.append(f"| {r['work']} | {r['ours']} | {peer} | – | – | skipped: {r['reason']} | – | {r['goal']} |")
            continue
        sp = {k: Spread(**r[k]) for k in (f"ours_{main}_s", f"peer_{main}_s", f"ratio_{main}", f"ratio_{other}")}
        md.append(f"| {r['work']} ({r['unit']}) | {r['ours']} | {peer} | {_ms(sp[f'ours_{main}_s'])} | "
                  f"{_ms(sp[f'peer_{main}_s'])} | {_ratio(sp[f'ratio_{main}'])} | {_ratio(sp[f'ratio_{other}'])} | "
                  f"{r['goal']} |")
    checks = [(r["group"], r["peer"], r["check"]) for r in d["rows"] if r.get("check")]
    if checks:
        md += ["", "## Checks on these inputs (agreement; for the optimizer rows, the traffic and the sides timed "
               "together)", ""]
        md += [f"* {g} vs {p}: {c}" for g, p, c in checks]
    return "\n".join(md) + "\n"


def run(cfg: Config, groups: list[str]) -> dict:
    torch.set_num_threads(cfg.threads)
    env = environment(torch.device(cfg.device))
    rows: list[Row] = []
    for name in groups:
        print(f"[peers] {name} ...", flush=True)
        for r in GROUPS[name](cfg):
            print("  " + describe(r), flush=True)
            rows.append(r)
    env["load_after"] = loadavg()
    return dict(schema=SCHEMA, quick=cfg.quick, config=asdict(cfg), groups=groups, env=env,
                rows=[asdict(r) for r in rows])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=1, help="calls per side per round")
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson products per call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (CUDA: wall time after a synchronize)")
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS), help="run these groups only")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/peers_cpu[_quick].json); the "
                                                 "markdown goes beside it")
    a = ap.parse_args(argv)
    cfg = Config(quick=a.quick, rounds=a.rounds or (2 if a.quick else 9), steps=a.steps,
                 warmup=1 if a.quick else 2, probes=a.probes, threads=a.threads, device=a.device)
    d = run(cfg, a.only)
    d["command"] = "python -m bench peers " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = device_tag(torch.device(a.device)) + ("_quick" if a.quick else "")
    out = Path(a.out) if a.out else RESULTS_DIR / f"peers_{tag}.json"
    write_json(d, out)
    out.with_suffix(".md").write_text(markdown(d))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
