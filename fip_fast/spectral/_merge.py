"""Merge: drop the hooks, buffers and δ of the reparameterized layers (their weights already hold W(δ))."""
from __future__ import annotations

import torch
from torch import nn

from fip_fast.spectral._state import _STATE, _groups, _has_mix
from fip_fast.spectral._state_dict import _load_hook, _load_pre_hook, _state_dict_hook
from fip_fast.spectral._taps import _pre_hook, _tap_hook

_HOOKS = (_pre_hook, _tap_hook, _load_pre_hook, _load_hook, _state_dict_hook)


def _remove_hooks(module: nn.Module) -> None:
    """Remove this module's hooks of :func:`reparameterize` (found by function: a deep copy has its own)."""
    for d in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_pre_hooks,
              module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks):
        for k in [k for k, h in d.items() if getattr(h, "hook", h) in _HOOKS]:
            del d[k]
            module._forward_hooks_with_kwargs.pop(k, None)
            module._forward_hooks_always_called.pop(k, None)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Drop hooks, buffers and δ (the weights already hold W(δ)) and restore the ``requires_grad`` flags that
    :func:`reparameterize` changed.  ``model``: the model passed to :func:`reparameterize`, one containing it
    (``merge(model)`` after ``reparameterize(model.body)``) or a deep copy of either.  Returns ``model``, an
    ordinary model of its original architecture.

    Raises:
        ValueError: ``model`` holds only part of the layers of one :func:`reparameterize` call."""
    mods = {id(m) for m in model.modules()}
    groups = _groups(model)
    for group in groups:
        outside = [type(u).__name__ for sp in group.items for u in sp.users if id(u) not in mods]
        if outside:
            raise ValueError(f"merge: {len(outside)} layer(s) ({', '.join(sorted(set(outside)))}) reparameterized "
                             "in the same call are outside the model given; merge the model passed to "
                             "reparameterize or one containing it")
    for group in groups:
        group.sync()
        for h in group.handles:
            h.remove()
        for sp in group.items:
            for u in sp.users:
                _remove_hooks(u)
                u.__dict__.pop(_STATE, None)
            o = sp.owner
            _remove_hooks(o)
            o.weight.requires_grad_(o.spectral_weight_requires_grad)
            for name in ("spectral_U", "spectral_S", "spectral_Vh", "spectral_W0"):
                delattr(o, name)
            del o.spectral_delta
            del o.spectral_weight_requires_grad, o.spectral_relative
            if _has_mix(o):
                del o.spectral_mix
                delattr(o, "spectral_mix_mask")
        for p, flag in group.frozen:
            p.requires_grad_(flag)
    return model
