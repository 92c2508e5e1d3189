"""Baselines comparison: FIP, Fast FIP, FT, FT-SAM, NGF and Salience-AR on the bundled MNIST demo.

For every attack and seed: build the backdoored model of ``fip-fast demo --attack A --seed S`` (the demo's split,
attack at its default rate, CNN and training: :data:`fip_fast.cli.DEMO_DEFAULTS`), then purify a copy of it with
every method through :func:`fip_fast.pipeline.purify` on the defender's clean set (the split's ``val`` part, 10 % of
the training pool, 400 images) with the **same step count and batch size for every method** (default 300 steps,
batch 64: the budget of FIP's defaults).
Measured: clean test ACC, ASR and RA on the triggered test set, wall time of the purification (``purify``'s total
minus its clean-validation evaluations), trainable parameters, and λ_max of the Hessian (power iteration on a
fixed batch of clean test images, all parameters) after.

Selection uses clean data only: FIP / Fast FIP return the latest clean-val-acceptable step (purify's rule), the
baselines return their last step (their defaults were chosen by a clean-data rule, see
:mod:`fip_fast.baselines`).  Test ASR is measured, never used.

Incremental / resumable: every (attack, seed, method) cell is written to the JSON as soon as it is done, and a
run skips the cells that the JSON already holds for the same configuration (steps, batch size, training epochs,
λ_max settings, model architecture).  A long comparison can therefore be split over several invocations (e.g. one
attack per call) and an interrupted one continues where it stopped; ``--fresh`` discards the JSON first.  A JSON
written with a different configuration is never mixed in: the run stops and says so.

Usage::

    python bench/baselines.py                                        # all 5 attacks × seeds 0 1 2 × 6 methods
    python bench/baselines.py --attacks badnets --seeds 0 --steps 10 \
        --out-json /tmp/smoke.json --out-md /tmp/smoke.md             # a smoke run

Writes ``bench/results/baselines_cpu.json`` (every run) and ``bench/results/baselines_cpu.md`` (mean ± std table,
the command, date, machine, versions).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

METHODS = ("fast_fip", "fip", "ft", "ft_sam", "ngf", "salience_ar")
ROOT = Path(__file__).resolve().parent
OUT_JSON = ROOT / "results" / "baselines_cpu.json"
OUT_MD = ROOT / "results" / "baselines_cpu.md"


def _versions() -> dict:
    import numpy

    import fip_fast

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "fip_fast": fip_fast.__version__}
    try:
        import subprocess

        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT.parent, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def arch_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture (class name, parameter / buffer names and shapes): keys the model cache
    and the resumable JSON, so a changed ``demo_cnn`` never reuses stale weights or results."""
    desc = type(model).__name__ + ";" + ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha1(desc.encode()).hexdigest()[:10]


def backdoored_model(attack: str, seed: int, epochs: int, cache: Path):
    """The backdoored model of ``fip-fast demo --attack <attack> --seed <seed> --epochs <epochs>``: the demo's split,
    attack, CNN and training (:data:`fip_fast.cli.DEMO_DEFAULTS`), in the demo's order of seeding, so seed 0 /
    badnets is the very model the demo purifies."""
    from fip_fast.cli import DEMO_DEFAULTS as D
    from fip_fast.evaluation.attacks import make_attack
    from fip_fast.evaluation.data import load_mnist5k, split_dataset
    from fip_fast.evaluation.models import demo_cnn
    from fip_fast.evaluation.train import train_backdoored

    x, y = load_mnist5k()
    sp = split_dataset(x, y, test_fraction=D["test_fraction"], val_fraction=D["val_fraction"], seed=seed)
    atk = make_attack(attack, image_shape=tuple(x.shape[1:]), seed=seed)
    torch.manual_seed(seed)
    model = demo_cnn(in_channels=x.shape[1], width=D["width"], hidden=D["hidden"])
    f = cache / f"{attack}_s{seed}_e{epochs}_{arch_fingerprint(model)}.pt"
    t0 = time.perf_counter()
    if f.is_file():
        model.load_state_dict(torch.load(f, weights_only=True))
        model.eval()
    else:
        torch.manual_seed(seed)
        xp, yp, _ = atk.poison_train(*sp.train, seed=seed)
        train_backdoored(model, xp, yp, epochs=epochs, lr=D["train_lr"], seed=seed, progress=False)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), f)
    return model, sp, atk, time.perf_counter() - t0


def measure(model, sp, atk, trig, lam_batch: int, lam_iters: int) -> dict:
    from fip_fast.evaluation.metrics import evaluate
    from fip_fast.evaluation.smoothness import hessian_max_eigenvalue

    m = evaluate(model, sp.test, trig, atk.target)
    xs, ys = sp.test[0][:lam_batch], sp.test[1][:lam_batch]
    ps = list(model.parameters())
    m["lambda_max"] = hessian_max_eigenvalue(model, xs, ys, params=ps, iters=lam_iters, seed=0)
    return m


