"""Is Fast FIP in place faster than full FIP, and than the old module-swapping Fast FIP?

::

    python -m bench fast_fip                  # → bench/results/fast_fip_cpu.json + .md
    python -m bench fast_fip --quick          # smoke test (tiny sizes; numbers mean nothing)

Three sections, each run in interleaved rounds (every round times ``--steps`` consecutive calls of every variant,
in a rotated order, so that load drift on a shared machine hits them alike), one torch thread by default; each
round gives one time per variant and one *paired* ratio to the baseline; we report medians and 20/80th
percentiles over rounds, of process CPU time (the time the step needed) and of wall time (plus what it waited
for a core).

* **cnn** — a purification step through the same loop as ``purify`` (:class:`OptimizerPurifier.step`: the closure,
  the fd suppressor every step, ``trace_every=1``, the FIP optimizer, F0 anchor on, ``DEFAULTS`` of each method)
  on a small pre-activation residual CNN (:class:`fip_fast.evaluation.models.PreActBlock` stages), full rank,
  3×32×32 inputs: ``fip`` (:func:`build_fip`), ``inplace`` (:func:`build_fast_fip` at its shipped defaults:
  clipped SGD on δ + the mixing band), ``inplace_delta_only`` (the same in-place δ machinery with the FIP
  optimizer on δ and no mixing: what this design alone costs) and ``reference`` (δ only, the same groups and
  options on :mod:`fip_fast.spectral_reference`).  Target: in place ≤ 1.0×
  full FIP.
* **stack** — the same on 6 × ``Linear(1024, 1024)`` (ReLU between) at rank 64, batch × tokens ≥ 1024.  Target:
  in place ≤ 0.75× full FIP.
* **layer** — forward + backward of one 4096 × 4096 Linear: in place at rank 64 (δ unchanged: no weight update;
  and ``+update``: δ changed before every call, so the weight is re-derived), a frozen-weight ``nn.Linear`` (the
  input requires grad, the weight does not: the baseline), a trainable ``nn.Linear`` and the reference
  ``SpectralLayer``.  Target: in place ≤ 1.05× the frozen Linear (ideal 1.03).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import RESULTS_DIR, environment, loadavg, percentile, time_interleaved, write_json

SCHEMA = "fip_fast.bench.fast_fip/1"


# ------------------------------------------------------------------------------------------------ models
class SmallPreActResNet(nn.Module):
    """3×3 stem, four one-block PreAct stages (w, 2w, 4w, 8w; strides 1, 2, 2, 2), BN-ReLU, pool, Linear."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        from fip_fast.evaluation.models import PreActBlock

        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        blocks, c = [], width
        for i, s in enumerate((1, 2, 2, 2)):
            blocks.append(PreActBlock(c, width * 2 ** i, s))
            c = width * 2 ** i
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def linear_stack(d: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d, d)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ purifiers
def delta_fip_purifier(model: nn.Module, ctx, reparameterize: Callable, *, lr, rho, lr_delta, rho_delta,
                       fast_fip_extra="bias_bn", **o):
    """:func:`fip_fast.pipeline.methods.build_fast_fip`'s δ-only groups for another form of the layer:
    ``reparameterize(model) -> (deltas, spectra)`` makes the layers and returns their δ and a callable yielding
    each layer's s(δ); the FIP optimizer steps δ (``lr_delta``, ``rho_delta``) and the biases and norm affine
    parameters (``lr``, ``rho``, weight decay), with the same F0 normalization, options and spectral penalty
    (wd/2)·Σ relu(s)²."""
    from fip_fast.optim import FIP
    from fip_fast.pipeline.methods import _fip_kwargs, _is_extra, _normalized_fisher
    from fip_fast.pipeline.purifier import OptimizerPurifier

    extra_ids = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                 if p.requires_grad and _is_extra(m, n, fast_fip_extra)}
    deltas, spectra = reparameterize(model)
    extras = [p for p in model.parameters() if id(p) in extra_ids]
    for p in extras:
        p.requires_grad_(True)
    f0 = _normalized_fisher(model, ctx, [deltas, extras]) if o["eta_r"] > 0 else None
    kw = _fip_kwargs(o)
    wd = kw.pop("weight_decay")
    pg = [dict(params=deltas, lr=lr_delta, rho=rho_delta, weight_decay=0.0)]
    if extras:
        pg.append(dict(params=extras, lr=lr, rho=rho, weight_decay=wd))
    opt = FIP(pg, lr=lr, rho=rho, fisher0=f0, weight_decay=0.0, **kw)

    def penalty():
        return 0.5 * wd * sum(F.relu(s).pow(2).sum() for s in spectra())
    return OptimizerPurifier(model, opt, ctx.loss_fn, penalty=penalty if wd > 0 else None)


