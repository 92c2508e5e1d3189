"""One reparameterized weight: its state (:class:`_Spectral`, found on the modules that use it), the value-based
staleness test, the spectrum s(δ) and the writes of a weight matrix."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from fip_fast.spectral._adapters import Adapter

if TYPE_CHECKING:
    from fip_fast.spectral._sync import _Group


#: the attribute of every module using a reparameterized weight that holds its :class:`_Spectral`: the hooks are
#: plain functions that look their state up on the module they are called with, so a ``copy.deepcopy`` of the
#: model (``AveragedModel`` / EMA copies included) carries its own state and trains and merges on its own
_STATE = "_fip_spectral"


@dataclass(eq=False)
class _Spectral:
    """One reparameterized weight: its owner layer (holding δ and the buffers), the modules that use it, its group,
    and the values of δ (and O) the weight was last derived from.

    ``seen`` is a copy of those values, compared by value (:meth:`stale`): fused optimizer kernels and writes
    through ``.data`` change δ without bumping its version counter, so the counter cannot tell whether the weight
    is current; δ is k numbers, one ``torch.equal`` per call."""

    owner: nn.Module
    adapter: Adapter
    relative: object                                          # False | True | "exp"
    group: Optional["_Group"] = None
    users: list = field(default_factory=list)                 # modules whose forward uses the weight
    seen: Optional[tuple] = None                              # (δ,) or (δ, O) the weight holds; None: re-derive
    sink: Optional[list] = None                               # per-sample δ-gradients while collecting
    shard: Optional[tuple] = None                             # under FSDP2 (:func:`shard`): (matrix axis, start, end)
    loaded: frozenset = frozenset()                           # this layer's entries in the state dict being loaded
    load_prefix: str = ""
    #: ∂relu(s)/∂δ (k) at the δ the weight holds, set with ``seen`` by :func:`_snapshot`: a tap's backward uses the
    #: value of its forward (as autograd through W(δ) would), computed once per change of δ for the whole group
    #: instead of four small ops per tapped call.  A class-level default: pickles made before it still load.
    jac: Optional[Tensor] = None

    def local_factors(self) -> tuple[Tensor, Tensor]:
        """(U, Vh) restricted to this rank's part of the weight matrix (whole without FSDP2)."""
        U, Vh = self.owner.spectral_U, self.owner.spectral_Vh
        if self.shard is None:
            return U, Vh
        axis, a, b = self.shard
        return (U[a:b], Vh) if axis == 0 else (U, Vh[:, a:b])

    @property
    def delta(self) -> nn.Parameter:
        return self.owner.spectral_delta

    def state(self) -> tuple:
        """What the weight is derived from besides the frozen buffers: (δ,), or (δ, O) with mixing."""
        p = self.owner._parameters
        return (p["spectral_delta"],) if "spectral_mix" not in p else (p["spectral_delta"], p["spectral_mix"])

    def stale(self) -> bool:
        """Whether δ (or O) differs in value from what the weight was derived from."""
        seen = self.seen
        if seen is None:
            return True
        p = self.owner._parameters
        if len(seen) == 1 and "spectral_mix" not in p:        # the common case, without building tuples: one
            d, s = p["spectral_delta"], seen[0]                 # torch.equal of k numbers and three layout reads
            return (d.shape != s.shape or d.dtype != s.dtype or d.device != s.device) or not torch.equal(d, s)
        cur = self.state()
        return not _same_layout(cur, seen) or any(not torch.equal(a, b) for a, b in zip(cur, seen))

    def spectrum(self) -> Tensor:
        S = self.owner.spectral_S
        return _spectrum(S, self.delta, self.relative)

    def jacobian(self) -> Tensor:
        """∂relu(s)/∂δ."""
        S = self.owner.spectral_S
        if _is_exp(self.relative):
            return self.spectrum()                            # d(S·e^δ)/dδ = s, and s > 0 wherever S > 0
        return (self.spectrum() > 0).to(S.dtype) * (S if self.relative else 1.0)


def _same_layout(cur: tuple, seen: tuple) -> bool:
    return len(cur) == len(seen) and all(a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
                                         for a, b in zip(cur, seen))


def _changed(cur: list, seen: list) -> list:
    """[cur[i] differs in value from seen[i]] (same layouts): one multi-tensor pass and one host read for many
    tensors on one device (max |cur − seen| is 0 exactly when they are equal: IEEE subtraction of distinct finite
    numbers is never 0; NaN compares unequal)."""
    if len(cur) <= 2 or len({t.device for t in cur}) > 1:
        return [not torch.equal(a, b) for a, b in zip(cur, seen)]
    gaps = torch._foreach_norm(torch._foreach_sub([t.detach() for t in cur], seen), ord=math.inf)
    return torch.stack(gaps).ne(0).tolist()


