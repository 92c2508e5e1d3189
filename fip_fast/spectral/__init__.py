"""Fast FIP in place (METHOD.md "Fast FIP", "In place"): train only a shift δ of each layer's singular values,
without swapping modules, without rebuilding W(δ) in the forward and without the dense weight gradient.

For a selected layer with weight matrix W0 (Linear: out×in; Conv: out×(in/groups·k…); Embedding: num×dim; other
types through :func:`register_adapter`), the (top-k or full) SVD W0 = U·diag(S)·Vh is taken once in fp32 and

    s(δ) = S + δ            (or S·(1 + δ) with ``relative=True``, or S·exp(δ) with ``relative="exp"``)
    W(δ) = W0 + U_k·diag(relu(s(δ)) − S_k)·Vh_k

which is METHOD.md's W − U_k·diag(S_k)·Vh_k + U_k·diag(relu(S_k + δ))·Vh_k written around W0 (S ≥ 0, so
relu(S) = S).  How it runs:

* **The layer keeps its ordinary weight.**  It is frozen (``requires_grad=False``: autograd never computes dW);
  ``U`` (m×k), ``S`` (k), ``Vh`` (k×n) are buffers of the layer (``spectral_U`` / ``spectral_S`` /
  ``spectral_Vh``, saved in the ``state_dict``, moved by ``.to()``), δ is its parameter ``spectral_delta`` (fp32,
  zeros), and W0 is the buffer ``spectral_W0`` in the weight dtype (saved too, so that a resume starts from the
  exact W0: the no-drift rule below holds across save/load, bf16 included).
* **The weight is updated in place, lazily.**  A forward pre-hook (and a ``state_dict`` pre-hook) re-derives
  W = W0 + U·diag(relu(s(δ)) − S)·Vh, once per change of δ, for every stale layer of the reparameterization in
  one call of :func:`fip_fast.ops.spectral_update_`.  A change is a change of *value*: the layer keeps a copy of
  the δ its weight was derived from and compares (``torch.equal``, k numbers per call) — version counters miss
  torch's fused optimizer kernels and writes through ``.data``.  Recomputing from W0 costs one copy of the
  weights and means no drift: after any number of steps W equals W0 + U·diag(relu(s(δ)) − S)·Vh up to one
  rounding of the weight dtype; at δ = 0 nothing is written at all, so the model is θ0 bit for bit.  The
  optimizer's perturbations of δ (FIP's fd / lagged suppressor) reach the weights the same way.  A weight whose
  matrix is not a view of its memory (a channels_last convolution) is computed aside and copied in.
* **The state lives on the layers.**  The hooks are plain functions that find their state on the module they are
  called with: a ``copy.deepcopy`` of the model (``torch.optim.swa_utils.AveragedModel`` too) trains, syncs and
  merges on its own, and :func:`merge` / :func:`sync` find the layers anywhere below the model given.
* **δ-gradient from activations.**  The layer's forward is untouched; a forward hook records the projected input
  ``a`` (Linear-like: x·Vhᵀ; Conv: the input convolved with the rows of Vh as k filters; Embedding: the rows
  U[idx]) and routes the output through an identity autograd function whose backward projects the output gradient
  (c = g_out·U, over channels for Conv, g_out·Vhᵀ for Embedding) and returns
  ∂ℓ/∂δ = Σ_positions (a ⊙ c) ⊙ ∂s/∂δ,  ∂s/∂δ = 1[s > 0] (× S when relative; = s for ``"exp"``).
  Per-sample values (sum over positions first) are what :func:`collect_per_sample` hands to the δ-Fisher.  A weight
  shared by several modules (a tied LM head) has one δ and a hook on every module using it.
* **Or from the weight gradient, where that is cheaper.**  Per call, :func:`_weight_side` compares the
  multiply-adds of the projections (NP·k·(m + n)) with those of the dense weight gradient projected,
  ∂ℓ/∂δ = diag(Uᵀ·dW·Vhᵀ) ⊙ ∂s/∂δ (NP·m·n + m·n·k): at full rank a convolution's input projection costs a second
  forward, its dW less.  The tap then keeps the input (as autograd keeps it for a trainable weight; an in-place
  change of it before the backward raises) and computes dW in its backward; per-sample gradients always come from
  the projections.
* :func:`merge` drops hooks, buffers and δ: the weights already hold W(δ), so the model is its original self.
* **Supported and refused** (docs/fast-fip-in-place.md): unbatched convolution inputs and keyword calls
  (``fc(input=x)``) are tapped like positional batched ones; ``load_state_dict`` of δ alone (``strict=False``)
  keeps W0; ``nn.MultiheadAttention.out_proj`` is never selected (MHA reads its weight without calling it, so no
  hook would run); double backward through a tap (``create_graph=True``, FIP's ``trace_estimator="batch"``) raises
  — the taps compute ∂ℓ/∂δ outside autograd.

Reference: :mod:`fip_fast.spectral_reference` (module swap, W(δ) rebuilt by autograd) computes the same gradients; the
tests compare the two.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from fip_fast import ops

__all__ = ["Adapter", "register_adapter", "reparameterize", "merge", "spectral_layers", "spectrum", "deltas", "sync",
           "collect_per_sample", "add_mixing", "shard", "DEFAULT_TYPES"]


# ------------------------------------------------------------------------------------------- layer adapters
@dataclass(frozen=True)
class Adapter:
    """How a layer type's weight is a matrix and how its δ-gradient comes from activations — one registry for the
    in-place form (here) and the module-swapping reference (:mod:`fip_fast.spectral_reference`).

    ``to_matrix(weight) -> (m, n)`` (a view of the weight where possible); ``from_matrix(W, shape) -> weight``;
    ``project(layer, x, U, Vh) -> a`` the projected input, (N, P, k) with P positions per sample;
    ``project_grad(layer, g_out, U, Vh) -> c`` the projected output gradient, (N, P, k);
    ``weight_grad(layer, x, g_out) -> dW`` the dense weight gradient as an (m, n) matrix, or None where the type
    has none — then the δ-gradient always comes from the projections (see :func:`_weight_side`);
    ``forward(layer, x, weight) -> y`` the layer run with another weight (the reference's module swap needs it;
    None: the type works in place only); ``linear_like``: y = x·Wᵀ + b along the last dim (the reference's fast
    per-sample Fisher).
    """
    to_matrix: Callable[[Tensor], Tensor]
    from_matrix: Callable[[Tensor, torch.Size], Tensor]
    project: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    project_grad: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    weight_grad: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    forward: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    linear_like: bool = False


def _flat(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def _unflat(W: Tensor, shape: torch.Size) -> Tensor:
    return W.reshape(shape)


def _tokens(t: Tensor) -> Tensor:
    """(N, ..., d) → (N, P, d): every leading dimension after the first is a position of the sample."""
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, 1, -1)


def _linear_project(layer, x, U, Vh):
    return _tokens(x) @ Vh.to(x.dtype).t()


def _linear_project_grad(layer, g, U, Vh):
    return _tokens(g) @ U.to(g.dtype)


def _conv_project(layer, x, U, Vh):
    """The input convolved with the k rows of Vh as filters (each group's input with the same filters):
    (N, G·k, *out_spatial) → (N, P·G, k) with positions and groups as the positions of the sample.  With one group
    the result is a transposed *view* of the convolution's output (no copy; so is :func:`_conv_project_grad`'s)."""
    G, k = layer.groups, Vh.shape[0]
    filt = Vh.to(x.dtype).reshape(k, layer.in_channels // G, *layer.kernel_size)
    if G == 1:
        a = layer._conv_forward(x, filt, None)                                         # (N, k, *sp)
        return a.reshape(a.shape[0], k, -1).transpose(1, 2)
    a = layer._conv_forward(x, filt.repeat(G, *([1] * (filt.dim() - 1))), None)     # (N, G·k, *sp)
    return a.reshape(a.shape[0], G, k, -1).permute(0, 1, 3, 2).reshape(a.shape[0], -1, k)


def _conv_project_grad(layer, g, U, Vh):
    """Σ over each group's output channels of g·U: (N, out, *sp) → (N, P·G, k), ordered as :func:`_conv_project`."""
    G, k = layer.groups, U.shape[1]
    N = g.shape[0]
    if G == 1:                                  # Uᵀ·g per sample: (k, out)·(out, P), a transposed view as above
        return torch.matmul(U.to(g.dtype).t(), g.reshape(N, g.shape[1], -1)).transpose(1, 2)
    gg = g.reshape(N, G, g.shape[1] // G, -1)                                        # (N, G, out/G, P)
    c = torch.einsum("ngop,gok->ngpk", gg, U.to(g.dtype).reshape(G, -1, k))
    return c.reshape(N, -1, k)


def _linear_weight_grad(layer, x, g):
    m = g.shape[-1]
    return g.reshape(-1, m).t() @ x.reshape(-1, x.shape[-1])


def _conv_weight_grad(layer, x, g):
    """The convolution's weight gradient (one GEMM, the one full FIP's backward computes), as (m, n)."""
    padding = layer.padding
    if layer.padding_mode != "zeros":             # what nn.Conv*._conv_forward does before a zero-padding conv
        x = torch.nn.functional.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * (x.dim() - 2)
    dim = x.dim() - 2
    _, dw, _ = torch.ops.aten.convolution_backward(g, x, layer.weight, None, layer.stride, padding, layer.dilation,
                                                   False, [0] * dim, layer.groups, [False, True, False])
    return dw.reshape(dw.shape[0], -1)


def _embedding_project(layer, idx, U, Vh):
    a = U[idx]                                                                        # (…, k)
    if layer.padding_idx is not None:                 # nn.Embedding gives the padding row no gradient
        a = a * (idx != layer.padding_idx).unsqueeze(-1).to(a.dtype)
    return _tokens(a if idx.dim() > 0 else a.unsqueeze(0))


def _embedding_project_grad(layer, g, U, Vh):
    return _tokens(g) @ Vh.to(g.dtype).t()


def _linear_forward(layer, x, w):
    return torch.nn.functional.linear(x, w, layer.bias)


def _conv_forward(layer, x, w):
    return layer._conv_forward(x, w, layer.bias)


def _embedding_forward(layer, idx, w):
    return torch.nn.functional.embedding(idx, w, layer.padding_idx, None, layer.norm_type, layer.scale_grad_by_freq,
                                         layer.sparse)


LINEAR_ADAPTER = Adapter(_flat, _unflat, _linear_project, _linear_project_grad, _linear_weight_grad,
                         _linear_forward, linear_like=True)
CONV_ADAPTER = Adapter(_flat, _unflat, _conv_project, _conv_project_grad, _conv_weight_grad, _conv_forward)
EMBEDDING_ADAPTER = Adapter(_flat, _unflat, _embedding_project, _embedding_project_grad,
                            forward=_embedding_forward)
_ADAPTERS: dict[type, Adapter] = {nn.Linear: LINEAR_ADAPTER, nn.Conv1d: CONV_ADAPTER, nn.Conv2d: CONV_ADAPTER,
                                  nn.Conv3d: CONV_ADAPTER, nn.Embedding: EMBEDDING_ADAPTER}
DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def register_adapter(layer_type: type, adapter: Adapter) -> None:
    """Teach :func:`reparameterize` (and :func:`fip_fast.spectral_reference.reparameterize`, which shares this
    registry; it needs ``adapter.forward``) a new layer type (e.g. Hugging Face GPT-2 ``Conv1D``)."""
    _ADAPTERS[layer_type] = adapter


def _adapter_for(layer: nn.Module) -> Adapter:
    for t in type(layer).__mro__:
        if t in _ADAPTERS:
            return _ADAPTERS[t]
    raise TypeError(f"no spectral adapter for {type(layer).__name__}; see fip_fast.spectral.register_adapter")


# ------------------------------------------------------------------------------------------- one weight
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
    """Record the δ (and O) values the weights of ``items`` now hold (one multi-tensor copy where layouts match)."""
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


class _Group:
    """The weights of one :func:`reparameterize` call: synchronized together (one spectral_update_ call).
    ``frozen``: (parameter, its requires_grad) that :func:`reparameterize` turned off, restored by :func:`merge`
    (strong references: a deep copy of the model maps them to its own parameters); ``handles``: hooks outside the
    layers (the FSDP2 root hook of :func:`shard`)."""

    def __init__(self, impl: str):
        self.items: list[_Spectral] = []
        self.impl = impl
        self.sharded = False           # FSDP2 (:func:`shard`): the weights are row shards, synced by the root hook
        self.frozen: list = []
        self.handles: list = []

    def stale_items(self) -> list:
        """The items whose δ (or O) differs from what their weight holds, in order."""
        hit, cur, seen, who = set(), [], [], []
        for sp in self.items:
            c = sp.state()
            if sp.seen is None or not _same_layout(c, sp.seen):
                hit.add(id(sp))
                continue
            cur.extend(c)
            seen.extend(sp.seen)
            who.extend([sp] * len(c))
        if cur:
            hit.update(id(sp) for sp, ch in zip(who, _changed(cur, seen)) if ch)
        return [sp for sp in self.items if id(sp) in hit]

    @torch.no_grad()
    def sync(self) -> None:
        if self.sharded:
            return self.sync_shards()
        stale = self.stale_items()
        if not stale:
            return
        plain = []
        for sp in stale:
            if _has_mix(sp.owner):
                _sync_mixed(sp)
            else:
                plain.append(sp)
        if plain:
            self._update(plain)
        _snapshot(stale)

    def _update(self, items: list) -> None:
        """W = W0 + U·diag(relu(s(δ)) − S)·Vh for every item, in one :func:`fip_fast.ops.spectral_update_` call;
        a weight whose matrix is not a view of it (channels_last) is computed aside and copied in."""
        o = [sp.owner for sp in items]
        S = [m.spectral_S for m in o]
        out, back = [], []
        for sp in items:
            w = sp.owner.weight
            M = sp.adapter.to_matrix(w)
            if not _aliases(M, w):
                M = torch.empty(M.shape, dtype=M.dtype, device=M.device)
                back.append((sp, w, M))
            out.append(M)
        ops.spectral_update_(out, [m.spectral_U for m in o], [m.spectral_Vh for m in o], S,
                             _relu_spectra(S, [sp.delta for sp in items], [sp.relative for sp in items]),
                             base=[sp.adapter.to_matrix(m.spectral_W0) for sp, m in zip(items, o)], impl=self.impl)
        for sp, w, M in back:
            _write_matrix(sp, w, M)

    @torch.no_grad()
    def sync_shards(self) -> None:
        """Under FSDP2: every rank writes its own rows, W[rows] = W0[rows] + U[rows]·diag(relu(s) − S)·Vh, into the
        sharded weight before the model's forward gathers it (δ is gathered first: k numbers per layer, every
        layer's in one all-gather).  Every
        forward, on every rank (the gathers are collectives; δ's shards are not version-tracked consistently)."""
        # every layer's δ (and O, with mixing) in one collective, not one per layer
        mixes = [sp.owner.spectral_mix for sp in self.items if _has_mix(sp.owner)]
        full = _gather_many([sp.delta for sp in self.items] + mixes)
        full_mix = iter(full[len(self.items):])
        W, U, Vh, S, s_new, base, back = [], [], [], [], [], [], []
        for sp, delta in zip(self.items, full):
            o = sp.owner
            if _has_mix(o):            # W[part] = W0[part] + U[part]·core·Vh[part], core with the gathered δ and O
                _sync_mixed(sp, delta, next(full_mix))
                continue
            u, vh = sp.local_factors()
            w = _local(o.weight)
            M = sp.adapter.to_matrix(w)
            if not _aliases(M, w):               # channels_last: computed aside, copied in below
                M = torch.empty(M.shape, dtype=M.dtype, device=M.device)
                back.append((sp, w, M))
            W.append(M)
            U.append(u)
            Vh.append(vh)
            S.append(o.spectral_S)
            s_new.append(torch.relu(_spectrum(o.spectral_S, delta, sp.relative)))
            base.append(sp.adapter.to_matrix(o.spectral_W0))
        if W:
            ops.spectral_update_(W, U, Vh, S, s_new, base=base, impl=self.impl)
        for sp, w, M in back:
            _write_matrix(sp, w, M)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view FSDP2 keeps), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _gathered(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _chunk_rows(n: int, world: int) -> list[int]:
    """Rows of each rank when ``torch.chunk`` splits ``n`` rows over ``world`` ranks (FSDP2's Shard(0) layout)."""
    step = -(-n // world) if n else 0
    return [max(0, min(step, n - r * step)) for r in range(world)]


def _gather_many(ts: list) -> list:
    """``full_tensor()`` of every tensor of ``ts`` (plain tensors as they are) — for DTensors sharded ``Shard(0)``
    on one 1-d mesh with one dtype, ONE all-gather of their local shards, each padded to ``ceil(rows / world)``
    rows, instead of one collective per tensor (a 7B LLaMA has 224 reparameterized layers: 224 → 1 per forward)."""
    out = list(ts)
    idx = [i for i, t in enumerate(ts) if hasattr(t, "full_tensor")]
    if len(idx) < 2:
        return [_gathered(t) for t in ts]
    from torch.distributed.tensor import Shard

    mesh, dtype = ts[idx[0]].device_mesh, ts[idx[0]].dtype
    world = mesh.size()

    def fits(t) -> bool:
        pl = tuple(t.placements)
        return (t.dim() > 0 and t.device_mesh == mesh and t.dtype == dtype and len(pl) == 1
                and isinstance(pl[0], Shard) and pl[0].dim == 0
                and t.to_local().shape[0] == _chunk_rows(t.shape[0], world)[mesh.get_local_rank()])

    if mesh.ndim != 1 or not all(fits(ts[i]) for i in idx):
        return [_gathered(t) for t in ts]
    parts, spans = [], []
    for i in idx:
        t = ts[i]
        rest = int(torch.Size(t.shape[1:]).numel())           # elements per row
        step = max(_chunk_rows(t.shape[0], world))
        loc = t.to_local().reshape(-1)
        parts.append(torch.nn.functional.pad(loc, (0, step * rest - loc.numel())))
        spans.append((i, rest, step * rest))
    buf = torch.cat(parts)
    got = [torch.empty_like(buf) for _ in range(world)]
    torch.distributed.all_gather(got, buf, group=mesh.get_group())
    off = 0
    for i, rest, width in spans:
        t = ts[i]
        rows = _chunk_rows(t.shape[0], world)
        out[i] = torch.cat([got[r][off:off + rows[r] * rest] for r in range(world)]).view(t.shape)
        off += width
    return out


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


#: the taps compute ∂ℓ/∂δ outside autograd (from the recorded projections): a backward that builds a graph of it
#: would differentiate a constant, so it is refused rather than silently wrong
_NO_DOUBLE_BACKWARD = (
    "Fast FIP in place does not support double backward (create_graph=True through a reparameterized layer, "
    "e.g. FIP(trace_estimator='batch' or 'exact') on its δ): use trace_estimator='fd' or 'lagged', or the "
    "module-swapping fip_fast.spectral_reference")


@dataclass(eq=False)
class _Call:
    """One forward call of a module using a reparameterized weight: the projected input ``a`` (N, P, k) — or, on
    the weight side (:func:`_weight_side`), the input ``x`` itself and its version — and, once the backward
    reaches the call's output, the output gradient."""

    sp: _Spectral
    module: nn.Module
    a: Optional[Tensor]
    x: Optional[Tensor] = None
    x_version: int = 0
    unbatched: bool = False                   # a convolution called on one sample: g gets a batch of one too
    g: Optional[Tensor] = None

    def capture(self, g: Tensor) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        self.g = g.unsqueeze(0) if self.unbatched else g

    def c(self, g: Tensor) -> Tensor:
        """The projected output gradient (N, P, k)."""
        o = self.sp.owner
        return _adapter_for(self.module).project_grad(self.module, g, o.spectral_U, o.spectral_Vh)

    def _input(self) -> Tensor:
        if self.x._version != self.x_version:
            raise RuntimeError(
                f"the input of a reparameterized {type(self.module).__name__} was modified by an in-place operation "
                "after its forward; Fast FIP's weight-side δ-gradient needs it (as full FIP's weight gradient "
                "would): make that operation out of place")
        return self.x

    @property
    def weight_side(self) -> bool:
        return self.a is None and self.sp.sink is None

    def projected(self) -> Tensor:
        """``a`` = the projected input x·Vhᵀ (computed now from the kept input on the weight side)."""
        if self.a is None:
            o = self.sp.owner
            with torch.no_grad():
                self.a = _adapter_for(self.module).project(self.module, self._input(), o.spectral_U, o.spectral_Vh)
        return self.a

    def dw_v(self, g: Tensor, acc: torch.dtype) -> Tensor:
        """dW·Vhᵀ (m, k): the dense weight gradient of this call projected on the right (the order autograd's
        chain rule through W = W0 + U·diag(·)·Vh takes: its rounding, not a different one)."""
        dw = _adapter_for(self.module).weight_grad(self.module, self._input(), g)
        return dw.to(acc) @ self.sp.owner.spectral_Vh.t().to(acc)

    def delta_grad(self, c: Optional[Tensor] = None, cross: Optional[Tensor] = None) -> Tensor:
        """∂ℓ/∂δ of this call, and the per-sample values into the sink while :func:`collect_per_sample` runs.
        ``c``: the projected output gradient, ``cross``: Σ cᵀ·a (k×k), when the caller has them already."""
        sp = self.sp
        if self.g is None:                      # the output took no part in the loss
            return torch.zeros_like(sp.delta)
        acc = torch.promote_types(sp.owner.spectral_U.dtype, torch.float32)        # fp32 math; fp64 stays fp64
        if cross is not None and sp.sink is None:
            self.g = None
            return torch.diagonal(cross) * sp.jacobian()
        if self.weight_side:                    # diag(Uᵀ·dW·Vhᵀ)
            dwv = self.dw_v(self.g, acc)
            self.g = None
            return (dwv * sp.owner.spectral_U.to(acc)).sum(0) * sp.jacobian()
        c = self.c(self.g) if c is None else c
        per_sample = (self.projected().to(acc) * c.to(acc)).sum(1) * sp.jacobian()    # (N, k)
        self.g = None
        if sp.sink is not None:
            sp.sink.append(per_sample.detach())
        return per_sample.sum(0)


class _Tap(torch.autograd.Function):
    """Identity on the layer output that puts δ into the graph; its backward sees the output gradient g_out and
    returns ∂ℓ/∂δ from the recorded projection (or, on the weight side, from this call's dense weight gradient,
    where that is the cheaper GEMM) — no W(δ) in the graph, no dW for autograd to keep.  The output is returned as
    ``out.detach()``: the same storage, no copy, and not a view, so in-place operations on it stay legal (the
    layers tapped here never save their output for backward)."""

    @staticmethod
    def forward(ctx, out, delta, call):
        ctx.call = call
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        ctx.call.capture(g)
        return g, ctx.call.delta_grad(), None


class _TapMix(torch.autograd.Function):
    """:class:`_Tap` for a layer with singular-vector mixing (:func:`add_mixing`): also returns ∂ℓ/∂O = Σ cᵀ·a
    (masked to the trainable off-diagonal band), c = g_out·U, a = x·Vhᵀ (= Uᵀ·dW·Vhᵀ on the weight side); δ's
    gradient is the diagonal of the same k×k product."""

    @staticmethod
    def forward(ctx, out, delta, mix, call):
        ctx.call = call
        return out.detach()

    @staticmethod
    def backward(ctx, g_out):
        call = ctx.call
        call.capture(g_out)
        g = call.g                                               # with its batch dimension
        o = call.sp.owner
        acc = torch.promote_types(o.spectral_U.dtype, torch.float32)
        if call.weight_side:                                     # Σ cᵀ·a = Uᵀ·dW·Vhᵀ
            cross = o.spectral_U.t().to(acc) @ call.dw_v(g, acc)
            c = None
        else:
            c = call.c(g)                                        # projected once, for O and for δ
            cross = _cross(c.to(acc), call.projected().to(acc))
        gm = cross * o.spectral_mix_mask
        return g_out, call.delta_grad(c, cross), gm.to(o.spectral_mix.dtype), None


def _cross(c: Tensor, a: Tensor) -> Tensor:
    """Σ over samples and positions of cᵀ·a: (N, P, k) × (N, P, k) → (k, k).  One batched GEMM per sample summed
    (2–3× faster than einsum's single reshaped GEMM on the CPU when P is large, and no copy of the transposed
    views the conv projections are) while its (N, k, k) intermediate is at most 4× the inputs; einsum otherwise."""
    N, P, k = a.shape
    if k <= 4 * P:
        return torch.matmul(c.transpose(1, 2), a).sum(0)
    return torch.einsum("npi,npj->ij", c, a)


def _has_mix(layer: nn.Module) -> bool:
    return hasattr(layer, "spectral_mix")


def _core(o: nn.Module, acc: torch.dtype, delta: Optional[Tensor] = None, mix: Optional[Tensor] = None) -> Tensor:
    """The k×k change of the core: diag(relu(s(δ)) − S) + O ⊙ mask (W = W0 + U·core·Vh); ``delta`` / ``mix``: δ and
    O whole (gathered under FSDP2, :func:`shard`; default: gathered here)."""
    delta = _gathered(o.spectral_delta) if delta is None else delta
    mix = _gathered(o.spectral_mix) if mix is None else mix
    ds = torch.relu(_spectrum(o.spectral_S, delta, o.spectral_relative)) - o.spectral_S
    return torch.diag(ds.to(acc)) + (mix * o.spectral_mix_mask).to(acc)


@torch.no_grad()
def _sync_mixed(sp: _Spectral, delta: Optional[Tensor] = None, mix: Optional[Tensor] = None) -> None:
    """W = W0 + U·(diag(relu(s) − S) + O)·Vh, recomputed from W0 (no drift), in plain PyTorch — this rank's part
    of it under FSDP2 (:func:`shard`; ``delta`` / ``mix`` already gathered, see :func:`_core`)."""
    o = sp.owner
    U, Vh = sp.local_factors()
    w = _local(o.weight)
    W = sp.adapter.to_matrix(w)
    acc = torch.promote_types(W.dtype, torch.float32)
    W0 = sp.adapter.to_matrix(o.spectral_W0)
    Uc = U.to(acc) @ _core(o, acc, delta, mix)                              # (m, k)
    if W.dtype == acc and W0.dtype == acc and W.is_contiguous() and _aliases(W, w):
        torch.addmm(W0, Uc, Vh.to(acc), out=W)                              # one GEMM writing W, no m×n temporary
    else:                                                                   # other dtype, or channels_last
        _write_matrix(sp, w, (W0.to(acc) + Uc @ Vh.to(acc)).to(W.dtype))


# ------------------------------------------------------------------------------------------- hooks
def _pre_hook(module, args):
    """Before a forward: bring the weight up to date with δ if δ changed (then every stale weight of the group is
    updated, in one call).  Under FSDP2 the root's hook has synced the shards (see :func:`shard`)."""
    sp = module.__dict__.get(_STATE)
    if sp is not None and not sp.group.sharded and sp.stale():
        sp.group.sync()


def _weight_side(sp: _Spectral, module: nn.Module, x: Tensor, out: Tensor) -> bool:
    """Whether this call's δ-gradient is cheaper from the dense weight gradient than from activations.

    In multiply-adds per call, with NP output positions, an m×n weight and rank k: from activations, projecting
    the input (NP·n·k) and the output gradient (NP·m·k) (+ NP·k² for the mixing cross product); from the weight,
    dW (NP·m·n, the GEMM full FIP pays) and Uᵀ·dW (m·n·k) (+ n·k² with mixing).  A rank-64 1024×1024 Linear
    over 1024 tokens: 134 M vs 1.1 G — activations; a full-rank 3×3 convolution C→C: 10·NP·C² vs 9·NP·C² + 9·C³
    — the weight (at full rank the input projection is a second forward).  The weight side keeps the input
    (as autograd would for dW) and never runs while per-sample gradients are collected."""
    if _adapter_for(module).weight_grad is None or sp.sink is not None or isinstance(x, (list, tuple)):
        return False
    if isinstance(getattr(module, "padding", 0), str) or not (x.is_floating_point() and x.dtype == out.dtype):
        return False
    o = sp.owner
    m, k = o.spectral_U.shape
    n = o.spectral_Vh.shape[1]
    npos = out.numel() // m
    mix = _has_mix(o)
    act = npos * k * (n + m) + (npos * k * k if mix else 0)
    weight = npos * m * n + m * n * k + (n * k * k if mix else 0)
    return weight < act


@functools.lru_cache(maxsize=None)
def _input_name(cls: type) -> Optional[str]:
    """The name of the first argument of ``cls.forward`` (``input`` for torch's layers), for keyword calls."""
    params = [p for p in inspect.signature(cls.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[1].name if len(params) > 1 else None


def _unbatched(module: nn.Module, x) -> bool:
    """A convolution called on one sample without its batch dimension (C, *spatial)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and isinstance(x, Tensor)
            and x.dim() == len(module.kernel_size) + 1)


def _tap_hook(module, args, kwargs, out):
    """After a forward: record the projected input (or keep the input, on the weight side) and route the output
    through the tap that returns ∂ℓ/∂δ in the backward.  The input is the first positional argument or its
    keyword (``fc(input=x)``); an unbatched convolution's input and output gradient get a batch of one."""
    sp = module.__dict__.get(_STATE)
    if sp is None or not isinstance(out, Tensor) or not torch.is_grad_enabled():
        return None
    o = sp.owner
    if not o.spectral_delta.requires_grad:
        return None
    x = args[0] if args else kwargs.get(_input_name(type(module)))
    if x is None:
        raise TypeError(f"a reparameterized {type(module).__name__} was called without its input "
                        f"(args={len(args)}, kwargs={sorted(kwargs)}): Fast FIP in place cannot tap it")
    unbatched = _unbatched(module, x)
    if unbatched:
        x = x.unsqueeze(0)
    if _weight_side(sp, module, x, out):
        call = _Call(sp, module, None, x.detach(), x._version, unbatched=unbatched)
    else:
        with torch.no_grad():
            a = _adapter_for(module).project(module, x, o.spectral_U, o.spectral_Vh)
        call = _Call(sp, module, a, unbatched=unbatched)
    if _has_mix(o):
        return _TapMix.apply(out, o.spectral_delta, o.spectral_mix, call)
    return _Tap.apply(out, o.spectral_delta, call)


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


_HOOKS = (_pre_hook, _tap_hook, _load_pre_hook, _load_hook, _state_dict_hook)


def _remove_hooks(module: nn.Module) -> None:
    """Remove this module's hooks of :func:`reparameterize` (found by function: a deep copy has its own)."""
    for d in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_pre_hooks,
              module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks):
        for k in [k for k, h in d.items() if getattr(h, "hook", h) in _HOOKS]:
            del d[k]
            module._forward_hooks_with_kwargs.pop(k, None)
            module._forward_hooks_always_called.pop(k, None)


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


# ------------------------------------------------------------------------------------------- public API
def _svd(W: Tensor, k: int, svd: str) -> tuple[Tensor, Tensor, Tensor]:
    r = min(W.shape)
    if svd == "lowrank" and k < r:
        U, S, V = torch.svd_lowrank(W, q=min(k + 8, r), niter=4)
        return U[:, :k], S[:k], V[:, :k].t()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k], S[:k].clone(), Vh[:k]


def _weights_read_directly(model: nn.Module) -> set:
    """ids of the layers whose weight their parent reads directly, never calling the layer's forward — so no hook
    of it would ever run: ``nn.MultiheadAttention.out_proj`` (``F.multi_head_attention_forward`` takes
    ``out_proj.weight``; ``nn.TransformerEncoderLayer``, torchvision's ViT).  They are not reparameterized."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _targets(model, types, include):
    seen, out = set(), []
    skip = _weights_read_directly(model)
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (not name or not isinstance(m, types) or not isinstance(w, nn.Parameter) or hasattr(m, "spectral_delta")
                or id(m) in skip or (include is not None and not include(name, m))):
            continue
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            raise ValueError(f"{name}: nn.Embedding with max_norm, scale_grad_by_freq or sparse cannot be "
                             "reparameterized (it renormalizes its weight in place / scales gradients by batch "
                             "counts / has sparse gradients)")
        out.append((name, m, id(w) in seen))
        seen.add(id(w))
    return out


@torch.no_grad()
def _attach(layer: nn.Module, rank: Optional[int], svd: str, relative: bool) -> _Spectral:
    adapter = _adapter_for(layer)
    w = layer.weight
    r = min(adapter.to_matrix(w.detach()).shape)
    k = r if rank is None else min(int(rank), r)
    if k < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    acc = torch.promote_types(w.dtype, torch.float32)      # S and δ in fp32 (fp64 for an fp64 model)
    U, S, Vh = _svd(adapter.to_matrix(w.detach()).to(acc), k, svd)
    layer.register_buffer("spectral_U", U.to(w.dtype).contiguous())
    layer.register_buffer("spectral_S", S.contiguous())
    layer.register_buffer("spectral_Vh", Vh.to(w.dtype).contiguous())
    # W0 is saved (exact resumes, whatever the weight dtype) and kept contiguous: its matrix is then a view
    layer.register_buffer("spectral_W0", w.detach().clone(memory_format=torch.contiguous_format))
    layer.spectral_delta = nn.Parameter(torch.zeros(k, dtype=acc, device=w.device))
    layer.spectral_weight_requires_grad = w.requires_grad
    layer.spectral_relative = relative
    w.requires_grad_(False)
    return _Spectral(layer, adapter, relative)


def reparameterize(model: nn.Module, layer_types: Sequence[type] = DEFAULT_TYPES, rank: Optional[int] = None,
                   freeze_others: bool = True, *, relative: bool = False, svd: str = "full",
                   include: Optional[Callable[[str, nn.Module], bool]] = None,
                   impl: str = "auto") -> list[nn.Parameter]:
    """Reparameterize every layer of ``layer_types`` in ``model`` in place (see the module docstring).

    Args:
        rank: ``None`` for full rank; ``k`` trains the top-k singular directions (the rest of W0 stays as is).
        freeze_others: ``requires_grad=False`` on every other parameter (restored by :func:`merge`).
        relative: s = S·(1 + δ) instead of S + δ; ``"exp"``: s = S·exp(δ) (multiplicative like ``True``, but a
            singular value can never reach 0 — under ``True`` a step to δ ≤ −1 zeroes it, and the relu's zero
            gradient keeps it dead for good).  svd: ``"full"`` or ``"lowrank"`` (randomized, rank-k only).
        include: predicate ``(qualified_name, layer) -> bool`` selecting layers further.
        impl: implementation of the in-place weight update (see :mod:`fip_fast.ops`).
    Returns:
        The δ parameters (fp32, one per distinct weight), in module order.
    """
    if svd not in ("full", "lowrank"):
        raise ValueError(f"svd must be 'full' or 'lowrank', got {svd!r}")
    if isinstance(relative, str) and not _is_exp(relative):
        raise ValueError(f"relative must be False, True or 'exp', got {relative!r}")
    types = tuple(layer_types)
    targets = _targets(model, types, include)
    if not targets:
        raise ValueError(f"no layer of types {[t.__name__ for t in types]} found to reparameterize")
    group = _Group(impl)
    if freeze_others:
        for p in model.parameters():
            if p.requires_grad:
                group.frozen.append((p, True))
                p.requires_grad_(False)
    by_weight: dict[int, _Spectral] = {}
    for name, layer, shared in targets:
        sp = by_weight.get(id(layer.weight))
        if sp is None:
            sp = by_weight[id(layer.weight)] = _attach(layer, rank, svd, relative)
            sp.group = group
            group.items.append(sp)
        sp.users.append(layer)
    _snapshot(group.items)                               # δ = 0: the weights are W0, current
    for sp in group.items:
        sp.owner.register_state_dict_pre_hook(_state_dict_hook)
        sp.owner.register_load_state_dict_pre_hook(_load_pre_hook)
        sp.owner.register_load_state_dict_post_hook(_load_hook)
        for m in sp.users:
            setattr(m, _STATE, sp)
            m.register_forward_pre_hook(_pre_hook)
            m.register_forward_hook(_tap_hook, with_kwargs=True)
    return [sp.delta for sp in group.items]


def spectral_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) for every reparameterized layer (the owners of a δ) of ``model``."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "spectral_delta")]


def spectrum(layer: nn.Module) -> Tensor:
    """s(δ) of a reparameterized layer, before the relu (differentiable in δ): S + δ, or S·(1 + δ) if relative
    (S·exp(δ) if ``relative="exp"``)."""
    return _spectrum(layer.spectral_S, layer.spectral_delta, layer.spectral_relative)


def _is_exp(relative: object) -> bool:
    return isinstance(relative, str) and relative == "exp"


def _spectrum(S: Tensor, d: Tensor, relative: object) -> Tensor:
    if _is_exp(relative):
        return S * torch.exp(d)
    return S * (1.0 + d) if relative else S + d


def deltas(model: nn.Module) -> list[nn.Parameter]:
    """The δ parameters of the reparameterized layers of ``model`` (one per distinct weight), in module order."""
    return [m.spectral_delta for _, m in spectral_layers(model)]


def sync(model: nn.Module) -> None:
    """Bring the weights of the reparameterized layers of ``model`` up to date with their δ now (the forward
    pre-hooks do it lazily; call this before running the model in a way that bypasses them, e.g. a functional
    call with the weights swapped)."""
    for g in _groups(model):
        g.sync()


@torch.no_grad()
def add_mixing(model: nn.Module, band: int) -> list[nn.Parameter]:
    """SVFT-style singular-vector mixing on top of :func:`reparameterize`: every reparameterized layer of
    ``model`` also trains O (k×k, zeros) restricted to the off-diagonal band 0 < |i − j| ≤ ``band`` of its top-k
    core, W(δ, O) = W0 + U_k·(diag(relu(s(δ)) − S_k) + O)·Vh_k — U and V can rotate within the top-k subspace
    (SVFT's banded variant), the spectral budget stays k·(2·band + 1) numbers per layer.

    The layers' weights are still updated in place from W0 (no drift) and the gradient of O comes from the same
    projections as δ's, ∂ℓ/∂O = Σ (g_out·U)ᵀ·(x·Vhᵀ) (= Uᵀ·dW·Vhᵀ on the weight side), masked to the band.  The
    update of a mixed layer runs in plain PyTorch (one k×k core product and one addmm per layer), not through
    :func:`fip_fast.ops.spectral_update_`.
    O has no per-sample gradients (:func:`collect_per_sample` covers δ only): a Fisher anchor over O is not
    available.  :func:`merge` drops O with the rest.  Returns the O parameters (fp32), in module order.
    """
    if isinstance(band, bool) or not isinstance(band, int) or band < 1:
        raise ValueError(f"band must be an int ≥ 1, got {band!r}")
    layers = spectral_layers(model)
    if not layers:
        raise ValueError("add_mixing: the model has no reparameterized layer (call reparameterize first)")
    out = []
    for _, o in layers:
        if _has_mix(o):
            raise ValueError("add_mixing: the layers already have singular-vector mixing")
        k = o.spectral_S.shape[0]
        i = torch.arange(k, device=o.spectral_S.device)
        dist = (i[:, None] - i[None, :]).abs()
        mask = ((dist > 0) & (dist <= band)).to(o.spectral_S.dtype)
        o.register_buffer("spectral_mix_mask", mask)
        o.spectral_mix = nn.Parameter(torch.zeros(k, k, dtype=o.spectral_S.dtype, device=o.spectral_S.device))
        # what it trains: the band (the k×k tensor is a masked dense store); counted by purify's report
        o.spectral_mix.trainable_entries = int(mask.sum())
        out.append(o.spectral_mix)
    for g in _groups(model):
        for sp in g.items:
            if _has_mix(sp.owner):
                sp.seen = None          # O = 0 leaves the weight as it is; re-derived once, with O, all the same
    return out


@torch.no_grad()
def shard(model: nn.Module) -> nn.Module:
    """Adapt the in-place reparameterization of ``model`` to FSDP2, after ``fully_shard`` (what
    :func:`fip_fast.integrations.distributed.shard_fsdp` calls).

    FSDP2 shards every parameter on dim 0 — the frozen weights by rows, δ by singular directions — and gathers a
    unit's parameters in its forward (and again in its backward).  So the in-place weight update moves before the
    first gather: a forward pre-hook on ``model`` (ahead of FSDP's own) writes each rank's rows,
    W[rows] = W0[rows] + U[rows]·diag(relu(s(δ)) − S)·Vh, into the sharded weight, with δ gathered (k numbers per
    layer; every layer's δ — and O — in ONE all-gather, :func:`_gather_many`) — so the gathered weight that
    forward and backward use is W(δ), as in one process (a transposed layout, GPT-2's ``Conv1D``, shards the
    matrix's columns: Vh[:, cols] then).  W0 keeps only this rank's part (the
    no-drift copy is sharded too); U, S, Vh stay whole (the taps project whole activations).  The
    taps then work unchanged on the gathered parameters and δ's gradient is reduce-scattered by FSDP.  The update
    runs on every forward of every rank (its gathers are collectives).  With singular-vector mixing
    (:func:`add_mixing`) O is gathered too (k² numbers per layer) and the part is W0[part] + U[part]·core·Vh[part].
    Call :func:`add_mixing` before sharding."""
    groups = _groups(model)
    if not groups:
        raise ValueError("shard: the model has no layer reparameterized in place (fip_fast.spectral.reparameterize)")
    for group in groups:
        if group.sharded:
            continue
        for sp in group.items:
            o = sp.owner
            r0, r1 = _shard_rows(o.weight)
            sp.shard = (_matrix_axis_of_dim0(sp.adapter, o.weight.shape), r0, r1)
            o.register_buffer("spectral_W0", o.spectral_W0[r0:r1].clone(), persistent=False)
        group.sharded = True
        group.handles.append(model.register_forward_pre_hook(lambda module, args, g=group: g.sync_shards(),
                                                             prepend=True))
    return model


def _matrix_axis_of_dim0(adapter: Adapter, shape: torch.Size) -> int:
    """Which axis of the adapter's weight matrix the weight's dim 0 (what FSDP2 shards) is: 0 for Linear / Conv /
    Embedding (rows), 1 for a transposed layout like GPT-2's ``Conv1D`` (columns)."""
    t = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)
    M, flat = adapter.to_matrix(t), t.reshape(shape[0], -1)
    if M.shape == flat.shape and torch.equal(M, flat):
        return 0
    if M.shape == flat.t().shape and torch.equal(M, flat.t()):
        return 1
    raise NotImplementedError("fip_fast.spectral.shard: the layer's weight matrix is neither its dim-0 flattening "
                              "nor that transposed")


def _shard_rows(w: Tensor) -> tuple[int, int]:
    """This rank's rows of a weight FSDP2 sharded on dim 0 (``torch.chunk`` over the mesh), or all of them."""
    if not hasattr(w, "placements"):
        return 0, w.shape[0]
    from torch.distributed.tensor import Replicate, Shard

    pl = tuple(w.placements)
    if all(isinstance(p, Replicate) for p in pl):
        return 0, w.shape[0]
    if len(pl) != 1 or not isinstance(pl[0], Shard) or pl[0].dim != 0:
        raise NotImplementedError(f"fip_fast.spectral.shard: a weight sharded as {pl}; only Shard(0) on a 1-d mesh "
                                  "(FSDP2's fully_shard) is supported")
    mesh = w.device_mesh
    rank, world, m = mesh.get_local_rank(), mesh.size(), w.shape[0]
    step = -(-m // world)                      # torch.chunk: ceil(m / world) rows per rank, the last ones fewer
    r0 = min(rank * step, m)
    r1 = min(r0 + step, m)
    if w.to_local().shape[0] != r1 - r0:
        raise NotImplementedError(f"fip_fast.spectral.shard: local shard of {w.to_local().shape[0]} rows, expected "
                                  f"{r1 - r0} (torch.chunk layout)")
    return r0, r1


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


@contextlib.contextmanager
def collect_per_sample(model: nn.Module) -> Iterator[dict]:
    """Inside the block, every backward through the reparameterized layers of ``model`` also records the
    per-sample δ-gradients: the yielded dict maps each δ to the list of (N, k) fp32 tensors of its calls (sum them
    per sample, then square: the δ-Fisher of METHOD.md).  ``model`` may be the reparameterized model, a model
    containing it or a submodule of it: every δ owned by a layer of ``model`` is collected."""
    mods = {id(m) for m in model.modules()}
    items = [sp for group in _groups(model) for sp in group.items if id(sp.owner) in mods]
    out = {}
    for sp in items:
        sp.sink = out.setdefault(sp.delta, [])
    try:
        yield out
    finally:
        for sp in items:
            sp.sink = None