def _reference_purifier(model: nn.Module, ctx, *, relative=True, rank=None, **opts):
    """:func:`delta_fip_purifier` on the module-swapping reference (``fip_fast.spectral_reference``)."""
    from fip_fast import spectral_reference

    def reparameterize(m: nn.Module):
        deltas = spectral_reference.reparameterize(m, relative=relative, rank=rank)
        layers = [x for x in m.modules() if isinstance(x, spectral_reference.SpectralLayer)]
        return deltas, lambda: (x.spectrum() for x in layers)
    return delta_fip_purifier(model, ctx, reparameterize, **opts)


#: the δ-only Fast FIP (the FIP optimizer on δ, no mixing band): the machinery of the in-place design alone
DELTA_ONLY = dict(delta_optimizer="fip", clip_norm=None, mix_band=0)


def _purifier(variant: str, model: nn.Module, ctx, rank: Optional[int]):
    from fip_fast.pipeline.methods import DEFAULTS, build_fast_fip, build_fip

    method = "fip" if variant == "fip" else "fast_fip"
    from dataclasses import fields

    from fip_fast.pipeline.holding import HOLDING_DEFAULTS
    from fip_fast.pipeline.options import LoopOptions

    loop = {f.name for f in fields(LoopOptions)} | {"steps", "batch_size"}       # the loop's, not the builder's
    # the holding options (on by default) are left out: this bench times the methods' own step; their cost is
    # `python -m bench holding_cost`'s
    opts = {k: v for k, v in DEFAULTS[method].items() if k not in loop and k not in HOLDING_DEFAULTS}
    if method == "fip":
        return build_fip(model, ctx, **opts)
    opts["rank"] = rank
    if variant != "inplace":              # the shipped default; the others are δ only
        opts.update(DELTA_ONLY)
    if variant == "reference":
        for k in DELTA_ONLY:
            opts.pop(k)
        return _reference_purifier(model, ctx, **opts)
    return build_fast_fip(model, ctx, **opts)


def _ctx(x, y, loss_fn):
    from fip_fast.pipeline.purifier import MethodContext

    return MethodContext(x_train=x, y_train=y, device=torch.device("cpu"), loss_fn=loss_fn, seed=0, progress=False)


# ------------------------------------------------------------------------------------------------ timing
def _stats(xs: list[float]) -> dict[str, float]:
    return dict(median=statistics.median(xs), p20=percentile(xs, 20), p80=percentile(xs, 80))


def interleaved(calls: dict[str, Callable[[], Any]], baseline: str, rounds: int, steps: int,
                warmup: int) -> dict[str, Any]:
    """Time every call in rotated rounds; per variant: wall / CPU seconds per call and paired ratios to
    ``baseline``."""
    names = list(calls)
    w, c = time_interleaved([calls[n] for n in names], min_rounds=rounds, max_rounds=rounds, steps=steps,
                            warmup=warmup)
    wall, cpu = dict(zip(names, w)), dict(zip(names, c))
    return {n: dict(wall_s=_stats(wall[n]), cpu_s=_stats(cpu[n]),
                    ratio_cpu=_stats([a / b for a, b in zip(cpu[n], cpu[baseline])]),
                    ratio_wall=_stats([a / b for a, b in zip(wall[n], wall[baseline])])) for n in names}


# ------------------------------------------------------------------------------------------------ sections
def _purify_section(model_fn: Callable[[], nn.Module], x, y, loss_fn, rank: Optional[int], rounds: int,
                    steps: int, warmup: int) -> dict[str, Any]:
    calls, trainable = {}, {}
    n_fisher = min(16, x.shape[0])
    for v in ("fip", "inplace", "inplace_delta_only", "reference"):
        torch.manual_seed(0)
        model = model_fn()
        pur = _purifier(v, model, _ctx(x[:n_fisher], y[:n_fisher], loss_fn), rank)
        trainable[v] = sum(getattr(p, "trainable_entries", p.numel()) for p in pur.params)   # the band, not k×k
        calls[v] = (lambda p: lambda: p.step(x, y))(pur)
    res = interleaved(calls, "fip", rounds, steps, warmup)
    for v in res:
        res[v]["trainable"] = trainable[v]
    return res


