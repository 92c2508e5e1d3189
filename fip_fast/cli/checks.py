"""Everything ``fip-fast`` judges before any work: flag values, the output locations, the optional extras — and
the rule that a purified result must not be used (:func:`divergence`).

A usage error is a :class:`CLIError`: one line ``fip-fast: error: …``, exit status :data:`EXIT_USAGE`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

#: Exit statuses: a usage error found before any work (bad flag or flag combination, unsafe output, unusable
#: input, missing extra); no purified model was written after the work (diverged, clean accuracy fell more than
#: the accepted drop, or the outputs could not be written — the previous outputs are intact).
EXIT_USAGE = 2
EXIT_NOT_SAVED = 3
EXIT_DIVERGED = EXIT_NOT_SAVED

#: Every file name the tool writes into --out; with --overwrite only these are ever replaced.
OUTPUT_NAMES = ("report.md", "report.json", "asr_acc.png", "lambda_max.png", "purified.safetensors")


class CLIError(Exception):
    """A user error: printed as ``fip-fast: error: …`` with exit status 2."""


def need(ok: bool, message: str) -> None:
    if not ok:
        raise CLIError(message)


# ------------------------------------------------------------------------------------------ optional extras
def missing_modules(modules: Sequence[str]) -> List[str]:
    """The names in ``modules`` that cannot be imported (found without importing them)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def extra_hint(extra: str = "demo") -> str:
    return f'install them with: pip install "fip_fast[{extra}]"'


def require_extra(what: str, modules: Sequence[str], extra: str = "demo") -> None:
    """Refuse, before any work, a command whose optional dependencies (``fip_fast[extra]``) are missing."""
    missing = missing_modules(modules)
    if missing:
        raise CLIError(f"{what} needs the optional dependencies of fip_fast[{extra}] (missing: {', '.join(missing)}); "
                       f"{extra_hint(extra)}")


# ------------------------------------------------------------------------------------------ flag values
def device(name: str):
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


def parse_set(items: Optional[Sequence[str]]) -> Dict[str, Any]:
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


def demo_methods(args: argparse.Namespace) -> List[str]:
    """``--methods`` as a list."""
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def check_common_flags(args: argparse.Namespace) -> None:
    """Flags both commands share, judged before any file is read or any step is run (a bad value used to
    surface only after the whole run, or never: a negative --val-fraction silently disabled validation)."""
    # --steps 0 would write a copy of the input model as "purified"
    for flag, low in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("threads", 0), ("lambda_iters", 0),
                      ("lambda_batch", 1)):
        v = getattr(args, flag)
        need(v is None or v >= low, f"--{flag.replace('_', '-')} must be ≥ {low}, got {v}")
    device(args.device)
    need(getattr(args, "augment", None) is None or "augment" not in parse_set(args.set),
         "--augment and --set augment=… were both given; use one")
    parse_set(args.set)


