"""Closure-free ("lagged") vs finite-difference ("fd") FIP suppressor: per-step cost and purification quality.

::

    python -m bench lagged_vs_fd                 # → bench/results/lagged_cpu.json + .md
    python -m bench lagged_vs_fd --quick         # smoke test (tiny sizes; numbers mean nothing)

**Speed.**  One training step (``zero_grad`` → forward → backward → ``step``) of the demo CNN
(:class:`fip_fast.evaluation.models.DemoCNN`, 1×28×28 inputs, batch 128 — the authors' batch size) with the same
batch for every variant: ``torch.optim.SGD`` (momentum 0.9, torch's default implementation), FIP without suppressor
(η_F = 0: the cost of FIP's fused step alone), FIP lagged and FIP fd with ``trace_every`` 1 and 5, and lagged with
the Fisher anchor.  Variants are interleaved in rounds (each round times ``--steps`` consecutive steps of every
variant, in a rotated order) so that load drift on a shared machine hits them alike; each round gives one
per-step time per variant and one *paired* ratio to SGD; we report medians and 20/80th percentiles over rounds,
of wall time and of process CPU time (one torch thread by default: CPU time is then the time the step needed,
wall time adds what it waited for a core).

**Quality.**  ``tests/_synthetic.make_task`` (a tiny CNN with a 3×3 patch backdoor, 10 % poisoning) for several
seeds; purify with the same data, batches, anchor and hyper-parameters (η_F = 1, ρ = 0.5, lr = 0.02,
``trace_every`` = 1, η_r = 0.1 with max-normalized F0 — the settings of tests/test_optim.py's end-to-end test)
for the same number of steps with: plain fine-tuning (η_F = 0), fd, lagged, and lagged with twice the steps
(the same number of forward/backward passes as fd).  ASR / ACC on the held-out test set (never used to choose
anything here).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import RESULTS_DIR, environment, loadavg, percentile, write_json

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ speed
def _variants(model_fn: Callable, fisher0_fn: Callable) -> dict[str, Callable]:
    from fip_fast import FIP

    def fip(**kw):
        def make():
            m = model_fn()
            f0 = fisher0_fn(m) if kw.pop("anchor", False) else None
            return m, FIP(m.parameters(), lr=0.01, momentum=0.9, fisher0=f0, **kw)
        return make

    def sgd():
        m = model_fn()
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    return {
        "sgd": sgd,
        "fip_eta0": fip(eta_F=0.0),
        "lagged_k1": fip(trace_estimator="lagged", eta_F=5e-3, rho=0.3, trace_every=1),
        "lagged_k5": fip(trace_estimator="lagged", eta_F=5e-3, rho=0.3, trace_every=5),
        "lagged_k1_anchor": fip(trace_estimator="lagged", eta_F=5e-3, rho=0.3, trace_every=1, anchor=True),
        "fd_k1": fip(trace_estimator="fd", eta_F=5e-3, rho=0.3, trace_every=1),
        "fd_k5": fip(trace_estimator="fd", eta_F=5e-3, rho=0.3, trace_every=5),
    }


def _stepper(model, opt, x, y) -> Callable[[], None]:
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        # Every variant is driven the way its users drive it: a closure for fd (it needs one), a plain
        # forward/backward + step() for the others.
        if getattr(opt, "param_groups", [{}])[0].get("trace_estimator") == "fd":
            opt.step(closure)
        else:
            closure()
            opt.step()
    return step


def bench_speed(batch: int, steps: int, rounds: int, warmup: int, width: int, hidden: int) -> dict[str, Any]:
    from fip_fast.evaluation.models import DemoCNN

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def model_fn():
        torch.manual_seed(0)
        return DemoCNN(10, 1, width=width, hidden=hidden)

    def fisher0_fn(m):
        return {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
                enumerate(m.parameters())}

    runs = {}
    for name, make in _variants(model_fn, fisher0_fn).items():
        m, o = make()
        m.train()
        runs[name] = _stepper(m, o, x, y)
        for _ in range(warmup):
            runs[name]()
    names = list(runs)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                runs[n]()
            wall[n].append((time.perf_counter() - w0) / steps)
            cpu[n].append((time.process_time() - c0) / steps)

    def stats(xs):
        return dict(median=statistics.median(xs), p20=percentile(xs, 20), p80=percentile(xs, 80))

    out = {}
    for n in names:
        out[n] = dict(wall_s=stats(wall[n]), cpu_s=stats(cpu[n]),
                      ratio_to_sgd_wall=stats([a / b for a, b in zip(wall[n], wall["sgd"])]),
                      ratio_to_sgd_cpu=stats([a / b for a, b in zip(cpu[n], cpu["sgd"])]))
    n_params = sum(p.numel() for p in model_fn().parameters())
    return dict(model=f"DemoCNN(width={width}, hidden={hidden}), {n_params} parameters", batch=batch,
                input="1x28x28", steps_per_round=steps, rounds=rounds, warmup=warmup, variants=out)


# ------------------------------------------------------------------------------------------------ quality
def _purify(task, estimator: str, eta_F: float, steps: int, batch: int = 32, seed: int = 0) -> tuple[Any, float]:
    from fip_fast import FIP, estimate_fisher

    model = copy.deepcopy(task.model)
    f0 = estimate_fisher(model, [(task.clean_x, task.clean_y)], normalize="max")
    opt = FIP(model.parameters(), lr=0.02, eta_F=eta_F, rho=0.5, trace_every=1, fisher0=f0, eta_r=0.1,
              trace_estimator=estimator)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(task.clean_y), (batch,), generator=g)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(task.clean_x[idx]), task.clean_y[idx])
            loss.backward()
            return loss
        if estimator == "fd":
            opt.step(closure)
        else:
            closure()
            opt.step()
    wall = time.perf_counter() - t0
    if estimator == "lagged":
        from fip_fast.integrations import drop_perturbation
        drop_perturbation(opt)          # the end of purification sees unperturbed weights
    return model, wall


def bench_quality(seeds: list[int], steps: int, make_kw: dict) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from _synthetic import make_task

    methods = {
        "ft (eta_F=0)": ("lagged", 0.0, steps),
        "fd": ("fd", 1.0, steps),
        "lagged": ("lagged", 1.0, steps),
        "lagged, 2x steps (= fd's passes)": ("lagged", 1.0, 2 * steps),
    }
    per_seed = []
    for s in seeds:
        task = make_task(seed=s, **make_kw)
        row = dict(seed=s, initial=dict(asr=task.asr(), acc=task.acc()))
        for name, (est, eta, n) in methods.items():
            m, wall = _purify(task, est, eta, n)
            row[name] = dict(asr=task.asr(m), acc=task.acc(m), steps=n, wall_s=wall)
        per_seed.append(row)
    summary = {}
    for name in ["initial"] + list(methods):
        asr = [r[name]["asr"] for r in per_seed]
        acc = [r[name]["acc"] for r in per_seed]
        summary[name] = dict(asr_mean=statistics.mean(asr), acc_mean=statistics.mean(acc),
                             asr_max=max(asr), acc_min=min(acc))
    return dict(task="tests/_synthetic.make_task (4-class 10x10 templates, 3x3 patch, 10 % poison)",
                hyper=dict(lr=0.02, momentum=0.95, eta_F=1.0, rho=0.5, trace_every=1, eta_r=0.1,
                           fisher0="per_sample, normalize=max", batch=32),
                steps=steps, seeds=seeds, per_seed=per_seed, summary=summary)


# ------------------------------------------------------------------------------------------------ report
def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def markdown(d: dict) -> str:
    env = d["env"]
    dev, ver = env.get("device", {}), env.get("versions", {})
    sp, q = d["speed"], d["quality"]
    md = ["# Lagged (closure-free) vs fd FIP suppressor — CPU", "",
          f"* **Date**: {env.get('date')}; host `{env.get('hostname')}`",
          f"* **Machine**: {dev.get('name', dev.get('type'))}, {dev.get('cpu_count')} logical CPUs, "
          f"torch threads {dev.get('torch_threads')}; load average before {env.get('load_before')}, after "
          f"{env.get('load_after')} (a shared machine: read the CPU-time columns)",
          f"* **Versions**: torch {ver.get('torch')}, python {ver.get('python')}, fip_fast {ver.get('fip_fast')} "
          f"(git {str(ver.get('git_commit'))[:10]})",
          f"* **Command**: `{d['command']}`"]
    if d.get("quick"):
        md.append("* **--quick** run: tiny sizes, smoke test only — these numbers mean nothing")
    md += ["", "## Per-step time", "",
           f"{sp['model']}, batch {sp['batch']} ({sp['input']}), the same batch every step; "
           f"{sp['rounds']} interleaved rounds × {sp['steps_per_round']} steps per variant after {sp['warmup']} "
           "warm-up steps.  Ratios are paired per round, then the median (p20–p80) is taken.", "",
           "| variant | CPU time / step | ratio to SGD (CPU) | wall / step | ratio to SGD (wall) |",
           "|---|---|---|---|---|"]
    for n, v in sp["variants"].items():
        rc, rw = v["ratio_to_sgd_cpu"], v["ratio_to_sgd_wall"]
        md.append(f"| `{n}` | {_ms(v['cpu_s']['median'])} | {rc['median']:.3f} ({rc['p20']:.3f}–{rc['p80']:.3f}) "
                  f"| {_ms(v['wall_s']['median'])} | {rw['median']:.3f} ({rw['p20']:.3f}–{rw['p80']:.3f}) |")
    md += ["", "`k1`/`k5`: `trace_every` 1 / 5; `fip_eta0`: FIP with η_F = 0 (its fused step, no suppressor); "
           "`anchor`: with the Fisher anchor (F0, θ0) as `purify` uses it.", "",
           "## Purification at equal steps", "",
           f"{q['task']}; seeds {q['seeds']}; {q['steps']} steps; hyper-parameters {q['hyper']}.", "",
           "| method | mean ASR | max ASR | mean ACC | min ACC |", "|---|---|---|---|---|"]
    for n, v in q["summary"].items():
        md.append(f"| {n} | {v['asr_mean']:.3f} | {v['asr_max']:.3f} | {v['acc_mean']:.3f} | {v['acc_min']:.3f} |")
    md += ["", "Per seed (ASR / ACC / wall):", "", "| seed | " + " | ".join(n for n in q["summary"]) + " |",
           "|---|" + "---|" * len(q["summary"])]
    for r in q["per_seed"]:
        cells = []
        for n in q["summary"]:
            v = r[n]
            cells.append(f"{v['asr']:.3f} / {v['acc']:.3f}" + (f" / {v['wall_s']:.1f} s" if "wall_s" in v else ""))
        md.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    if d.get("conclusion"):
        md += ["", "## Conclusion", "", d["conclusion"]]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench lagged_vs_fd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--purify-steps", type=int, default=150)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "lagged_cpu.json")
    ap.add_argument("--conclusion", default="", help="text appended to the markdown report")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    env = environment(device)
    if a.quick:
        speed = bench_speed(batch=8, steps=1, rounds=2, warmup=1, width=4, hidden=16)
        quality = bench_quality([0], steps=5, make_kw=dict(n=200, epochs=1)) if not a.skip_quality else None
    else:
        speed = bench_speed(batch=a.batch, steps=a.steps, rounds=a.rounds, warmup=3, width=32, hidden=256)
        quality = bench_quality(a.seeds, steps=a.purify_steps, make_kw={}) if not a.skip_quality else None
    env["load_after"] = loadavg()
    d = dict(env=env, quick=a.quick, command=" ".join(["python -m bench lagged_vs_fd"] + argv),
             speed=speed, quality=quality or dict(task="skipped", hyper={}, steps=0, seeds=[], per_seed=[],
                                                   summary={}),
             conclusion=a.conclusion)
    if a.quick and a.out == RESULTS_DIR / "lagged_cpu.json":
        a.out = RESULTS_DIR / "lagged_cpu_quick.json"
    write_json(d, a.out)
    a.out.with_suffix(".md").write_text(markdown(d))
    print(markdown(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
