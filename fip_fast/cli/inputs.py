"""``fip-fast purify``'s inputs, loaded and checked: the --clean / --test / --triggered data and the untrusted
--checkpoint in --arch.  Every failure is one line that names the flag (and the file) at fault."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from fip_fast.cli.checks import CLIError


@dataclass
class PurifyInputs:
    """The loaded inputs: the model (on its device), the clean data, the optional test and triggered data
    (reporting only), and the input paths (which no output may ever replace)."""

    model: Any
    clean: Tuple[Any, Any]
    test: Optional[Tuple[Any, Any]]
    triggered: Optional[Tuple[Any, Any]]
    paths: List[Path]


def load_data(path: str, what: str):
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


def check_fits(model, x, y, what: str, num_classes: int, like: Optional[Tuple[str, Any]] = None) -> None:
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


def _read_checkpoint(ck: Path):
    """The --checkpoint file's tensors (weights only: a pickled module is refused)."""
    from fip_fast.io import CheckpointError, UnsafeCheckpointError, read_weights

    if ck.is_dir():
        raise CLIError(f"--checkpoint {ck} is a folder, not a checkpoint file")
    if not ck.is_file():
        raise CLIError(f"--checkpoint: file not found: {ck}")
    try:
        return read_weights(ck)
    except (CheckpointError, UnsafeCheckpointError, OSError) as e:
        raise CLIError(f"--checkpoint: {e}") from e


def load_model(args: argparse.Namespace, ck: Path, x):
    """Build --arch and load the untrusted --checkpoint into it.  Each failure is one line that names the input
    at fault: the file (a folder, unreadable / truncated / empty, not weights-only, invalid tensors — see
    :func:`fip_fast.io.validate_state_dict` — or weights of another architecture) or the --clean data (images
    with another channel count than the checkpoint was trained on)."""
    from fip_fast.io import CheckpointError, validate_state_dict

    sd = _read_checkpoint(ck)
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


def purify_inputs(args: argparse.Namespace, dev) -> PurifyInputs:
    """Load and check every input of ``fip-fast purify``."""
    ck = Path(args.checkpoint)
    x, y = load_data(args.clean, "--clean")
    model = load_model(args, ck, x).to(dev)
    check_fits(model, x, y, "--clean", args.num_classes)
    test = trig = None
    if args.test:
        test = load_data(args.test, "--test")
        check_fits(model, *test, "--test", args.num_classes, like=("--clean", x))
    if args.triggered:
        trig = load_data(args.triggered, "--triggered")
        check_fits(model, *trig, "--triggered", args.num_classes, like=("--clean", x))
    paths = [Path(p) for p in (args.checkpoint, args.clean, args.test, args.triggered) if p]
    return PurifyInputs(model, (x, y), test, trig, paths)
