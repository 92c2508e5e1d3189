"""``fip-fast purify``'s inputs, loaded and checked: the --clean / --test / --triggered data and the untrusted
--checkpoint in --arch.  Every failure is one line that names the flag (and the file) at fault."""
from __future__ import annotations

import argparse
import os
import sys
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


def _load_flat_npz(p: Path):
    """``(x, y)`` of a ``.npz`` whose ``x`` is flat (N, D) feature vectors (a tabular model's input), or None
    when ``x`` is image-shaped (the image loader's business).  Features are used as they are (no [0, 1] rule:
    that rule is about images), but they must be finite numbers."""
    import numpy as np
    import torch

    from fip_fast.evaluation.data import DatasetError, _check_xy, _labels_to_tensor

    with np.load(p, allow_pickle=False) as z:
        if "x" not in z.files or "y" not in z.files or z["x"].ndim != 2:
            return None
        xa, ya = z["x"], z["y"]
    if not (np.issubdtype(xa.dtype, np.floating) or np.issubdtype(xa.dtype, np.integer)):
        raise DatasetError(f"{p}: features must be numbers, got dtype {xa.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(xa, dtype=np.float32))
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise DatasetError(f"{p}: the features contain NaN or Inf")
    y = _labels_to_tensor(ya, str(p))
    _check_xy(x, y)
    return x, y


def _read_data(p: Path):
    """Images (.npz or an image folder, :func:`fip_fast.evaluation.data.load_dataset`) or flat (N, D) .npz."""
    import zipfile

    from fip_fast.evaluation.data import load_dataset

    if p.suffix.lower() == ".npz" and p.is_file():
        if not zipfile.is_zipfile(p):     # np.load would try it as a pickle and say "contains pickled data"
            raise CLIError(f"not a valid .npz file (a .npz is a zip archive of .npy arrays, as np.savez writes "
                           f"it): {p}")
        flat = _load_flat_npz(p)
        if flat is not None:
            return flat
    return load_dataset(p)


def load_data(path: str, what: str):
    """Load --clean / --test / --triggered data; every failure names the flag and the file."""
    from fip_fast.evaluation.data import DatasetError

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what}: file or folder not found: {p}")
    if not (p.is_dir() or p.is_file()):
        raise CLIError(f"{what}: {p} is not a regular file (a FIFO, a device…); give a .npz file or a folder")
    try:
        x, y = _read_data(p)
    except CLIError as e:
        raise CLIError(f"{what}: {e}") from e
    except DatasetError as e:
        raise CLIError(f"{what}: {e}") from e
    except OSError as e:
        raise CLIError(f"{what}: cannot read {p}: {e}") from e
    if x.shape[0] == 0:
        raise CLIError(f"{what}: {p} holds no samples")
    return x, y


def check_clean_set(y, path: str) -> None:
    """Refuse a clean set that cannot purify: one sample, or a single class — clean accuracy then cannot tell a
    collapsed model from a good one (such a run used to write a model after a warning)."""
    import torch

    if y.shape[0] < 2:
        raise CLIError(f"--clean: {path} holds {y.shape[0]} sample; purification needs clean samples of at least "
                       "two classes")
    classes = torch.unique(y).tolist()
    if len(classes) < 2:
        raise CLIError(f"--clean: {path} holds a single class ({classes[0]}); purification needs clean samples of "
                       "at least two classes (a model that always answers one class would pass every check)")


def check_fits(model, x, y, what: str, num_classes: int, like: Optional[Tuple[str, Any]] = None) -> None:
    """The data must fit the model (and, for --test / --triggered, have the images' shape of ``like``, the
    --clean data): the message names the flag at fault and the shapes, instead of a deep error."""
    import torch

    if like is not None and tuple(x.shape[1:]) != tuple(like[1].shape[1:]):
        word, kind = ("images", "(channels, height, width)") if like[1].dim() == 4 else ("inputs", "(features,)")
        raise CLIError(f"{what}: {word} of shape {tuple(x.shape[1:])} but the {like[0]} {word} are "
                       f"{tuple(like[1].shape[1:])} {kind}")
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
    """``--arch``: a registry name, or ``module:factory`` imported from the current folder too — a console
    script's ``sys.path`` does not hold it (``--arch mymodels:make`` failed without ``PYTHONPATH=.``).  The
    folder is on the path for this import only."""
    from fip_fast.evaluation.models import build_model

    cwd, added = os.getcwd(), False
    if ":" in str(args.arch) and cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
        added = True
    try:
        return build_model(args.arch, num_classes=args.num_classes, in_channels=in_channels)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        raise CLIError(f"--arch {args.arch}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)


def _one_line(e: BaseException, limit: int = 400) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + " …"


def _read_checkpoint(ck: Path):
    """The --checkpoint file's tensors (weights only: a pickled module is refused)."""
    from fip_fast.io import CheckpointError, UnsafeCheckpointError, read_weights

    if ck.is_dir():
        raise CLIError(f"--checkpoint {ck} is a folder, not a checkpoint file")
    if ck.exists() and not ck.is_file():
        raise CLIError(f"--checkpoint {ck} is not a regular file (a FIFO, a device such as /dev/zero…); give a "
                       ".safetensors or .pt file")
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
        if not args.in_channels and x.dim() == 4:
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
    check_clean_set(y, args.clean)
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
