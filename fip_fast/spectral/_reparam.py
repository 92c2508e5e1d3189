"""Reparameterize: the SVD of each selected weight, the buffers and δ on the layer, the hooks; the accessors of the
reparameterized layers; the mixing parameter O of :func:`add_mixing`."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from fip_fast.spectral._adapters import DEFAULT_TYPES, _adapter_for, _weights_read_directly
from fip_fast.spectral._state import _STATE, _groups, _has_mix, _is_exp, _snapshot, _Spectral, _spectrum
from fip_fast.spectral._state_dict import _load_hook, _load_pre_hook, _state_dict_hook
from fip_fast.spectral._sync import _Group
from fip_fast.spectral._taps import _pre_hook, _tap_hook


def _svd(W: Tensor, k: int, svd: str) -> tuple[Tensor, Tensor, Tensor]:
    r = min(W.shape)
    if svd == "lowrank" and k < r:
        U, S, V = torch.svd_lowrank(W, q=min(k + 8, r), niter=4)
        return U[:, :k], S[:k], V[:, :k].t()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k], S[:k].clone(), Vh[:k]


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


def deltas(model: nn.Module) -> list[nn.Parameter]:
    """The δ parameters of the reparameterized layers of ``model`` (one per distinct weight), in module order."""
    return [m.spectral_delta for _, m in spectral_layers(model)]


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