def bench_cnn(width: int, batch: int, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    res = _purify_section(lambda: SmallPreActResNet(width), x, y, F.cross_entropy, None, rounds, steps, warmup)
    n = sum(p.numel() for p in SmallPreActResNet(width).parameters())
    return dict(model=f"SmallPreActResNet(width={width}), {n} parameters", batch=batch, input="3x32x32",
                rank="full", rounds=rounds, steps_per_round=steps, warmup=warmup, target="inplace <= 1.0x fip",
                variants=res)


def _token_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def bench_stack(d: int, depth: int, batch: int, tokens: int, rank: int, rounds: int, steps: int,
                warmup: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, d, generator=g)
    y = torch.randint(0, d, (batch, tokens), generator=g)
    res = _purify_section(lambda: linear_stack(d, depth), x, y, _token_ce, rank, rounds, steps, warmup)
    return dict(model=f"{depth} x Linear({d}, {d}) (ReLU between)", batch=batch, tokens=tokens, rank=rank,
                rounds=rounds, steps_per_round=steps, warmup=warmup, target="inplace <= 0.75x fip", variants=res)


def _layer_calls(d: int, tokens: int, rank: int) -> dict[str, Callable[[], None]]:
    from fip_fast import spectral, spectral_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).requires_grad_(True)
    go = torch.randn(tokens, d, generator=g)

    def make(kind):
        torch.manual_seed(0)
        mod = nn.Sequential(nn.Linear(d, d))
        if kind == "frozen_linear":
            mod[0].weight.requires_grad_(False)
            mod[0].bias.requires_grad_(False)
        elif kind in ("inplace", "inplace+update"):
            spectral.reparameterize(mod, rank=rank, svd="lowrank")      # timing only: any rank-k basis
        elif kind == "reference":
            spectral_reference.reparameterize(mod, rank=rank, svd="lowrank")
        ps = [p for p in mod.parameters() if p.requires_grad]

        def call():
            if kind == "inplace+update":
                with torch.no_grad():
                    ps[0].add_(1e-4)              # a changed δ: the weight is re-derived in the pre-hook
            mod(x).backward(go)
            x.grad = None
            for p in ps:
                p.grad = None
        return call
    kinds = ("frozen_linear", "inplace", "inplace+update", "trainable_linear", "reference")
    return {k: make(k) for k in kinds}


