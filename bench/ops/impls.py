"""The implementations side by side: the fip_fast backends and ``torch.compile`` of the reference."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fip_fast import ops as fops
from fip_fast import reference


class _Compiled:
    """``torch.compile`` of the reference's per-tensor math (see the module docstring)."""

    def __init__(self, loop: bool = False):
        self.loop = loop
        self._fns: dict[str, Callable] = {}

    def _c(self, key: str, fn: Callable, dynamic: Optional[bool]) -> Callable:
        if key not in self._fns:
            self._fns[key] = torch.compile(fn, dynamic=dynamic)
        return self._fns[key]

    def fisher_accumulate_(self, fisher, grads, beta, alpha):
        if self.loop:
            return self._c("fa_loop", reference.fisher_accumulate_, False)(fisher, grads, beta, alpha)
        one = self._c("fa", lambda f, g, b, a: reference.fisher_accumulate_([f], [g], b, a), True)
        for f, g in zip(fisher, grads):
            one(f.view(-1), g.view(-1), beta, alpha)

    def global_norm(self, tensors):
        if self.loop:
            return self._c("gn_loop", reference.global_norm, False)(tensors)
        one = self._c("gn", lambda t: t.float().pow(2).sum(), True)
        sq = torch.stack([one(t.view(-1)) for t in tensors]).sum()
        norm = sq.sqrt()
        return norm, (~torch.isfinite(norm)).float()

    def perturb_(self, params, grads, scale, found_inf=None):
        if self.loop:
            return self._c("pt_loop", reference.perturb_, False)(params, grads, scale, found_inf)
        one = self._c("pt", lambda p, g, s: reference.perturb_([p], [g], s), True)
        for p, g in zip(params, grads):
            one(p.view(-1), g.view(-1), scale)

    def fip_step_(self, params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, **h):
        if self.loop:
            fn = self._c(f"fs_loop{grads_pert is None}{pert is None}", reference.fip_step_, False)
            return fn(params, grads, grads_pert, fisher0, anchor, momentum_buf, fisher, pert, **h)

        def step_one(p, g, gp, f0, a, b, f, e):
            reference.fip_step_([p], [g], None if gp is None else [gp], [f0], [a], [b], [f],
                                None if e is None else [e], **h)

        one = self._c(f"fs{grads_pert is None}{pert is None}", step_one, True)
        v = lambda t: None if t is None else t.view(-1)  # noqa: E731
        for i, p in enumerate(params):
            one(v(p), v(grads[i]), None if grads_pert is None else v(grads_pert[i]), v(fisher0[i]), v(anchor[i]),
                v(momentum_buf[i]), v(fisher[i]), None if pert is None else v(pert[i]))

    def spectral_weight(self, U, S, delta, Vh, residual=None, relative=False):
        return self._c("sw", reference.spectral_weight, False)(U, S, delta, Vh, residual, relative)

    def spectral_linear_grad(self, x, grad_out, U, S, delta, Vh, relative=False):
        return self._c("slg", reference.spectral_linear_grad, False)(x, grad_out, U, S, delta, Vh, relative)


def resolve_impls(device: torch.device, wanted: Optional[list[str]], compile_loop: bool,
                  explicit: bool = False) -> dict[str, dict]:
    """name → {available, reason, module-or-object, device_scalars}."""
    names = wanted or ["reference", "foreach", "compile"] + (["compile_loop"] if compile_loop else []) + \
        ["triton", "cuda", "cpu"]
    out: dict[str, dict] = {}
    for name in names:
        if name in ("compile", "compile_loop"):
            out[name] = dict(available=True, reason="", obj=_Compiled(loop=name == "compile_loop"),
                             device_scalars=False)
            continue
        ok, reason = fops.availability(name, device)
        if ok and name == "triton" and device.type == "cpu" and not explicit:
            ok, reason = False, ("CPU tensors run only in the Triton interpreter (TRITON_INTERPRET=1), which is not "
                                 "meaningful for timing; pass --impls triton to run it anyway")
        obj = None
        if ok:
            obj = fops._module(name)[0] if name != "reference" else reference
        out[name] = dict(available=ok, reason=reason, obj=obj,
                         device_scalars=name in ("foreach", "triton", "cuda", "cpu"))
    return out