def _stats(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def summarize(runs: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["attack"], r["method"]), []).append(r)
    out = {}
    for (attack, method), rs in groups.items():
        out[f"{attack}/{method}"] = {k: _stats([r[k] for r in rs]) for k in
                                     ("acc", "asr", "ra", "time_s", "trainable_params", "lambda_max")}
    return out


def write_md(doc: dict, path: Path) -> None:
    runs, cfg = doc["runs"], doc["config"]
    attacks = [a for a in cfg["attacks"] if any(r["attack"] == a for r in runs)]
    methods = ["none"] + list(cfg["methods"])
    summ = summarize(runs)
    lines = [
        "# Baselines on the MNIST demo (CPU)",
        "",
        "Reproduce: " + " ; ".join(f"`{c}`" for c in doc.get("commands", [doc["command"]])),
        "",
        f"Date: {doc['date']} · machine: {doc['machine']} · load average at start / end: {doc['load_start']} / "
        f"{doc.get('load_end', 'n/a')} · versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        "",
        f"Setup: demo CNN ({cfg['model_params']:,} parameters) trained {cfg['train_epochs']} epochs on poisoned "
        f"MNIST-5k (attack default rate), clean set = the split's val part ({cfg['n_clean']} images; purify holds "
        f"out 20 % of it for clean validation), **{cfg['steps']} steps, batch {cfg['batch_size']} for every "
        f"method**, every other option at the method's default. Seeds {cfg['seeds']} (data split, poisoning, "
        "training, purification); "
        f"{cfg['torch_threads']} torch thread(s) on a shared CPU, so wall times are noisy (compare within a "
        "column). λ_max: power iteration "
        f"({cfg['lambda_iters']} Hessian-vector products) on {cfg['lambda_batch']} clean test images, all "
        "parameters, eval mode. `none` = the backdoored model before purification. ACC/ASR/RA in %, mean ± std "
        "over seeds (n = number of seeds).",
        "",
        "Selection used clean data only (FIP / Fast FIP: purify's latest-acceptable-clean-val rule; baselines: "
        "last step, with defaults chosen by a clean-data rule — see fip_fast/baselines). Test ASR was never used to "
        "choose anything.",
        "",
    ]
    for attack in attacks:
        lines += [f"## {attack}", "",
                  "| method | ACC % | ASR % | RA % | time s | trainable params | λ_max after | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in methods:
            key = f"{attack}/{method}"
            if key not in summ:
                continue
            s = summ[key]

            def pm(k, scale=1.0, fmt="{:.1f}"):
                m, sd, _ = s[k]
                if math.isnan(m):
                    return "–"
                return (fmt + " ± " + fmt).format(m * scale, sd * scale)

            tp = s["trainable_params"][0]
            lines.append(f"| {method} | {pm('acc', 100)} | {pm('asr', 100)} | {pm('ra', 100)} | "
                         f"{pm('time_s') if method != 'none' else '–'} | "
                         f"{'–' if math.isnan(tp) else f'{int(round(tp)):,}'} | {pm('lambda_max', 1, '{:.2f}')} | "
                         f"{s['acc'][2]} |")
        lines.append("")
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"* {n}" for n in doc["notes"]] + [""]
    path.write_text("\n".join(lines))


CONFIG_KEYS = ("steps", "batch_size", "train_epochs", "lambda_batch", "lambda_iters", "arch")


def _save(doc: dict, out_json: Path, out_md: Path) -> None:
    doc["summary"] = summarize(doc["runs"])
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(out_json.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, out_json)             # atomic: an interrupted write never corrupts the results
    write_md(doc, out_md)