def bench_layer(d: int, tokens: int, rank: int, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    res = interleaved(_layer_calls(d, tokens, rank), "frozen_linear", rounds, steps, warmup)
    return dict(layer=f"Linear({d}, {d})", tokens=tokens, rank=rank, rounds=rounds, steps_per_round=steps,
                warmup=warmup, target="inplace <= 1.05x frozen_linear (ideal 1.03)", variants=res)


# ------------------------------------------------------------------------------------------------ analysis
def gemm_counts(m: int, n: int, k: int, N: int, passes: int = 2, updates: int = 2) -> dict[str, float]:
    """GEMM-equivalents per step for an m×n layer with N positions, in units of one N·m·n multiply-add GEMM.

    FIP: forward, dX, dW = 3 per pass (a frozen layer: forward, dX = 2).  In place: forward, dX (2)
    + a = x·Vhᵀ (k/m) + c = g·U (k/n) per pass, and k/N per weight update W = W0 + U·diag(·)·Vh (m·n·k).
    Reference: forward, dX, dW (3) + W(δ) = U·diag·Vh (k/N) + the projection of dW onto δ (Uᵀ·dW·Vhᵀ
    restricted to the diagonal, ≈ k/N) per pass.  fd: 2 passes per step and (about) 2 weight updates (perturb,
    step)."""
    return dict(fip=3.0 * passes, frozen=2.0 * passes, inplace=passes * (2 + k / m + k / n) + updates * k / N,
                reference=passes * (3 + 2 * k / N))


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"      # 3 significant digits: 126, 1.05, 0.0959 (a tiny layer's host time)


def _table(sec: dict, base: str) -> list[str]:
    md = [f"| variant | CPU ms / call | ratio to `{base}` (CPU) | wall ms / call | ratio (wall) | trainable |",
          "|---|---|---|---|---|---|"]
    for n, v in sec["variants"].items():
        rc, rw = v["ratio_cpu"], v["ratio_wall"]
        md.append(f"| `{n}` | {_ms(v['cpu_s']['median'])} ({_ms(v['cpu_s']['p20'])}–{_ms(v['cpu_s']['p80'])}) | "
                  f"**{rc['median']:.3f}** ({rc['p20']:.3f}–{rc['p80']:.3f}) | {_ms(v['wall_s']['median'])} | "
                  f"{rw['median']:.3f} ({rw['p20']:.3f}–{rw['p80']:.3f}) | {v.get('trainable', '')} |")
    return md


def markdown(d: dict) -> str:
    env = d["env"]
    dev, ver = env.get("device", {}), env.get("versions", {})
    md = ["# Fast FIP in place vs full FIP vs the module-swapping reference — CPU", "",
          f"* **Date**: {env.get('date')}; host `{env.get('hostname')}`",
          f"* **Machine**: {dev.get('name')}, {dev.get('cpu_count')} logical CPUs, torch threads "
          f"{dev.get('torch_threads')}; load average before {env.get('load_before')}, after {env.get('load_after')} "
          "(a shared machine: read the CPU-time columns)",
          f"* **Versions**: torch {ver.get('torch')}, python {ver.get('python')} "
          f"(git {str(ver.get('git_commit'))[:10]})",
          f"* **Command**: `{d['command']}`",
          "* Interleaved rounds, ratios paired per round; median (p20–p80) over rounds."]
    if d.get("quick"):
        md.append("* **--quick** run: tiny sizes, smoke test only — these numbers mean nothing")
    titles = dict(cnn="Purification step, residual CNN, full rank", stack="Purification step, Linear stack",
                  layer="One layer, forward + backward")
    for key in ("cnn", "stack", "layer"):
        sec = d[key]
        desc = {k: v for k, v in sec.items() if k not in ("variants",)}
        md += ["", f"## {titles[key]}", "", ", ".join(f"{k}: {v}" for k, v in desc.items()), ""]
        md += _table(sec, "frozen_linear" if key == "layer" else "fip")
    md += ["", "## GEMM count (analytical, per step, in units of one N·m·n GEMM)", "",
           "| case | m × n, k, N | FIP | frozen | in place | reference | in place / FIP | in place / frozen |",
           "|---|---|---|---|---|---|---|---|"]
    for name, g in d["gemms"].items():
        c = g["counts"]
        md.append(f"| {name} | {g['shape']} | {c['fip']:.2f} | {c['frozen']:.2f} | {c['inplace']:.2f} | "
                  f"{c['reference']:.2f} | {c['inplace'] / c['fip']:.3f} | {c['inplace'] / c['frozen']:.3f} |")
    if d.get("conclusion"):
        md += ["", "## What they say", "", d["conclusion"]]
    return "\n".join(md) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench fast_fip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="calls per variant per round")
    ap.add_argument("--cnn-width", type=int, default=16)
    ap.add_argument("--layer-tokens", type=int, default=512)
    ap.add_argument("--layer-dim", type=int, default=4096, help="the layer section's Linear(d, d) (8 with "
                    "--layer-tokens 4 and --layer-rank 8: the taps' host time per call, the GEMMs negligible)")
    ap.add_argument("--layer-rank", type=int, default=64)
    ap.add_argument("--sections", default="cnn,stack,layer")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--conclusion", default="")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = environment(torch.device("cpu"))
    q = a.quick
    r, s, w = (2, 1, 1) if q else (a.rounds, a.steps, 2)
    secs = a.sections.split(",")
    empty = dict(variants={})
    d = dict(schema=SCHEMA, env=env, quick=q, command=" ".join(["python -m bench fast_fip"] + argv),
             conclusion=a.conclusion)
    d["cnn"] = bench_cnn(4 if q else a.cnn_width, 8 if q else 32, r, s, w) if "cnn" in secs else empty
    sd, st = (64, (2, 16, 8)) if q else (1024, (8, 128, 64))
    d["stack"] = bench_stack(sd, 2 if q else 6, st[0], st[1], st[2], r, s, w) if "stack" in secs else empty
    ld, lt, lk = (128, 32, 8) if q else (a.layer_dim, a.layer_tokens, a.layer_rank)
    d["layer"] = bench_layer(ld, lt, lk, r, s, w) if "layer" in secs else empty
    d["gemms"] = {
        "stack layer": dict(shape=f"{sd}x{sd}, k={st[2]}, N={st[0] * st[1]}",
                            counts=gemm_counts(sd, sd, st[2], st[0] * st[1])),
        "one layer, one pass, no update": dict(shape=f"{ld}x{ld}, k={lk}, N={lt}",
                                               counts=gemm_counts(ld, ld, lk, lt, 1, 0)),
        "3x3 conv 64→64 at 8×8, full rank": dict(shape="64x576, k=64, N=32·64",
                                                  counts=gemm_counts(64, 576, 64, 32 * 64)),
    }
    env["load_after"] = loadavg()
    out = a.out or RESULTS_DIR / ("fast_fip_cpu_quick.json" if q else "fast_fip_cpu.json")
    write_json(d, out)
    out.with_suffix(".md").write_text(markdown(d))
    print(markdown(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
