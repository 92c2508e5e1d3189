"""The in-place weight update: W = W0 + U·diag(relu(s(δ)) − S)·Vh (+ U·O·Vh with mixing), re-derived from W0 for
every stale weight of a :func:`reparameterize` call in one call of :func:`fip_fast.ops.spectral_update_` (this
rank's rows under FSDP2), by value: a weight is re-derived when its δ (or O) differs from the values it holds."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fip_fast import ops
from fip_fast.spectral._fsdp import _gather_many
from fip_fast.spectral._state import (
    _aliases,
    _changed,
    _core,
    _groups,
    _has_mix,
    _local,
    _relu_spectra,
    _same_layout,
    _snapshot,
    _Spectral,
    _spectrum,
    _write_matrix,
)


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
        plain, mixed = [], []
        for sp in stale:
            (mixed if _has_mix(sp.owner) else plain).append(sp)
        if plain:
            self._update(plain)
        if mixed:
            _sync_mixed_many(mixed)
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


@torch.no_grad()
def _sync_mixed(sp: _Spectral, delta: Optional[Tensor] = None, mix: Optional[Tensor] = None) -> None:
    """W = W0 + U·(diag(relu(s) − S) + O)·Vh, recomputed from W0 (no drift), in plain PyTorch — this rank's part
    of it under FSDP2 (:func:`shard`; ``delta`` / ``mix`` already gathered, see :func:`_core`)."""
    U, Vh = sp.local_factors()
    w = _local(sp.owner.weight)
    _write_mixed(sp, U, Vh, w, _core(sp.owner, torch.promote_types(w.dtype, torch.float32), delta, mix))


@torch.no_grad()
def _sync_mixed_many(items: list) -> None:
    """:func:`_sync_mixed` of every item (not sharded), with the cores' small k-vector and k×k work for all items
    in a few multi-tensor ops (relu(s) − S and O ⊙ mask) instead of about ten small ops per layer; the same values
    bit for bit (diag(ds) + O ⊙ mask has ds on its diagonal, where the mask is 0, and O ⊙ mask elsewhere).  Falls
    back to :func:`_sync_mixed` per item for mixed dtypes or devices (which ``_foreach`` ops do not take)."""
    owners = [sp.owner for sp in items]
    S = [o.spectral_S for o in owners]
    deltas = [o.spectral_delta.detach() for o in owners]
    mixes = [o.spectral_mix.detach() for o in owners]
    if len({(t.dtype, t.device) for t in S + deltas + mixes}) != 1:
        for sp in items:
            _sync_mixed(sp)
        return
    ds = torch._foreach_sub(_relu_spectra(S, deltas, [sp.relative for sp in items]), S)
    cores = torch._foreach_mul(mixes, [o.spectral_mix_mask for o in owners])         # O ⊙ mask, fresh tensors
    for sp, o, d, core in zip(items, owners, ds, cores):
        core.diagonal().add_(d)                                                       # + diag(relu(s) − S)
        _write_mixed(sp, o.spectral_U, o.spectral_Vh, o.weight, core)


def _write_mixed(sp: _Spectral, U: Tensor, Vh: Tensor, w: Tensor, core: Tensor) -> None:
    """W = W0 + U·core·Vh into the weight ``w`` (its local part under FSDP2: ``U`` / ``Vh`` restricted alike),
    with ``core`` the k×k change of the core (:func:`_core`)."""
    W = sp.adapter.to_matrix(w)
    acc = torch.promote_types(W.dtype, torch.float32)
    W0 = sp.adapter.to_matrix(sp.owner.spectral_W0)
    Uc = U.to(acc) @ core.to(acc)                                           # (m, k)
    if W.dtype == acc and W0.dtype == acc and W.is_contiguous() and _aliases(W, w):
        torch.addmm(W0, Uc, Vh.to(acc), out=W)                              # one GEMM writing W, no m×n temporary
    else:                                                                   # other dtype, or channels_last
        _write_matrix(sp, w, (W0.to(acc) + Uc @ Vh.to(acc)).to(W.dtype))


def sync(model: nn.Module) -> None:
    """Bring the weights of the reparameterized layers of ``model`` up to date with their δ now (the forward
    pre-hooks do it lazily; call this before running the model in a way that bypasses them, e.g. a functional
    call with the weights swapped)."""
    for g in _groups(model):
        g.sync()