def _parser() -> argparse.ArgumentParser:
    from fip_fast.evaluation.attacks import ATTACKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attacks", nargs="+", default=sorted(ATTACKS), choices=sorted(ATTACKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-epochs", type=int, default=None, help="default: the demo's")
    p.add_argument("--lambda-batch", type=int, default=64)
    p.add_argument("--lambda-iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=os.environ.get("FIP_BENCH_CACHE", "/tmp/fip_fast_bench_models"))
    p.add_argument("--out-json", default=str(OUT_JSON))
    p.add_argument("--out-md", default=str(OUT_MD))
    p.add_argument("--fresh", action="store_true", help="discard an existing JSON instead of resuming from it")
    return p


def _open_doc(out_json: Path, config: dict, cmd: str, fresh: bool) -> Optional[dict]:
    """The results document: resumed from ``out_json`` when it exists (None if its configuration differs), else
    a new one."""
    if out_json.is_file() and not fresh:
        old = json.loads(out_json.read_text())
        oc = old.get("config", {})
        diff = {k: (oc.get(k), config[k]) for k in CONFIG_KEYS if oc.get(k) != config[k]}
        if diff:
            print(f"{out_json} was written with a different configuration {diff} (old, new); pass --fresh to "
                  "discard it or --out-json to write elsewhere", file=sys.stderr)
            return None
        doc = old
        cmds = doc.setdefault("commands", [doc.get("command", "")])
        if cmds[-1] != cmd:
            cmds.append(cmd)
        print(f"resuming from {out_json}: {len(doc['runs'])} cells already done", flush=True)
        return doc
    return {"command": cmd, "commands": [cmd], "date": None, "machine": _machine(), "versions": _versions(),
            "load_start": _load(), "config": config, "runs": [], "notes": [], "elapsed_s": 0.0}


def _merge_config(cfg: dict, args: argparse.Namespace) -> None:
    """The table lists the union of what was asked for over all (resumed) invocations, in canonical order."""
    from fip_fast.evaluation.attacks import ATTACKS

    cfg["attacks"] = [a for a in sorted(ATTACKS) if a in set(cfg.get("attacks", [])) | set(args.attacks)]
    cfg["seeds"] = sorted(set(cfg.get("seeds", [])) | set(args.seeds))
    cfg["methods"] = [m for m in METHODS if m in set(cfg.get("methods", [])) | set(args.methods)]


def _run_cell(doc: dict, args: argparse.Namespace, attack: str, seed: int, todo: list[str], purify,
              clock, elapsed0: float) -> None:
    """The backdoored model of (attack, seed) and every method of ``todo`` on it; saved after each method.
    ``purify``: :func:`fip_fast.pipeline.purify`; ``clock()``: seconds since this invocation started;
    ``elapsed0``: seconds of the earlier (resumed) ones."""
    out_json, out_md = Path(args.out_json), Path(args.out_md)
    model0, sp, atk, t_train = backdoored_model(attack, seed, args.train_epochs, Path(args.cache))
    doc["config"]["n_clean"] = int(sp.val[1].numel())
    trig = atk.triggered_test(*sp.test)
    if "none" in todo:
        base = measure(model0, sp, atk, trig, args.lambda_batch, args.lambda_iters)
        doc["runs"].append({"attack": attack, "seed": seed, "method": "none", **base, "time_s": None,
                            "trainable_params": None, "train_s": t_train})
        print(f"[{clock():7.1f}s] {attack} seed {seed}: backdoored "
              f"acc {base['acc']:.3f} asr {base['asr']:.3f} λ {base['lambda_max']:.2f} "
              f"(train {t_train:.0f}s)", flush=True)
    for method in todo:
        if method == "none":
            continue
        model = copy.deepcopy(model0)
        model, rep = purify(model, sp.val, method=method, steps=args.steps, batch_size=args.batch_size,
                            seed=seed, progress=False)
        t = rep.timings
        t_method = t.get("total", float("nan")) - t.get("eval", 0.0)
        m = measure(model, sp, atk, trig, args.lambda_batch, args.lambda_iters)
        doc["runs"].append({"attack": attack, "seed": seed, "method": method, **m, "time_s": t_method,
                            "trainable_params": rep.trainable_params, "steps_run": rep.steps_run,
                            "selected_step": rep.selected_step, "val_acc_before": rep.initial.get("val_acc"),
                            "val_acc_after": rep.final.get("val_acc"), "timings": t})
        print(f"[{clock():7.1f}s]   {method:12s} acc {m['acc']:.3f} asr {m['asr']:.3f} "
              f"ra {m['ra']:.3f} λ {m['lambda_max']:.2f} time {t_method:.1f}s "
              f"params {rep.trainable_params}", flush=True)
        doc["load_end"] = _load()
        doc["elapsed_s"] = elapsed0 + clock()
        _save(doc, out_json, out_md)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)

    from fip_fast.cli import DEMO_DEFAULTS
    from fip_fast.evaluation.models import demo_cnn
    from fip_fast.pipeline import purify

    if args.train_epochs is None:
        args.train_epochs = DEMO_DEFAULTS["epochs"]
    out_json, out_md = Path(args.out_json), Path(args.out_md)
    cmd = ("python bench/baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    m0 = demo_cnn(width=DEMO_DEFAULTS["width"], hidden=DEMO_DEFAULTS["hidden"])
    config = {"steps": args.steps, "batch_size": args.batch_size, "train_epochs": args.train_epochs,
              "lambda_batch": args.lambda_batch, "lambda_iters": args.lambda_iters, "arch": arch_fingerprint(m0),
              "torch_threads": args.threads, "model_params": sum(p.numel() for p in m0.parameters()),
              "n_clean": None}
    doc = _open_doc(out_json, config, cmd, args.fresh)
    if doc is None:
        return 2
    doc["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    _merge_config(doc["config"], args)
    done = {(r["attack"], r["seed"], r["method"]) for r in doc["runs"]}
    elapsed0 = float(doc.get("elapsed_s") or 0.0)
    t_start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t_start

    for seed in args.seeds:
        for attack in args.attacks:
            todo = [m for m in ["none"] + list(args.methods) if (attack, seed, m) not in done]
            if not todo:
                continue
            _run_cell(doc, args, attack, seed, todo, purify, clock, elapsed0)
            doc["load_end"] = _load()
            doc["elapsed_s"] = elapsed0 + clock()
            _save(doc, out_json, out_md)
    doc["elapsed_s"] = elapsed0 + clock()
    _save(doc, out_json, out_md)
    print(f"done in {clock():.0f}s → {out_json}, {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