def check_purify_flags(args: argparse.Namespace) -> None:
    """``fip-fast purify``: every flag value and combination that can be judged without reading a file."""
    from fip_fast.pipeline import available_methods

    check_common_flags(args)
    need(args.method in available_methods(),
         f"--method: unknown method {args.method!r}; available: {available_methods()}")
    need(args.val_fraction is None or 0 <= args.val_fraction < 1,
         f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    need(args.lr is None or (math.isfinite(args.lr) and args.lr > 0), f"--lr must be a positive number, got {args.lr}")
    need(args.num_classes >= 2, f"--num-classes must be ≥ 2, got {args.num_classes}")
    need(args.in_channels >= 0, f"--in-channels must be ≥ 0 (0: from the clean data), got {args.in_channels}")
    need(args.checkpoint_every >= 1, f"--checkpoint-every must be ≥ 1, got {args.checkpoint_every}")
    need(not args.resume or bool(args.checkpoint_dir), "--resume needs --checkpoint-dir (where the checkpoints are)")
    check_resume(args)
    need(not args.triggered or args.target is not None,
         "--triggered needs --target (the attack's target class) to compute ASR")
    need(args.target is None or 0 <= args.target < args.num_classes,
         f"--target must be a class index in 0..{args.num_classes - 1}, got {args.target}")
    check_method_options(args)


def check_resume(args: argparse.Namespace) -> None:
    """``--resume``: --checkpoint-dir must hold a checkpoint of --method (an empty folder, or one with another
    method's checkpoints, used to start a new run from scratch without a word)."""
    import re

    if not args.resume:
        return
    cd = Path(args.checkpoint_dir)
    found = {}
    if cd.is_dir():
        for p in cd.iterdir():
            m = re.match(r"^purify-(.+)-(\d+)\.pt$", p.name)
            if m:
                found.setdefault(m.group(1), []).append(p.name)
    method = args.method.lower()
    if method in found:
        return
    if not found:
        raise CLIError(f"--resume: --checkpoint-dir {cd} holds no purification checkpoint (purify-{method}-*.pt); "
                       "drop --resume to start a new run")
    raise CLIError(f"--resume: --checkpoint-dir {cd} holds checkpoints of --method {', '.join(sorted(found))}, not "
                   f"of --method {method}; resume with that method, or drop --resume")


def check_method_options(args: argparse.Namespace) -> None:
    """--method with --set, --steps, --batch-size, --lr, --augment: every name and combination the method itself
    would refuse (:func:`fip_fast.pipeline.run.check_options`, a dry run on a tiny probe model) is refused here,
    before any file is read — e.g. ``--set trace_estimator=lagged`` with Fast FIP's default SGD δ-optimizer."""
    from fip_fast.pipeline.run import check_options

    sets = parse_set(args.set)
    # a flag's option given with --set instead (--set augment=none): one value, not two (both: refused earlier)
    kw = {k: getattr(args, k) if getattr(args, k) is not None else sets.pop(k, None)
          for k in ("steps", "batch_size", "lr", "augment", "val_fraction")}
    try:
        check_options(args.method, **kw, **sets)
    except (ValueError, TypeError) as e:
        flags = "--set" if args.set else "the options"
        raise CLIError(f"--method {args.method} with {flags}: {' '.join(str(e).split())}") from e


def check_demo_flags(args: argparse.Namespace, controls: Sequence[str]) -> None:
    """``fip-fast demo``: every flag value that can be judged before the data are loaded; ``controls`` are the
    demo's own method names (beside the registered ones)."""
    from fip_fast.pipeline import available_methods

    check_common_flags(args)
    methods = demo_methods(args)
    need(bool(methods), "--methods: give at least one method")
    for m in methods:
        need(m in controls or m in available_methods(),
             f"--methods: unknown method {m!r}; choose from {list(controls)} or {available_methods()}")
    need(0 <= args.test_fraction < 1, f"--test-fraction must lie in [0, 1), got {args.test_fraction}")
    need(0 < args.val_fraction < 1, f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    need(args.poison_rate is None or 0 <= args.poison_rate <= 1,
         f"--poison-rate must lie in [0, 1], got {args.poison_rate}")
    for flag, low in (("epochs", 0), ("width", 1), ("hidden", 1), ("subsample", 0)):
        need(getattr(args, flag) >= low, f"--{flag} must be ≥ {low}, got {getattr(args, flag)}")
    need(0 <= args.target < 10, f"--target must be a digit class 0..9, got {args.target}")
    need(math.isfinite(args.train_lr) and args.train_lr > 0, f"--train-lr must be positive, got {args.train_lr}")


# ------------------------------------------------------------------------------------------ output safety
def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output location that cannot be written (a read-only folder, a path under a
    regular file): the run would otherwise end in a crash after all the work was done."""
    anc = Path(os.path.abspath(path))
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise CLIError(f"{flag} {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: {anc} is not writable")


def out_folder(args: argparse.Namespace) -> Path:
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


def check_out(out: Path, overwrite: bool, inputs: Sequence[Optional[Path]], flag: str = "--out") -> None:
    """The report folder may never cost a user's file: an existing non-empty folder is refused unless
    ``--overwrite`` (which then replaces only :data:`OUTPUT_NAMES`, file by file; the folder itself and every
    other file in it are kept), and no output name may be an input (a checkpoint or data file called
    ``report.json``, or an image-folder input that contains --out)."""
    from fip_fast.io import LOCK_NAME, OverwriteInputError, check_not_input

    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out} exists and is not a folder")
    # The lock file alone does not count: a run that is writing into --out is refused when it takes the lock.
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise CLIError(f"{flag} {out} exists and is not empty; choose a new folder, or pass --overwrite to replace "
                       f"only fip-fast's own outputs in it ({', '.join(OUTPUT_NAMES)}; nothing else is touched)")
    check_writable(out, flag)
    for name in OUTPUT_NAMES:
        try:
            check_not_input(out / name, *inputs)
        except OverwriteInputError as e:
            raise CLIError(f"{flag}: {e}") from e


def lock_out(out: Path, flag: str = "--out"):
    """The lock of the report folder (:class:`fip_fast.io.FolderLock`), taken: a second run into the same folder
    fails at once with exit status 2 instead of silently replacing the first one's results."""
    from fip_fast.io import FolderBusyError, FolderLock

    try:
        return FolderLock(out).acquire()
    except FolderBusyError as e:
        raise CLIError(f"{flag}: {e}") from e


#: ``--save`` suffixes and the format each writes: safetensors, or a weights-only torch state dict.
SAVE_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}


def check_save(save: Path, overwrite: bool, inputs: Sequence[Optional[Path]], out: Optional[Path] = None) -> None:
    """``--save``: a known suffix (:data:`SAVE_FORMATS`: the file holds the format its name says), never an
    input (symlinks and hard links included), never one of the report's own files in ``out`` (found here, not
    after the work), never a folder, and an existing file only with ``--overwrite``."""
    from fip_fast.io import LOCK_NAME, OverwriteInputError, check_not_input

    try:
        check_not_input(save, *inputs)
    except OverwriteInputError as e:
        raise CLIError(f"--save: {e}") from e
    if save.is_dir():
        raise CLIError(f"--save {save} is a folder; give a file name such as {save / 'purified.safetensors'}")
    if out is not None:
        report_files = [out / n for n in OUTPUT_NAMES if n != "purified.safetensors"] + [out / LOCK_NAME]
        if any(os.path.abspath(save) == os.path.abspath(f) for f in report_files):
            raise CLIError(f"--save {save} is one of the report's own files in --out {out}; choose another name "
                           f"(the report writes {', '.join(n for n in OUTPUT_NAMES if n != 'purified.safetensors')})")
    if save.suffix.lower() not in SAVE_FORMATS:
        raise CLIError(f"--save {save}: unknown format {save.suffix or '(no suffix)'!r}; name the file "
                       f"{'/'.join(SAVE_FORMATS)} (safetensors, or a weights-only torch state dict)")
    if save.exists() and not overwrite:
        raise CLIError(f"--save {save} exists; pass --overwrite to replace it, or choose another name")
    check_writable(save.parent, "--save")


def check_checkpoint_dir(path: Optional[str]) -> None:
    """``--checkpoint-dir``: a folder (or a path where one can be created) that can be written."""
    if path:
        cd = Path(path)
        if cd.exists() and not cd.is_dir():
            raise CLIError(f"--checkpoint-dir {cd} exists and is not a folder")
        check_writable(cd, "--checkpoint-dir")


# ------------------------------------------------------------------------------------------ the result
def accuracy_refusal(report, accept_drop: bool) -> Optional[str]:
    """Why the result is not saved for its clean accuracy (None when it may be): the accuracy measured on the
    defender's own clean data (:class:`fip_fast.pipeline.report.AccuracyCheck`) fell by more than the accepted
    drop and ``--accept-accuracy-drop`` was not given."""
    acc = getattr(report, "accuracy", None)
    if acc is None or not acc.exceeded or accept_drop:
        return None
    return f"{acc.describe()}; pass --accept-accuracy-drop to save it anyway"


def divergence(model, report) -> Optional[str]:
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
