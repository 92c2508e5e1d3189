"""The state-dict hooks: the saved weight is the current W(δ); a load re-derives W0 or the weight from what the
state dict carries."""
from __future__ import annotations

import torch

from fip_fast.spectral._state import (
    _STATE,
    _core,
    _gathered,
    _has_mix,
    _local,
    _snapshot,
    _Spectral,
    _spectrum,
    _write_matrix,
)

#: the entries of a reparameterized layer in a state dict (``spectral_mix`` with :func:`add_mixing`)
_ENTRIES = ("weight", "spectral_delta", "spectral_mix", "spectral_U", "spectral_S", "spectral_Vh", "spectral_W0")


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Before ``load_state_dict`` fills the layer: note which of its entries the state dict carries."""
    sp = module.__dict__.get(_STATE)
    if sp is not None and sp.owner is module:
        sp.load_prefix = prefix
        sp.loaded = frozenset(n for n in _ENTRIES if prefix + n in state_dict)


@torch.no_grad()
def _load_hook(module, incompatible_keys):
    """After ``load_state_dict``, from what was loaded (:func:`_load_pre_hook`):

    * W0 loaded (saved since W0 became persistent): it is exact; the weight is re-derived from it and the loaded
      δ at the next forward (bit for bit what was saved, with no rounding of a rounded weight — bf16 resumes do
      not drift);
    * the weight loaded without W0 (a state dict from before): W0 = W − U·diag(relu(s) − S)·Vh (− U·O·Vh), the
      weight kept as loaded;
    * neither (δ alone with ``strict=False``, the PEFT habit): W0 is kept and the weight re-derived from it.

    A state dict without ``spectral_W0`` still loads with ``strict=True``."""
    sp = module.__dict__.get(_STATE)
    if sp is None or sp.owner is not module:
        return
    key = sp.load_prefix + "spectral_W0"
    if key in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove(key)
    loaded, sp.loaded = sp.loaded, frozenset()
    if sp.shard is not None:
        if "weight" in loaded:
            _rederive_w0_shard(sp)
        return
    if "spectral_W0" in loaded or "weight" not in loaded:
        sp.seen = None
        return
    o = sp.owner
    W = sp.adapter.to_matrix(o.weight)
    acc = torch.promote_types(W.dtype, torch.float32)
    if _has_mix(o):
        W0 = W.to(acc) - o.spectral_U.to(acc) @ _core(o, acc) @ o.spectral_Vh.to(acc)
    else:
        ds = torch.relu(sp.spectrum()) - o.spectral_S
        W0 = W.to(acc) - (o.spectral_U.to(acc) * ds.to(acc)) @ o.spectral_Vh.to(acc)
    _write_matrix(sp, o.spectral_W0, W0)
    _snapshot([sp])


def _rederive_w0_shard(sp: _Spectral) -> None:
    """FSDP2: this rank's part of W0, from its part of the loaded W."""
    o = sp.owner
    u, vh = sp.local_factors()
    W = sp.adapter.to_matrix(_local(o.weight))
    acc = torch.promote_types(W.dtype, torch.float32)
    if _has_mix(o):
        dW = (u.to(acc) @ _core(o, acc)) @ vh.to(acc)
    else:
        ds = torch.relu(_spectrum(o.spectral_S, _gathered(sp.delta), sp.relative)) - o.spectral_S
        dW = (u.to(acc) * ds.to(acc)) @ vh.to(acc)
    _write_matrix(sp, o.spectral_W0, W.to(acc) - dW)


def _state_dict_hook(module, prefix, keep_vars):
    """Before ``state_dict``: the saved weight is the current W(δ)."""
    sp = module.__dict__.get(_STATE)
    if sp is not None:
        sp.group.sync()
