"""What :class:`fip_fast.FIP` accepts: its hyper-parameters, its parameter groups, its ``fisher0`` and its state
dicts are checked here, before anything is registered, and a bad value raises ``ValueError`` (``TypeError`` for a
wrong container) naming it."""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Iterable

import torch
from torch import Tensor

from fip_fast import ops

TRACE_ESTIMATORS = ("fd", "lagged", "batch", "exact")
PRECONDITIONERS = (None, "fisher")
STATE_KEYS = ("step", "momentum_buffer", "fisher", "anchor", "fisher0", "pert")
HYPER_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "eta_F", "eta_r", "rho", "trace_every",
              "trace_estimator", "beta", "precondition", "damping", "max_mix", "calls")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _real(name: str, v: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
          tensor_ok: bool = False) -> None:
    """``v`` is a finite real number in the interval (a one-element floating tensor where ``tensor_ok``)."""
    if isinstance(v, Tensor) and tensor_ok:
        _check(v.numel() == 1 and v.is_floating_point(), f"{name} as a tensor must be one floating-point element, "
               f"got shape {tuple(v.shape)} {v.dtype}")
        v = float(v.detach().cpu())
    _check(isinstance(v, numbers.Real) and not isinstance(v, bool),
           f"{name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    _check(math.isfinite(v), f"{name} must be finite, got {v}")
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    lb, rb = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    _check(ok, f"{name} must be in {lb}{lo:g}, {hi:g}{rb}, got {v}")


def validate_hyperparameters(h: dict) -> None:
    """Raise ``ValueError`` naming the first bad hyper-parameter of the (merged) group ``h``."""
    _real("lr", h["lr"], 0.0, tensor_ok=True)
    _real("momentum", h["momentum"], 0.0, 1.0, hi_open=True)
    _check(isinstance(h["nesterov"], bool), f"nesterov must be a bool, got {h['nesterov']!r}")
    _check(not h["nesterov"] or h["momentum"] > 0, "nesterov needs momentum > 0")
    _real("weight_decay", h["weight_decay"], 0.0)
    _real("eta_F", h["eta_F"], 0.0)
    _real("eta_r", h["eta_r"], 0.0)
    _real("rho", h["rho"], 0.0, lo_open=True)
    te = h["trace_every"]
    _check(isinstance(te, int) and not isinstance(te, bool) and te >= 1,
           f"trace_every must be an int ≥ 1, got {te!r}")
    _check(h["trace_estimator"] in TRACE_ESTIMATORS,
           f"trace_estimator must be one of {TRACE_ESTIMATORS}, got {h['trace_estimator']!r}")
    _real("beta", h["beta"], 0.0, 1.0, hi_open=True)
    _check(h["precondition"] in PRECONDITIONERS,
           f"precondition must be one of {PRECONDITIONERS}, got {h['precondition']!r}")
    _real("damping", h["damping"], 0.0, lo_open=True)
    _real("max_mix", h["max_mix"], 0.0, lo_open=True)
    c = h.get("calls", 0)
    _check(isinstance(c, int) and not isinstance(c, bool) and c >= 0, f"calls must be an int ≥ 0, got {c!r}")


def check_impl(impl: str, params: Iterable[Tensor] = ()) -> None:
    """``impl`` names an implementation (:data:`fip_fast.ops.IMPLS` or ``"auto"``), and an explicit one other
    than ``"reference"`` can run on every device of ``params`` (checked at construction, not at the first
    step)."""
    _check(impl == "auto" or impl in ops.IMPLS, f"impl must be 'auto' or one of {ops.IMPLS}, got {impl!r}")
    if impl not in ("auto", "reference"):
        for dev in {p.device for p in params}:
            ops.resolve(impl, dev)


def param_group(param_group: dict, defaults: dict) -> dict:
    """A copy of ``param_group`` with its parameters as a list (a generator is consumed once), every parameter a
    real floating-point tensor and every hyper-parameter (its own or the default) valid."""
    if not isinstance(param_group, dict):
        raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    params = group.get("params", [])
    if isinstance(params, set):
        raise TypeError("param group params must be an ordered collection (a set has no stable order)")
    group["params"] = [params] if isinstance(params, Tensor) else list(params)
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"FIP can only optimize tensors, got {type(p).__name__}")
        if p.is_complex():
            raise ValueError("FIP does not support complex parameters (view them as real with "
                             "torch.view_as_real first)")
        if not p.is_floating_point():
            raise ValueError(f"FIP needs floating-point parameters, got {p.dtype}")
    validate_hyperparameters({**defaults, **group})
    return group


def fisher0_entry(p: Tensor, f0: Tensor, known: set) -> None:
    """One entry of ``FIP(fisher0=…)``: a parameter of the optimizer (``id`` in ``known``), an F0 of its shape,
    finite and ≥ 0."""
    if id(p) not in known:
        raise ValueError("fisher0 has an entry for a tensor that is not among the optimizer's parameters")
    if f0.shape != p.shape:
        raise ValueError(f"fisher0 entry of shape {tuple(f0.shape)} does not match its parameter's shape "
                         f"{tuple(p.shape)}")
    if not torch.isfinite(f0).all() or (f0 < 0).any():
        raise ValueError("fisher0 entries must be finite and ≥ 0")


def state_dict(sd: dict, param_groups: list) -> None:
    """``sd`` is a FIP state dict for ``param_groups``: as many groups, each with every hyper-parameter of
    :data:`HYPER_KEYS` valid and as many parameters; state only for listed parameters, of FIP's kinds
    (:data:`STATE_KEYS`), floating-point, of the parameter's shape (``step``: 0-dim)."""
    _check(isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list),
           "not an optimizer state dict: it needs 'state' (a dict) and 'param_groups' (a list)")
    saved_groups = sd["param_groups"]
    _check(len(saved_groups) == len(param_groups), f"the state dict has {len(saved_groups)} parameter "
           f"group(s), this optimizer has {len(param_groups)}")
    for i, (saved, mine) in enumerate(zip(saved_groups, param_groups)):
        missing = [k for k in HYPER_KEYS if k not in saved]
        _check(not missing, f"param group {i} of the state dict lacks {missing}: not a FIP state dict (saved "
               "by another optimizer?)")
        _check(len(saved["params"]) == len(mine["params"]), f"param group {i} of the state dict has "
               f"{len(saved['params'])} parameters, this optimizer's has {len(mine['params'])}")
        try:
            validate_hyperparameters(saved)
        except ValueError as e:
            raise ValueError(f"param group {i} of the state dict: {e}") from None
    index = dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                     itertools.chain.from_iterable(g["params"] for g in param_groups)))
    for k, st in sd["state"].items():
        _check(k in index, f"the state dict has state for parameter {k!r}, which no param group lists")
        _param_state(k, st, index[k])


def _param_state(k: Any, st: dict, p: Tensor) -> None:
    """The saved state ``st`` of parameter ``p`` (saved under the index ``k``)."""
    unknown = sorted(set(st) - set(STATE_KEYS))
    _check(not unknown, f"state of parameter {k}: unknown entries {unknown} (not a FIP state)")
    _check(("anchor" in st) == ("fisher0" in st), f"state of parameter {k}: anchor and fisher0 come together")
    for key, v in st.items():
        want = () if key == "step" else tuple(p.shape)
        _check(isinstance(v, Tensor) and v.is_floating_point(),
               f"state[{key!r}] of parameter {k} must be a floating-point tensor")
        _check(tuple(v.shape) == want, f"state[{key!r}] of parameter {k} has shape {tuple(v.shape)}, "
               f"its parameter needs {want}")