@torch.no_grad()
def _snapshot(items: list) -> None:
    """Record the δ (and O) values the weights of ``items`` now hold (one multi-tensor copy where layouts match),
    and ∂relu(s)/∂δ at them (:func:`_jacobians`)."""
    dst, src = [], []
    for sp in items:
        cur = sp.state()
        if sp.seen is not None and _same_layout(cur, sp.seen):
            dst.extend(sp.seen)
            src.extend(t.detach() for t in cur)
        else:
            sp.seen = tuple(t.detach().clone() for t in cur)
    if dst:
        torch._foreach_copy_(dst, src)
    _jacobians(items)


def _jacobians(items: list) -> None:
    """``sp.jac`` = ∂relu(s(δ))/∂δ (k) of every item, from its recorded δ (``seen[0]``): 1[s > 0], × S when
    relative, = s for ``"exp"`` — the values :meth:`_Spectral.jacobian` gives (relu(s) > 0 exactly where s > 0),
    with the spectra of all items in a few multi-tensor ops (:func:`_relu_spectra`)."""
    S = [sp.owner.spectral_S for sp in items]
    rs = _relu_spectra(S, [sp.seen[0] for sp in items], [sp.relative for sp in items])
    for sp, s, r in zip(items, S, rs):
        if _is_exp(sp.relative):
            sp.jac = r                                          # d(S·e^δ)/dδ = s (≥ 0, relu(s) = s)
        else:
            mask = (r > 0).to(s.dtype)
            sp.jac = mask * s if sp.relative else mask


def _aliases(M: Tensor, w: Tensor) -> bool:
    """Whether the matrix view ``M`` of the weight ``w`` is its memory (a channels_last 4-d weight flattens into a
    copy, which an in-place update must not write into)."""
    return M.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()


@torch.no_grad()
def _write_matrix(sp: _Spectral, target: Tensor, M: Tensor) -> None:
    """target ← M, ``target`` a weight-shaped tensor (the weight, its local shard or W0), ``M`` its (m, n) matrix:
    through the adapter's view where that is the target's memory, else through ``from_matrix`` (any layout)."""
    view = sp.adapter.to_matrix(target)
    if _aliases(view, target):
        view.copy_(M)
    else:
        target.copy_(sp.adapter.from_matrix(M.to(target.dtype), target.shape))


def _is_exp(relative: object) -> bool:
    return isinstance(relative, str) and relative == "exp"


def _spectrum(S: Tensor, d: Tensor, relative: object) -> Tensor:
    if _is_exp(relative):
        return S * torch.exp(d)
    return S * (1.0 + d) if relative else S + d


def _relu_spectra(S: list, deltas: list, relative: list) -> list:
    """relu(s(δ)) of every layer — the same fp32 operations as :func:`_spectrum` then ``torch.relu``, as a few
    multi-tensor ops for all layers instead of three small ops per layer (224 layers of a 7B model: 3 launches, not
    672)."""
    if len(set(relative)) != 1 or len({d.dtype for d in deltas} | {t.dtype for t in S}) != 1:
        return [torch.relu(_spectrum(s, d, r)) for s, d, r in zip(S, deltas, relative)]
    rel = relative[0]
    if _is_exp(rel):
        out = torch._foreach_mul(S, torch._foreach_exp(deltas))
    elif rel:
        out = torch._foreach_mul(S, torch._foreach_add(deltas, 1.0))
    else:
        out = torch._foreach_add(S, deltas)
    torch._foreach_clamp_min_(out, 0.0)
    return out


def _has_mix(layer: nn.Module) -> bool:
    # a dict lookup: ``hasattr`` on a module goes through ``Module.__getattr__`` and an AttributeError when absent
    return "spectral_mix" in layer.__dict__.get("_parameters", ())


def _core(o: nn.Module, acc: torch.dtype, delta: Optional[Tensor] = None, mix: Optional[Tensor] = None) -> Tensor:
    """The k×k change of the core: diag(relu(s(δ)) − S) + O ⊙ mask (W = W0 + U·core·Vh); ``delta`` / ``mix``: δ and
    O whole (gathered under FSDP2, :func:`shard`; default: gathered here)."""
    delta = _gathered(o.spectral_delta) if delta is None else delta
    mix = _gathered(o.spectral_mix) if mix is None else mix
    ds = torch.relu(_spectrum(o.spectral_S, delta, o.spectral_relative)) - o.spectral_S
    return torch.diag(ds.to(acc)) + (mix * o.spectral_mix_mask).to(acc)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view FSDP2 keeps), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _gathered(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _groups(model: nn.Module) -> list:
    """The groups with a layer in ``model``: those of :func:`reparameterize` calls on ``model`` itself, on one of
    its submodules or on a model containing it — found on the layers, wherever they are in the tree."""
    seen, out = set(), []
    for m in model.modules():
        sp = m.__dict__.get(_STATE)
        if sp is not None and id(sp.group) not in seen:
            seen.add(id(sp.group))
            out.append(sp.group)
    return out
