"""fip_fast — Fisher-Information-guided Purification (FIP) and Fast FIP for PyTorch.

Public names (imported lazily, so ``import fip_fast`` stays light):

* :class:`FIP` — the optimizer (``fip_fast.optim``)
* :func:`estimate_fisher` — diagonal empirical Fisher (``fip_fast.fisher``)
* :func:`purify` — the purification pipeline (``fip_fast.pipeline.purify``)
* :mod:`spectral` — Fast FIP's spectral reparameterization (``reparameterize``, ``merge``)
* :mod:`recipes` — the settings that purify (:data:`fip_fast.recipes.PURIFY`: FIP in a plain loop, the base of
  the pipeline's FIP defaults)
* :mod:`reference` — the readable specification every fast path is tested against
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__version__ = "0.1.0"
__all__ = ["FIP", "estimate_fisher", "purify", "pipeline", "spectral", "recipes", "reference", "ops",
           "__version__"]

_LAZY = {
    "FIP": ("fip_fast.optim", "FIP"),
    "estimate_fisher": ("fip_fast.fisher", "estimate_fisher"),
    "purify": ("fip_fast.pipeline", "purify"),
    "pipeline": ("fip_fast.pipeline", None),
    "spectral": ("fip_fast.spectral", None),
    "recipes": ("fip_fast.recipes", None),
    "reference": ("fip_fast.reference", None),
    "ops": ("fip_fast.ops", None),
}


class _MovedModule(types.ModuleType):
    """``fip_fast.purify`` as a *module* path (``from fip_fast.purify import register_method``) until 0.2: the module
    was renamed ``fip_fast.pipeline`` so that the package attribute ``fip_fast.purify`` is always the function (an
    attribute and a submodule of one name replace each other on import).  Forwards with a DeprecationWarning."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn("the module path fip_fast.purify is deprecated: import from fip_fast.pipeline (the function "
                      "stays fip_fast.purify)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("fip_fast.pipeline"), name)


# Registered before anything can import a submodule of that name, so `import fip_fast.purify` finds the alias and
# never rebinds the package attribute (the function) to a module.
sys.modules.setdefault(f"{__name__}.purify", _MovedModule(f"{__name__}.purify"))

#: Module paths of fip_fast 0.1 that moved into the layered packages; importing an old path gives the new module
#: (the same object) with a DeprecationWarning, until 0.2.
MOVED_MODULES = {
    "attacks": "fip_fast.evaluation.attacks",
    "data": "fip_fast.evaluation.data",
    "models": "fip_fast.evaluation.models",
    "train": "fip_fast.evaluation.train",
    "metrics": "fip_fast.evaluation.metrics",
    "smoothness": "fip_fast.evaluation.smoothness",
    "hf": "fip_fast.integrations.hf",
    "distributed": "fip_fast.integrations.distributed",
    "_foreach": "fip_fast.backends.foreach",
    "_cuda": "fip_fast.backends.cuda",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``fip_fast.<old>`` (see :data:`MOVED_MODULES`) to the module's new home."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head == __name__ and tail in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; the old path works until fip_fast 0.2", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'fip_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
