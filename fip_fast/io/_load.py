"""Safe loading: ``safetensors`` or ``torch.load(weights_only=True)`` only — anything that would need full
(code-executing) unpickling is refused with :class:`UnsafeCheckpointError` — and the checks that a state dict holds
usable weights (:func:`validate_state_dict`)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from fip_fast.io._errors import CheckpointError, PathLike, UnsafeCheckpointError

_UNSAFE_HINT = (
    "fip_fast loads only safetensors files or weights-only torch checkpoints (plain dicts of tensors, numbers, "
    "strings, lists), because unpickling anything else can execute arbitrary code. If you trust this file, "
    "convert it once in your own environment:\n"
    "    obj = torch.load(path, weights_only=False)\n"
    "    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj\n"
    "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors')"
)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # Content sniffing: 8-byte little-endian header length, then a JSON object.
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)
    except OSError:
        return False


def _read_safetensors(p: Path, map_location: Union[str, torch.device]) -> Dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device=str(map_location))
    except Exception as e:  # SafetensorError (header too large, truncated…), OSError
        raise CheckpointError(f"{p}: not a readable safetensors file (corrupt, truncated, or another format "
                              f"renamed .safetensors): {type(e).__name__}: {e}") from e


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely: ``.safetensors`` or ``torch.load(weights_only=True)``.

    Returns whatever the file holds as a dict (for a safetensors file: ``{name: Tensor}``).  A checkpoint that
    wraps the weights (``{"state_dict": …}`` / ``{"model": …}``) is returned as is — see :func:`load_weights`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is a folder, empty, truncated or not a checkpoint at all.
        UnsafeCheckpointError: the file needs full unpickling (e.g. a pickled ``nn.Module``).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder, not a checkpoint file")
    if p.exists() and not p.is_file():
        raise CheckpointError(f"{p} is not a regular file (a FIFO, a device such as /dev/zero…); give a "
                              ".safetensors or .pt file")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty (0 bytes)")
    if _is_safetensors(p):
        return _read_safetensors(p, map_location)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        said = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip().splitlines()
        raise UnsafeCheckpointError(f"{p} is not a weights-only checkpoint and was not loaded.\n{_UNSAFE_HINT}\n"
                                    f"(torch said: {said[0] if said else type(e).__name__})") from e
    except RuntimeError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeCheckpointError(f"{p} is not a weights-only checkpoint and was not loaded.\n"
                                        f"{_UNSAFE_HINT}") from e
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt, truncated, or not a torch/safetensors "
                              f"file): {e}") from e
    except Exception as e:  # the weights-only unpickler raises IndexError, EOFError… on truncated files
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt, truncated, or not a torch/safetensors "
                              f"file): {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise UnsafeCheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict.\n{_UNSAFE_HINT}")
    return dict(obj)


def _unwrap(sd: Mapping[Any, Any]) -> Dict[str, Any]:
    for key in ("state_dict", "model_state_dict", "model"):
        if key in sd and isinstance(sd[key], Mapping):
            return _unwrap(sd[key])
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every key with "module.".
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def read_weights(path: PathLike) -> Dict[str, Tensor]:
    """The weight tensors of the checkpoint at ``path`` (unwrapped, see :func:`load_weights`), on the CPU.

    Protects the caller from files that only look like state dicts: keys must be strings and there must be at
    least one tensor (non-tensor entries such as an ``epoch`` counter are dropped).

    Raises:
        CheckpointError / UnsafeCheckpointError / FileNotFoundError: see :func:`load_state_dict`.
    """
    sd = _unwrap(load_state_dict(path, map_location="cpu"))
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: state dict keys must be strings (parameter names), found "
                              f"{type(bad[0]).__name__} key(s) such as {bad[0]!r}")
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {sorted(sd)[:8]})")
    return tensors


def _running_var_names(model: nn.Module) -> List[str]:
    from torch.nn.modules.batchnorm import _NormBase

    return [f"{n}.running_var" if n else "running_var" for n, m in model.named_modules()
            if isinstance(m, _NormBase) and getattr(m, "running_var", None) is not None]


def validate_state_dict(sd: Mapping[str, Tensor], model: Optional[nn.Module] = None,
                        source: Optional[PathLike] = None) -> None:
    """Refuse tensors that would load silently but poison the run, naming the file and the entry.

    An untrusted checkpoint may hold NaN / Inf values, integer tensors where the model has float parameters
    (``load_state_dict`` would cast them without a word) or negative BatchNorm ``running_var`` entries (the
    normalization then takes the square root of a negative number); each surfaces much later as an obscure
    Fisher or SVD error.  With ``model`` the dtypes are compared entry by entry; shapes and missing keys are
    left to ``model.load_state_dict``.

    Raises:
        CheckpointError: the first problem found.
    """
    where = f"{source}: " if source is not None else ""
    expected = model.state_dict() if model is not None else {}
    for k, v in sd.items():
        ref = expected.get(k)
        if ref is not None and ref.is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"{where}entry {k!r} is {v.dtype} but the model's is {ref.dtype} (quantized or "
                                  "corrupt weights are not supported; store floating-point weights)")
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{where}entry {k!r} holds {n} non-finite value(s) (NaN or Inf)")
    rv = _running_var_names(model) if model is not None else [k for k in sd if k.endswith("running_var")]
    for k in rv:
        v = sd.get(k)
        if v is not None and v.numel() and bool((v < 0).any()):
            raise CheckpointError(f"{where}BatchNorm entry {k!r} has negative running variance(s) "
                                  f"(min {float(v.min()):.3g}); a variance is never negative")


def load_weights(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` safely into ``model`` (in place) and return it.

    Accepts a bare state dict or one wrapped under ``state_dict`` / ``model_state_dict`` / ``model``, with or
    without a ``module.`` prefix.  The tensors are checked by :func:`validate_state_dict` first.

    Raises:
        CheckpointError: unreadable file or invalid tensors.  RuntimeError: the weights do not fit ``model``.
    """
    tensors = read_weights(path)
    validate_state_dict(tensors, model, path)
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f"the weights in {path} do not fit this model architecture: {e}") from e
    return model
