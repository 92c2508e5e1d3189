"""Step plans: what :class:`fip_fast.FIP` reuses from one ``step()`` to the next, so that the host cost of a
steady-state step does not grow with Python work per tensor.

A step needs, per parameter group and device, the parameters that have a gradient, their state tensors
(momentum, Fisher, F0, θ0, lagged perturbation, step count) and, in the fused backends, a pointer table of all of
them.  The plan of a group holds the first two; it stays valid until the optimizer's structure changes — a group
added, a parameter swapped in a group, a state dict loaded, state created, the group's estimator or anchor
switched (:attr:`FIP._epoch <fip_fast.optim.FIP>` counts those) —, the set of parameters with a gradient changes,
or a parameter or state tensor of the plan *moves*: the same tensor object with its elements somewhere else
(``p.data = p.data.clone()``, ``model.share_memory()``, ``model.half(); model.float()``, ``torch.utils.swap_tensors``,
``set_``, a ``resize_`` that reallocates).  The gradients themselves may move (new tensors every step with
``zero_grad(set_to_none=True)``): a step reads every gradient's ``data_ptr()`` once and hands the backends a
``cache_key`` made of the plan's uid and those pointers, under which their pointer tables were built
(``impl="cpu"``, ``"triton"``), so a step whose gradients sit where they sat before (on CUDA the caching allocator
makes that the common case) skips every per-tensor check; one whose gradients moved builds the tables again (a few
milliseconds for a few hundred tensors).

Why the plan's uid and the gradients' pointers determine every tensor of a call: a plan holds references to its
parameters and state tensors, and records where each one's elements start when it is made
(:func:`fip_fast.backends.host.addresses`).  Holding a tensor object does *not* pin its memory — ``.data``
reassignment and ``share_memory_()`` give the same object new memory and may free the old — so every step checks the
recorded addresses first (:meth:`GroupPlan.unmoved`: one C++ pass, 4–15 ns a tensor — three pointer hops, the state
tensors' cold in cache) and builds a new plan, with a new uid, when any tensor moved; a uid is never reused.  The
gradients are covered by their pointers in the key, and autograd gives a gradient the dtype and shape of its
parameter and, for a dense parameter, its strides (the gradient layout contract of ``AccumulateGrad``).  What
neither check sees — a gradient assigned by hand with another memory layout at the very address of the previous one,
a tensor reshaped in place at the same address, or a state entry replaced by another tensor object
(``opt.state[p]["momentum_buffer"] = t``) instead of through ``load_state_dict`` — is outside the contract; call
:meth:`FIP.invalidate_plans <fip_fast.optim.FIP.invalidate_plans>` after such surgery.

Step counts: a plan keeps the ``state["step"]`` of its tensors as 0-dim *views* of one (n,) fp32 tensor, so one
op advances them all (a foreach add over 300 CPU scalars costs a millisecond).  Rebuilding a plan copies the
current counts into a new vector first; only the current plan of a group advances its vector.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from fip_fast.backends import host

_data_ptr = Tensor.data_ptr
_uids = itertools.count()
_PLAIN = (Tensor, torch.nn.Parameter)


def pointers(tensors: list) -> tuple:
    """The ``data_ptr()`` of every tensor (``None`` entries stay ``None``)."""
    try:
        return tuple(map(_data_ptr, tensors))
    except TypeError:
        return tuple(None if t is None else t.data_ptr() for t in tensors)


@dataclass
class DevicePlan:
    """The parameters of one group on one device that have a gradient, and their state lists."""

    device: torch.device
    ps: list
    index: Optional[list]      # positions in the group's parameter list (None: all of them, in order)
    fisher0: list
    anchor: list
    momentum: list
    fisher: list
    pert: Optional[list]
    steps: list                # 0-dim views of ``step_vector``: each parameter's state["step"]
    step_vector: Tensor        # (n,) fp32
    uid: int                   # never reused: with the gradients' pointers, the backends' cache key

    def grads(self, all_grads: list) -> list:
        return all_grads if self.index is None else [all_grads[i] for i in self.index]

    def pointers(self, group_ptrs: tuple) -> tuple:
        """The entries of ``group_ptrs`` (one per parameter of the group) that belong to this plan."""
        return group_ptrs if self.index is None else tuple(group_ptrs[i] for i in self.index)

    def dereferenced(self, anchor_on: bool) -> list:
        """Every tensor of the plan whose address a backend's pointer table may hold: the parameters, momentum,
        Fisher, the lagged perturbation, and F0/θ0 when the anchor is on (the kernels skip them otherwise)."""
        lists = [self.ps, self.momentum, self.fisher] + ([self.pert] if self.pert is not None else [])
        if anchor_on:
            lists += [self.fisher0, self.anchor]
        return [t for lst in lists for t in lst if t is not None]


@dataclass
class GroupPlan:
    """The plan of one parameter group: valid while ``structure`` and the gradient pointers are unchanged."""

    group: dict
    params: list               # the group's parameter list when the plan was built (a copy)
    structure: tuple           # (optimizer epoch, trace_estimator, anchor on)
    missing: Optional[tuple]   # None: every parameter had a gradient; else True where one had none
    devices: list              # [DevicePlan]
    pert_complete: bool        # every parameter of the group with a stored lagged perturbation is planned
    grad_ptrs: Optional[tuple] = None   # the gradients' pointers at the last step (host.read_grads's ``prev``)
    watched: list = field(init=False, repr=False)       # DevicePlan.dereferenced of every device, in order
    addresses: bytes = field(init=False, repr=False)    # host.addresses(watched) when the plan was made

    def __post_init__(self) -> None:
        self.watched = [t for dp in self.devices for t in dp.dereferenced(self.structure[2])]
        self.addresses = host.addresses(self.watched)

    def unmoved(self) -> bool:
        """Whether every parameter and state tensor of the plan still has its elements where it had them when the
        plan was made (else the backends' tables under this plan's uid point at old, possibly freed, memory)."""
        return host.same_addresses(self.watched, self.addresses)

    def matches(self, group: dict, structure: tuple, missing: Optional[tuple]) -> bool:
        """Whether this plan serves a step of ``group`` (``structure``: :func:`structure_of`; ``missing``:
        :func:`missing_of` of the gradients' pointers): same group, structure and missing gradients, no parameter
        swapped in the group's list, no tensor of the plan moved."""
        return (self.group is group and self.structure == structure and self.missing == missing
                and host.same_items(group["params"], self.params) and self.unmoved())


def missing_of(grad_ptrs: tuple) -> Optional[tuple]:
    """Which parameters have no gradient (None when all have one: the common case, found without a loop)."""
    return tuple(p is None for p in grad_ptrs) if None in grad_ptrs else None


def structure_of(epoch: int, group: dict) -> tuple:
    """What the plan's lists depend on besides the gradients: the epoch, the estimator (``pert`` exists only for
    "lagged") and whether the anchor is on (F0/θ0 go to the kernels only then)."""
    return (epoch, group["trace_estimator"], group["eta_r"] != 0.0)


def plannable(params: list) -> bool:
    """Plans cover plain tensors only: a tensor subclass (FSDP2's DTensor) has no meaningful ``data_ptr``."""
    return all(type(p) in _PLAIN for p in params)


@torch.no_grad()
def device_plan(state: dict, ps: list, index: Optional[list], device: torch.device) -> DevicePlan:
    """Build the plan of ``ps`` (state already created); re-points their ``state["step"]`` to views of a new
    step vector holding the current counts."""
    st = [state[p] for p in ps]
    vec = torch.stack([s["step"].reshape(()).to(device=device, dtype=torch.float32) for s in st]) if st else \
        torch.zeros(0, device=device)
    steps = list(vec.unbind(0)) if st else []
    for s, v in zip(st, steps):
        s["step"] = v
    return DevicePlan(device, list(ps), index, [s.get("fisher0") for s in st], [s.get("anchor") for s in st],
                      [s["momentum_buffer"] for s in st], [s["fisher"] for s in st],
                      [s["pert"] for s in st] if all("pert" in s for s in st) and st else None, steps, vec,
                      next(_uids))
