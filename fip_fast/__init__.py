"""fip_fast — Fisher-Information-guided Purification (FIP) and Fast FIP for PyTorch.

Public names (imported lazily, so ``import fip_fast`` stays light):

* :class:`FIP` — the optimizer (``fip_fast.optim``)
* :func:`estimate_fisher` — diagonal empirical Fisher (``fip_fast.fisher``)
* :func:`purify` — the purification pipeline (``fip_fast.purify``)
* :mod:`spectral` — Fast FIP's spectral reparameterization (``reparameterize``, ``merge``)
* :mod:`reference` — the readable specification every fast path is tested against
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["FIP", "estimate_fisher", "purify", "spectral", "reference", "ops", "__version__"]

_LAZY = {
    "FIP": ("fip_fast.optim", "FIP"),
    "estimate_fisher": ("fip_fast.fisher", "estimate_fisher"),
    "purify": ("fip_fast.purify", "purify"),
    "spectral": ("fip_fast.spectral", None),
    "reference": ("fip_fast.reference", None),
    "ops": ("fip_fast.ops", None),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'fip_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
