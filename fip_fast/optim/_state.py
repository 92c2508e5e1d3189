"""The per-parameter state of :class:`fip_fast.FIP`: created at a parameter's first step (``step``,
``momentum_buffer``, ``fisher``; ``pert`` with ``"lagged"``), at construction where F0 is given (``anchor`` θ0 and
``fisher0``), and brought to its devices and dtypes after a state dict is loaded.  Every tensor but ``anchor``
(the parameter's dtype) is fp32, whatever the parameter's dtype."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fip_fast.optim import _hyper

if TYPE_CHECKING:
    from fip_fast.optim import FIP

_FP32_KEYS = ("momentum_buffer", "fisher", "pert", "fisher0", "step")


def lazy_state(opt: "FIP", p: Tensor, group: dict) -> dict:
    """``opt.state[p]``, with what a step of ``group`` needs created (zeros) where missing; creating any
    invalidates the step plans (they hold the state tensors)."""
    st = opt.state[p]
    if "step" not in st or (group["trace_estimator"] == "lagged" and "pert" not in st):
        opt.invalidate_plans()
    if "step" not in st:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        st["fisher"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    if group["trace_estimator"] == "lagged" and "pert" not in st:
        st["pert"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    return st


@torch.no_grad()
def init_anchor(opt: "FIP", fisher0: dict[Tensor, Tensor]) -> None:
    """``anchor`` (θ0: a copy of the parameter now) and ``fisher0`` (F0 in fp32) for each entry of ``fisher0``
    (parameter → F0, checked first)."""
    known = opt._param_ids()
    for p, f0 in fisher0.items():
        _hyper.fisher0_entry(p, f0, known)
        st = opt.state[p]
        st["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
        st["fisher0"] = f0.detach().to(device=p.device, dtype=torch.float32).clone()
    opt.invalidate_plans()


def place_loaded(opt: "FIP") -> bool:
    """After torch's ``load_state_dict``: every state tensor on its parameter's device, fp32 (``anchor``: the
    parameter's dtype), and each lagged group's schedule counters 0-dim fp32 on its first parameter's device.
    Returns whether a group holds lagged counters (its stored perturbation is then pending again)."""
    for p, st in opt.state.items():
        for k in _FP32_KEYS:
            if k in st:
                st[k] = st[k].to(device=p.device, dtype=torch.float32)
        if "anchor" in st:
            st["anchor"] = st["anchor"].to(device=p.device, dtype=p.dtype)
    lagged = False
    for group in opt.param_groups:
        if "lagged_calls" in group and group["params"]:
            dev = group["params"][0].device
            for k in ("lagged_calls", "lagged_pert_on"):
                group[k] = torch.as_tensor(group[k], dtype=torch.float32).to(dev).reshape(())
            lagged = True
    return lagged
