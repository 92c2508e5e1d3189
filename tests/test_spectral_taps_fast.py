"""The fast paths of Fast FIP in place's taps (fip_fast.spectral._taps, ._state, ._sync) against their references:
∂relu(s)/∂δ computed once per change of δ for the whole group (and taken at the forward's δ), the mixed layers'
update batched across layers, the value check's short path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fip_fast import spectral as SI
from fip_fast.spectral import _state, _sync


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 4, 3, padding=1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("relative", [False, True, "exp"])
def test_the_group_jacobians_equal_the_per_layer_ones_bit_for_bit(relative):
    """``sp.jac`` (set with the recorded δ by _snapshot, multi-tensor) is ``sp.jacobian()`` exactly, dead
    directions (s ≤ 0) included."""
    net = _net()
    SI.reparameterize(net, relative=relative)
    with torch.no_grad():
        for i, d in enumerate(SI.deltas(net)):
            d.copy_(torch.linspace(-1.5, 0.5, d.numel()) * (1.0 if relative else 3.0) + 0.01 * i)
    net(torch.randn(2, 3, 6, 6))                         # the pre-hook syncs and records δ and ∂relu(s)/∂δ
    items = SI._groups(net)[0].items
    assert any(bool((sp.spectrum() <= 0).any()) for sp in items) or relative == "exp"
    for sp in items:
        assert torch.equal(sp.jac, sp.jacobian()), (relative, sp.owner)


@pytest.mark.parametrize("side", ["weight", "activations"])
def test_the_backward_uses_the_jacobian_of_its_forwards_delta(side, monkeypatch):
    """δ changed (through ``.data``, as a fused kernel would) between a forward and its backward: the δ-gradient
    is the one of the forward's W(δ) — what autograd through W(δ) gives — not one with the new δ's relu mask."""
    from fip_fast.spectral import _taps
    monkeypatch.setattr(_taps, "_weight_side", lambda *a: side == "weight")
    net = _net()
    ref = _net()
    for p in ref.parameters():
        p.requires_grad_(False)
    deltas = SI.reparameterize(net, relative=True)
    with torch.no_grad():
        for d in deltas:
            d.fill_(-0.5)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    loss = F.cross_entropy(net(x), y)
    with torch.no_grad():
        for d in deltas:
            d.data.fill_(-2.0)                           # s = S·(1 + δ) < 0: the new relu mask is all zeros
    loss.backward()
    layers = [m for m in net.modules() if hasattr(m, "spectral_delta")]
    ref_d = [torch.full_like(d, -0.5, requires_grad=True) for d in deltas]
    names = {id(m): n for n, m in net.named_modules()}
    weights = {}
    for m, d in zip(layers, ref_d):
        W = m.spectral_U @ torch.diag(F.relu(m.spectral_S * (1 + d))) @ m.spectral_Vh
        weights[names[id(m)] + ".weight"] = W.reshape(m.weight.shape)
    want = torch.autograd.grad(F.cross_entropy(functional_call(ref, weights, (x,)), y), ref_d)
    for d, w in zip(deltas, want):
        assert float(w.abs().max()) > 0
        torch.testing.assert_close(d.grad, w, rtol=1e-4, atol=1e-6)


def test_the_batched_mixed_update_writes_the_per_layer_weights_bit_for_bit():
    """_sync_mixed_many (the cores of every mixed layer in multi-tensor ops) = _sync_mixed per layer, exactly."""
    a, b = _net(), _net()
    for net in (a, b):
        SI.reparameterize(net, relative=True)
        SI.add_mixing(net, band=2)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in SI.deltas(net) + [m.spectral_mix for m in net.modules() if hasattr(m, "spectral_mix")]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    items_a, items_b = SI._groups(a)[0].items, SI._groups(b)[0].items
    _sync._sync_mixed_many(items_a)
    for sp in items_b:
        _sync._sync_mixed(sp)
    for sa, sb in zip(items_a, items_b):
        assert not torch.equal(sa.owner.weight, sa.owner.spectral_W0)
        assert torch.equal(sa.owner.weight, sb.owner.weight)


def test_the_value_checks_short_path_sees_data_writes_and_layout_changes():
    net = _net()
    SI.reparameterize(net)
    sp = SI._groups(net)[0].items[0]
    assert not sp.stale()
    d = sp.delta
    d.data.add_(1e-3)                                    # no version bump
    assert sp.stale()
    net(torch.randn(1, 3, 6, 6))
    assert not sp.stale() and torch.equal(sp.seen[0], d.detach())
    d.data = d.data.double()                             # same values, another dtype: re-derived
    assert sp.stale()
    sp.seen = None
    assert sp.stale()
    assert isinstance(sp, _state._Spectral)
