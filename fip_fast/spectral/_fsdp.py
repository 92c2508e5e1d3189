"""FSDP2: the in-place update moved ahead of FSDP's gathers (:func:`shard`), each rank's rows of the weights, and
the one all-gather of every layer's δ (:func:`_gather_many`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fip_fast.spectral._adapters import Adapter
from fip_fast.spectral._state import _gathered, _groups


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
