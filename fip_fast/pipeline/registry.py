"""The one place where purification methods are registered: built-ins, baselines and plug-ins.

The built-in methods (``fip``, ``fast_fip``) and the baselines (``ft``, ``ft_sam``, ``ngf``, ``salience_ar``) are a
table of *lazy references* (:data:`_BUILTIN`: module, attribute, kind, description), resolved with
:mod:`importlib` on their first lookup.  So importing the pipeline imports no method module, and
:mod:`fip_fast.baselines` never has to import the pipeline to register itself (no import cycle).

Plug-ins register through an explicit :func:`register_method` call (also a decorator), or through an entry point
of the group ``"fip_fast.methods"``: each entry point loads a callable that is called with no arguments and
registers its methods (by calling :func:`register_method`).  Entry points are loaded once, lazily, on the first
lookup of a name that is not registered (and by :func:`available_methods`, which lists them).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional

logger = logging.getLogger("fip_fast")

__all__ = ["MethodSpec", "register_method", "get_method", "available_methods", "ENTRY_POINT_GROUP"]

#: The entry-point group of method plug-ins (each entry point: a callable that registers methods).
ENTRY_POINT_GROUP = "fip_fast.methods"


@dataclass
class MethodSpec:
    """A registered purification method (see :func:`fip_fast.pipeline.purify`, "Method registry")."""

    name: str
    fn: Callable[..., Any]
    kind: str = "runner"                    # "loop" | "runner"
    defaults: Dict[str, Any] = field(default_factory=dict)
    description: str = ""


class _LazyRef(NamedTuple):
    """Where a built-in method lives; ``defaults_attr``: a module attribute ``{name: defaults}``."""

    module: str
    attr: str
    kind: str
    description: str
    defaults_attr: Optional[str] = None


_BUILTIN: Dict[str, _LazyRef] = {
    "fip": _LazyRef("fip_fast.pipeline.methods", "build_fip", "loop",
                    "FIP: Fisher-trace suppressor + normalized Fisher anchor, all parameters", "DEFAULTS"),
    "fast_fip": _LazyRef("fip_fast.pipeline.methods", "build_fast_fip", "loop",
                         "Fast FIP: singular-value shifts δ (relative) + biases/BN affine", "DEFAULTS"),
    "ft": _LazyRef("fip_fast.baselines.ft", "run_ft", "runner",
                   "FT: plain fine-tuning of all parameters on the clean set (SGD + momentum), the control"),
    "ft_sam": _LazyRef("fip_fast.baselines.ft_sam", "run_ft_sam", "runner",
                       "FT-SAM: fine-tuning with sharpness-aware minimization (two-pass SAM step)"),
    "superft": _LazyRef("fip_fast.baselines.superft", "run_superft", "runner",
                        "Super-FT: fine-tuning with a large cyclic/cosine learning rate (the catapult)"),
    "fst": _LazyRef("fip_fast.baselines.fst", "run_fst", "runner",
                    "FST: Feature Shift Tuning — re-initialized head, penalized alignment with the original head"),
    "sau": _LazyRef("fip_fast.baselines.sau", "run_sau", "runner",
                    "SAU: Shared Adversarial Unlearning — PGD shared adversarial examples unlearned"),
    "ngf": _LazyRef("fip_fast.baselines.ngf", "run_ngf", "runner",
                    "NGF: natural-gradient (K-FAC) fine-tuning of the classifier + Fisher anchor"),
    "salience_ar": _LazyRef("fip_fast.baselines.salience_ar", "run_salience_ar", "runner",
                            "Salience-AR: benign-salience neuron ranking + adaptive magnitude-scaled regularizer"),
}

_METHODS: Dict[str, MethodSpec] = {}          # resolved / explicitly registered methods
_LAZY: Dict[str, _LazyRef] = dict(_BUILTIN)   # not resolved yet
_ENTRY_POINTS_LOADED = False


def register_method(name: str, fn: Optional[Callable[..., Any]] = None, *, kind: str = "runner",
                    defaults: Optional[Dict[str, Any]] = None, description: str = "", overwrite: bool = False):
    """Register a purification method under ``name`` (usable as ``@register_method(name, …)``).

    Args:
        name: the ``method=`` string (case-insensitive).
        fn: ``kind="loop"``: ``builder(model, ctx, **options) -> Purifier``; ``kind="runner"``:
            ``fn(model, clean, steps=…, *, batch_size, seed, device, loss_fn, progress, **options) -> (model, info)``.
        defaults: default options (``steps``, ``batch_size``, ``lr`` and method-specific ones); user keyword
            arguments to :func:`fip_fast.pipeline.purify` override them.
        overwrite: replace an existing registration (a built-in one included) instead of raising.
    """
    if kind not in ("loop", "runner"):
        raise ValueError(f"kind must be 'loop' or 'runner', got {kind!r}")

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name.lower()
        if overwrite:
            _LAZY.pop(key, None)
        else:
            existing = _METHODS.get(key) or _resolve_quietly(key)
            if existing is not None and existing.fn is not f:
                raise ValueError(f"a purification method named {name!r} is already registered "
                                 "(pass overwrite=True to replace it)")
        _METHODS[key] = MethodSpec(key, f, kind, dict(defaults or {}), description or (f.__doc__ or "").strip()
                                   .split("\n")[0])
        return f

    return deco(fn) if fn is not None else deco


def _resolve(key: str) -> MethodSpec:
    """Import a lazy built-in reference and register it; ValueError (chained) if its module fails to load."""
    ref = _LAZY[key]
    try:
        module = importlib.import_module(ref.module)
        fn = getattr(module, ref.attr)
        defaults = getattr(module, ref.defaults_attr)[key] if ref.defaults_attr else {}
    except Exception as e:  # a broken optional method must not break the others
        logger.warning("fip_fast.pipeline: loading method %r from %s failed (%s: %s); it is unavailable",
                       key, ref.module, type(e).__name__, e)
        raise ValueError(f"purification method {key!r} could not be loaded from {ref.module} "
                         f"({type(e).__name__}: {e})") from e
    del _LAZY[key]
    _METHODS[key] = MethodSpec(key, fn, ref.kind, dict(defaults), ref.description)
    return _METHODS[key]


def _resolve_quietly(key: str) -> Optional[MethodSpec]:
    if key not in _LAZY:
        return None
    try:
        return _resolve(key)
    except ValueError:        # unloadable: a new registration may take the name
        return None


def _load_entry_points() -> None:
    """Call every ``fip_fast.methods`` entry point once (each registers its methods)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    try:
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as e:  # pragma: no cover - broken metadata must not break the built-ins
        logger.warning("fip_fast.pipeline: reading the %s entry points failed (%s)", ENTRY_POINT_GROUP, e)
        return
    for ep in eps:
        try:
            ep.load()()
        except Exception as e:
            logger.warning("fip_fast.pipeline: the method plug-in %r (%s) failed to register (%s: %s)",
                           ep.name, ep.value, type(e).__name__, e)


def available_methods() -> List[str]:
    """Names accepted by ``purify(method=…)`` (built-ins, baselines, registered and entry-point plug-ins)."""
    _load_entry_points()
    return sorted(set(_METHODS) | set(_LAZY))


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name`` (case-insensitive); ValueError if no such method is registered."""
    key = name.lower()
    if key not in _METHODS and key not in _LAZY:
        _load_entry_points()
    if key in _METHODS:
        return _METHODS[key]
    if key in _LAZY:
        return _resolve(key)
    raise ValueError(f"unknown purification method {name!r}; available: {available_methods()}")
