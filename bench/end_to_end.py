"""End-to-end benchmark: per-step time of the purification methods, and wall time to ASR ≤ 5 %.

::

    python -m bench end_to_end                 # demo CNN + ResNet-18 (32×32, small batch) step times; MNIST task
    python -m bench end_to_end --quick         # CI smoke: tiny model, few steps, synthetic task
    python -m bench end_to_end --device cuda --models demo_cnn resnet18 --batch 128

Methods (same model, same batch, same run; the step times are measured *interleaved*: one cycle of each method in
turn, repeated, so that a change of machine load hits every method alike):

``sgd``          plain fine-tuning: ``torch.optim.SGD(lr, momentum)``, one forward/backward per step
``fip_fd``       :class:`fip_fast.FIP`, ``trace_estimator="fd"`` every 5 steps (2 forward/backward on those), F0 anchor
``fip_lagged``   FIP, ``"lagged"`` (closure-free one-pass suppressor) every 5 steps
``fip_batch``    FIP, ``"batch"``: T = ‖∇ℓ‖², ∇T by double backward every 5 steps (the authors' approach)
``fast_fip``     Fast FIP in place: :func:`fip_fast.spectral.reparameterize` (relative δ) + biases / norm, FIP fd
                 every 5 steps

A *cycle* is ``trace_every`` = 5 consecutive steps (one suppressor step and four plain steps), so the per-step
time of a cycle is the amortized cost.  We report the mean per step over all measured steps, the median of the
per-cycle time / 5 with its 20/80 percentiles, and the medians of the plain steps and of the suppressor steps.
Wall time (``time.perf_counter``; CUDA: synchronized) and, on CPU, process CPU time.

Time to ASR ≤ 5 %: every method starts from the same backdoored model and runs on the same clean set; ASR on the
triggered test set is measured every ``--eval-every`` steps (outside the timed region) and the run stops at the
first evaluation with ASR ≤ 5 % or after ``--max-steps``.  Stopping on test ASR is the *benchmark's* stopwatch, not
model selection — the library never selects on test ASR.  The set-up (F0 estimation; Fast FIP's SVDs) is timed
separately and included in the total.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import RESULTS_DIR, device_tag, environment, loadavg, pick_device, save_results, summarize, sync

SCHEMA = "fip_fast.bench.end_to_end/1"
METHODS = ("sgd", "fip_fd", "fip_lagged", "fip_batch", "fast_fip")
DESC = {
    "sgd": "plain fine-tuning (SGD + momentum)",
    "fip_fd": "FIP, fd suppressor every 5 steps",
    "fip_lagged": "FIP, lagged (one-pass) suppressor every 5 steps",
    "fip_batch": "FIP, double-backward ('batch') suppressor every 5 steps",
    "fast_fip": "Fast FIP (relative δ + bias/BN), fd every 5 steps",
}
#: hyper-parameters (those of fip_fast.purify's defaults at the time of writing, with trace_every = 5)
HYPER = dict(lr=0.01, momentum=0.9, eta_F=0.005, eta_r=1.0, rho=0.3, max_mix=1.0, trace_every=5,
             lr_delta=0.05, rho_delta=0.3)


# ------------------------------------------------------------------------------------------------ methods
class Runner:
    """One method on one model: ``step(x, y)`` runs a full optimizer step (forward/backward included)."""

    def __init__(self, method: str, model: nn.Module, fisher_data: tuple, hyper: dict, impl: str = "auto"):
        from fip_fast import FIP
        from fip_fast.fisher import estimate_fisher, normalize_fisher

        self.method, self.model, self.h = method, model, hyper
        t0 = time.perf_counter()
        self.opt: torch.optim.Optimizer
        h = hyper

        def f0_of(groups):
            ps = [p for g in groups for p in g]
            fis = estimate_fisher(model, [fisher_data], params=ps, estimator="per_sample")
            out = {}
            for g in groups:
                if g:
                    out.update(normalize_fisher({p: fis[p] for p in g}, "max"))
            return out

        if method == "sgd":
            params = [p for p in model.parameters() if p.requires_grad]
            self.opt = torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"])
        elif method in ("fip_fd", "fip_lagged", "fip_batch"):
            params = [p for p in model.parameters() if p.requires_grad]
            est = {"fip_fd": "fd", "fip_lagged": "lagged", "fip_batch": "batch"}[method]
            self.opt = FIP(params, lr=h["lr"], momentum=h["momentum"], eta_F=h["eta_F"], eta_r=h["eta_r"],
                           rho=h["rho"], max_mix=h["max_mix"], trace_every=h["trace_every"], trace_estimator=est,
                           fisher0=f0_of([params]), impl=impl)
        elif method == "fast_fip":
            from fip_fast import spectral
            extras_ids = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                          if p.requires_grad and (n == "bias" or isinstance(
                              m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)))}
            deltas = spectral.reparameterize(model, relative=True, impl=impl)
            extras = [p for p in model.parameters() if id(p) in extras_ids]
            for p in extras:
                p.requires_grad_(True)
            groups = [dict(params=deltas, lr=h["lr_delta"], rho=h["rho_delta"])]
            if extras:
                groups.append(dict(params=extras, lr=h["lr"], rho=h["rho"]))
            self.opt = FIP(groups, lr=h["lr"], momentum=h["momentum"], eta_F=h["eta_F"], eta_r=h["eta_r"],
                           rho=h["rho"], max_mix=h["max_mix"], trace_every=h["trace_every"],
                           trace_estimator="fd", fisher0=f0_of([deltas, extras]), impl=impl)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        self.trainable = sum(p.numel() for g in self.opt.param_groups for p in g["params"])
        self.setup_s = time.perf_counter() - t0

    def is_suppressor(self) -> bool:
        return self.method != "sgd" and self.opt.is_suppressor_call()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        model, opt = self.model, self.opt
        if self.method in ("sgd", "fip_lagged"):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            return

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if self.method == "fip_batch":
                opt.backward(loss)
            else:
                loss.backward()
            return loss
        opt.step(closure)

    def unperturbed(self):
        return self.opt.unperturbed() if hasattr(self.opt, "unperturbed") else _null()

    def finalize(self) -> nn.Module:
        if self.method == "fast_fip":
            from fip_fast import spectral
            return spectral.merge(self.model)
        return self.model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------------ step time
def step_times(model_name: str, methods: list[str], device: torch.device, batch: int, cycles: int,
               warmup_cycles: int, hyper: dict, impl: str, seed: int = 0) -> dict[str, Any]:
    from fip_fast.evaluation.models import build_model

    in_ch, hw = (3, 32) if "resnet" in model_name else (1, 28)
    if model_name == "synthetic_cnn":
        in_ch, hw = 1, 10
    torch.manual_seed(seed)
    if model_name == "synthetic_cnn":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _synthetic import small_cnn
        base = small_cnn()
        ncls = 4
    else:
        base = build_model(model_name, 10, in_ch)
        ncls = 10
    base = base.to(device).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_ch, hw, hw, generator=g).to(device)
    y = torch.randint(0, ncls, (batch,), generator=g).to(device)
    fx, fy = torch.rand(min(batch, 64), in_ch, hw, hw, generator=g).to(device), \
        torch.randint(0, ncls, (min(batch, 64),), generator=g).to(device)
    runners = {m: Runner(m, copy.deepcopy(base), (fx, fy), hyper, impl) for m in methods}
    te = hyper["trace_every"]
    rec: dict[str, dict[str, list]] = {m: dict(cycle=[], cycle_cpu=[], plain=[], sup=[]) for m in methods}
    for c in range(warmup_cycles + cycles):
        for m, r in runners.items():       # interleaved: one cycle of each method in turn
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(te):
                sup = r.is_suppressor()
                s0 = time.perf_counter()
                r.step(x, y)
                sync(device)
                if c >= warmup_cycles:
                    rec[m]["sup" if sup else "plain"].append(time.perf_counter() - s0)
            if c >= warmup_cycles:
                rec[m]["cycle"].append(time.perf_counter() - t0)
                rec[m]["cycle_cpu"].append(time.process_time() - c0)
    out = []
    for m in methods:
        d = rec[m]
        cyc = summarize(d["cycle"])
        out.append(dict(method=m, desc=DESC[m], trainable=runners[m].trainable, cycle=te,
                        mean_step_s=sum(d["cycle"]) / (len(d["cycle"]) * te),
                        cpu_mean_step_s=(sum(d["cycle_cpu"]) / (len(d["cycle_cpu"]) * te)
                                         if device.type == "cpu" else None),
                        cycle_median_s=cyc["median_s"], cycle_p20_s=cyc["p20_s"], cycle_p80_s=cyc["p80_s"],
                        n_cycles=len(d["cycle"]),
                        plain_step_median_s=summarize(d["plain"])["median_s"] if d["plain"] else None,
                        suppressor_step_median_s=summarize(d["sup"])["median_s"] if d["sup"] else None,
                        setup_s=runners[m].setup_s))
    by = {o["method"]: o for o in out}
    targets = {}
    if "sgd" in by:
        base_t = by["sgd"]["cycle_median_s"]
        for m in ("fip_fd", "fip_lagged", "fip_batch", "fast_fip"):
            if m in by:
                targets[f"{m} / plain FT per step"] = f"{by[m]['cycle_median_s'] / base_t:.2f}×" + (
                    " (target ≤ 1.3×: " + ("met" if by[m]["cycle_median_s"] / base_t <= 1.3 else "NOT met") + ")"
                    if m in ("fip_fd", "fip_lagged") else "")
    if "fip_batch" in by and "fast_fip" in by:
        targets["fip_batch / fast_fip per step"] = \
            f"{by['fip_batch']['cycle_median_s'] / by['fast_fip']['cycle_median_s']:.2f}×"
    return dict(model=model_name, batch_size=batch, input_shape=[in_ch, hw, hw], methods=out, targets=targets,
                note=f"{cycles} measured cycles of {te} steps per method after {warmup_cycles} warm-up cycle(s), "
                     "interleaved; random inputs (the cost of a step does not depend on the data).")


# ------------------------------------------------------------------------------------------------ task
def make_task(name: str, seed: int, cache_dir: Optional[Path], say: Callable, quick: bool = False
              ) -> dict[str, Any]:
    """The backdoored model and data: ``mnist`` (MNIST-5k, BadNets, DemoCNN — the library's demo substrate) or
    ``synthetic`` (tests/_synthetic.py: 10×10 templates, a 3×3 patch, a small CNN)."""
    if name == "synthetic":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import _synthetic as S
        t = S.make_task(seed=seed, n=400, epochs=2) if quick else S.make_task(seed=seed)
        trig = S.trigger(t.test_x[t.test_y != S.TARGET])
        return dict(model=t.model, clean=(t.clean_x, t.clean_y), test=(t.test_x, t.test_y),
                    trig=(trig, t.test_y[t.test_y != S.TARGET]), target=S.TARGET,
                    desc="synthetic (tests/_synthetic.py make_task: 10×10 noisy templates, 4 classes, 3×3 corner "
                         "patch, 10 % poisoning, small CNN; 150 clean images)")
    from fip_fast.evaluation.attacks import make_attack
    from fip_fast.evaluation.data import load_mnist5k, split_dataset
    from fip_fast.evaluation.models import DemoCNN
    from fip_fast.evaluation.train import train_backdoored

    x, y = load_mnist5k()
    sp = split_dataset(x, y, test_fraction=0.2, val_fraction=0.05, seed=seed)
    atk = make_attack("badnets", target=0, image_shape=(1, 28, 28), seed=seed)
    xp, yp, _ = atk.poison_train(*sp.train, seed=seed)
    model = DemoCNN()
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"democnn_badnets_seed{seed}.pt"
    if cache is not None and cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        say(f"loaded backdoored model from {cache}")
    else:
        say("training the backdoored DemoCNN on MNIST-5k (BadNets, 10 %) ...")
        train_backdoored(model, xp, yp, epochs=4, seed=seed, progress=False)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    model.eval()
    trig = atk.triggered_test(*sp.test)
    return dict(model=model, clean=sp.val, test=sp.test, trig=trig, target=0,
                desc=f"MNIST-5k, BadNets (3×3 patch, 10 %), DemoCNN trained 4 epochs; clean set = "
                     f"{len(sp.val[1])} images (5 % of the training pool), test {len(sp.test[1])} images")


def _asr_acc(model: nn.Module, task: dict, device: torch.device) -> tuple[float, float]:
    was = model.training
    model.eval()
    with torch.no_grad():
        tx, ty = task["trig"]
        asr = (model(tx.to(device)).argmax(1) == task["target"]).float().mean().item()
        cx, cy = task["test"]
        acc = (model(cx.to(device)).argmax(1) == cy.to(device)).float().mean().item()
    model.train(was)
    return asr, acc


def time_to_asr(task: dict, methods: list[str], device: torch.device, hyper: dict, impl: str, batch: int,
                max_steps: int, eval_every: int, threshold: float, seed: int, say: Callable) -> dict[str, Any]:
    cx, cy = (t.to(device) for t in task["clean"])
    res = []
    for m in methods:
        model = copy.deepcopy(task["model"]).to(device).train()
        asr0, acc0 = _asr_acc(model, task, device)
        r = Runner(m, model, (cx, cy), hyper, impl)
        g = torch.Generator().manual_seed(seed)
        train_s, steps, reached = 0.0, 0, False
        asr, acc = asr0, acc0
        while steps < max_steps:
            idx = torch.randint(0, len(cy), (batch,), generator=g)   # with replacement, as the authors
            xb, yb = cx[idx.to(device)], cy[idx.to(device)]
            sync(device)
            t0 = time.perf_counter()
            r.step(xb, yb)
            sync(device)
            train_s += time.perf_counter() - t0
            steps += 1
            if steps % eval_every == 0 or steps == max_steps:
                with r.unperturbed():
                    asr, acc = _asr_acc(model, task, device)
                if asr <= threshold:
                    reached = True
                    break
        res.append(dict(method=m, desc=DESC[m], reached=reached, steps=steps, train_time_s=train_s,
                        setup_s=r.setup_s, total_time_s=train_s + r.setup_s, asr=asr, acc=acc, asr0=asr0,
                        acc0=acc0, trainable=r.trainable))
        say(f"  {m:<11} reached={reached!s:<5} steps={steps:4d} train {train_s:7.2f} s (+ setup {r.setup_s:.2f} s)"
            f"  ASR {asr0:.3f}→{asr:.3f}  ACC {acc0:.3f}→{acc:.3f}")
    by = {r["method"]: r for r in res}
    speed = {}
    if "fip_batch" in by and "fast_fip" in by:
        a, b = by["fip_batch"], by["fast_fip"]
        if a["reached"] and b["reached"]:
            ratio = a["total_time_s"] / b["total_time_s"]
            speed["fip_batch / fast_fip (time to target, setup included)"] = \
                f"{ratio:.2f}× (target ≥ 5×: {'met' if ratio >= 5 else 'NOT met'})"
        else:
            speed["fip_batch / fast_fip"] = ("not comparable: " + ", ".join(
                k for k in ("fip_batch", "fast_fip") if not by[k]["reached"]) + f" did not reach ASR ≤ "
                f"{threshold:g} within {max_steps} steps")
    if "fip_fd" in by and "sgd" in by and by["fip_fd"]["reached"] and by["sgd"]["reached"]:
        speed["sgd / fip_fd time to target"] = f"{by['sgd']['total_time_s'] / by['fip_fd']['total_time_s']:.2f}×"
    return dict(asr_threshold=threshold, desc=task["desc"], methods=res, speedups=speed,
                note=f"batch {batch} sampled with replacement from the clean set, ASR checked every {eval_every} "
                     f"steps (evaluation not timed), at most {max_steps} steps; hyper-parameters {hyper}.")


# ------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    say = (lambda *a: None) if args.silent else (lambda *a: print(*a, flush=True))
    env = environment(device)
    hyper = dict(HYPER, trace_every=args.trace_every)
    quick = args.quick
    methods = args.methods or list(METHODS)
    models = [] if args.no_step_time else (args.models or (["synthetic_cnn"] if quick else ["demo_cnn", "resnet18"]))
    secs = []
    for mname in models:
        gpu = device.type == "cuda"
        if mname == "resnet18":
            batch = args.batch or (128 if gpu else 8)
            cycles = args.cycles or (20 if gpu else 2)
        else:
            batch = args.batch or (16 if quick else (128 if gpu else 64))
            cycles = args.cycles or (1 if quick else (20 if gpu else 6))
        say(f"step time: {mname}, batch {batch}, {cycles} cycles")
        sec = step_times(mname, methods, device, batch, cycles, 1, hyper, args.impl, args.seed)
        for m in sec["methods"]:
            say(f"  {m['method']:<11} {m['cycle_median_s'] / m['cycle'] * 1e3:9.2f} ms/step (cycle median)  "
                f"mean {m['mean_step_s'] * 1e3:8.2f}  plain {((m['plain_step_median_s'] or 0) * 1e3):8.2f}  "
                f"suppressor {((m['suppressor_step_median_s'] or 0) * 1e3):8.2f}")
        for k, v in sec["targets"].items():
            say(f"  {k}: {v}")
        secs.append(sec)
    tta = None
    if not args.no_asr:
        task_name = args.task or ("synthetic" if quick else "mnist")
        try:
            task = make_task(task_name, args.seed, None if args.no_cache else Path(args.cache_dir), say, quick)
        except Exception as exc:
            if task_name == "synthetic":
                raise
            say(f"task {task_name!r} unavailable ({type(exc).__name__}: {exc}); using the synthetic task")
            task = make_task("synthetic", args.seed, None, say, quick)
        max_steps = args.max_steps or (10 if quick else 300)
        eval_every = args.eval_every or (5 if quick else 10)
        say(f"time to ASR ≤ {args.asr:g}: {task['desc']}")
        tta = time_to_asr(task, methods, device, hyper, args.impl, args.batch_asr or (16 if quick else 64),
                          max_steps, eval_every, args.asr, args.seed, say)
        for k, v in tta["speedups"].items():
            say(f"  {k}: {v}")
    return dict(schema=SCHEMA, **env, load_after=loadavg(), quick=quick, config=dict(hyper=hyper, impl=args.impl,
                methods=methods, models=models), step_time=secs, time_to_asr=tta,
                task=dict(desc=tta["desc"]) if tta else {})


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (CI smoke)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--models", nargs="+", default=None, help="demo_cnn resnet18 preact_resnet18 synthetic_cnn")
    p.add_argument("--batch", type=int, default=None, help="batch of the step-time measurement")
    p.add_argument("--cycles", type=int, default=None, help="measured cycles (of trace_every steps) per method")
    p.add_argument("--trace-every", type=int, default=HYPER["trace_every"])
    p.add_argument("--impl", default="auto", help="FIP kernel impl (auto reference foreach triton cuda)")
    p.add_argument("--task", choices=("mnist", "synthetic"), default=None,
                   help="backdoor task for time-to-ASR (default mnist; synthetic with --quick)")
    p.add_argument("--no-asr", action="store_true", help="skip the time-to-ASR part")
    p.add_argument("--no-step-time", action="store_true", help="skip the per-step time part")
    p.add_argument("--asr", type=float, default=0.05, help="ASR threshold")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--batch-asr", type=int, default=None, help="batch of the time-to-ASR runs (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "fip_fast_bench"),
                   help="where the backdoored demo model is cached")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--silent", action="store_true")
    p.add_argument("--markdown", action="store_true")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench end_to_end", description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    device = pick_device(args.device)
    path = Path(args.out) if args.out else \
        RESULTS_DIR / f"end_to_end_{device_tag(device)}{'_quick' if args.quick else ''}.json"
    return save_results(res, path, markdown=args.markdown, silent=args.silent)


if __name__ == "__main__":
    main()
