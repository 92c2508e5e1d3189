"""Saving state dicts as safetensors, atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from torch import Tensor, nn

from fip_fast.io._atomic import atomic_path
from fip_fast.io._errors import PathLike


def _plain_tensors(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """CPU, contiguous, storage-disjoint copies — safetensors refuses tensors that share memory (tied weights)."""
    out: Dict[str, Tensor] = {}
    seen = set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if (t.numel() and key in seen) or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # shared or a view into a larger storage
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[k] = t
    return out


def save_state_dict(sd: Mapping[str, Tensor], path: PathLike, *, metadata: Optional[Dict[str, str]] = None,
                    protect: Optional[List[PathLike]] = None) -> Path:
    """Save a ``{name: Tensor}`` dict as safetensors, atomically; ``metadata`` values must be strings."""
    from safetensors.torch import save_file

    tensors = _plain_tensors(sd)
    with atomic_path(path, protect=protect) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def save_model(model: Union[nn.Module, Mapping[str, Tensor]], path: PathLike, *,
               metadata: Optional[Dict[str, str]] = None, protect: Optional[List[PathLike]] = None) -> Path:
    """Save a model's state dict (parameters and buffers) as safetensors, atomically.

    Args:
        protect: input paths (e.g. the checkpoint that was purified) that must not be overwritten.
    """
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return save_state_dict(sd, path, metadata=metadata, protect=protect)
