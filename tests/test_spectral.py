"""Spectral reparameterization (Fast FIP): exactness at δ = 0, gradients, rank-k, merge, state_dict, buffers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import FIP
from fip_fast import spectral_reference as spectral
from fip_fast.spectral_reference import SpectralLayer


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


LAYERS = [
    lambda: nn.Linear(9, 6),
    lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, padding_mode="circular"),
    lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), bias=False),
    lambda: nn.Embedding(10, 4, padding_idx=0),
]
INPUTS = [
    lambda: torch.randn(5, 9),
    lambda: torch.randn(2, 4, 11),
    lambda: torch.randn(2, 4, 7, 7),
    lambda: torch.randn(2, 3, 8, 6),
    lambda: torch.randint(0, 10, (3, 5)),
]


@pytest.mark.parametrize("i", range(len(LAYERS)))
def test_identity_at_zero_and_merge(i):
    torch.manual_seed(i)
    layer = LAYERS[i]()
    x = INPUTS[i]()
    ref_out = layer(x)
    w0 = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    deltas = spectral.reparameterize(model)
    sl = model[0]
    assert isinstance(sl, SpectralLayer) and len(deltas) == 1
    assert _rel(sl.weight(), w0) < 1e-5
    assert _rel(model(x), ref_out) < 1e-5
    with torch.no_grad():
        deltas[0].add_(0.05 * torch.randn_like(deltas[0]))
    out = model(x)
    spectral.merge(model)
    assert type(model[0]) is type(layer) and isinstance(model[0].weight, nn.Parameter)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, SpectralLayer) for m in model.modules())


def test_delta_gradient_matches_autograd_through_explicit_svd():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    model = nn.Sequential(lin)
    (delta,) = spectral.reparameterize(model)
    sl = model[0]
    x = torch.randn(8, 6, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    d2 = delta.detach().clone().double().requires_grad_()
    W = sl.U.double() @ torch.diag(torch.relu(sl.S.double() + d2)) @ sl.Vh.double()
    (F.linear(x, W, sl.base.bias)).pow(2).sum().backward()
    torch.testing.assert_close(delta.grad.double(), d2.grad, rtol=1e-5, atol=1e-6)


def test_relu_gates_gradient_and_relative_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5))
    (delta,) = spectral.reparameterize(model, relative=True)
    sl = model[0]
    with torch.no_grad():
        delta.fill_(-2.0)                   # s = S·(1 − 2) < 0 → relu kills every direction
    assert sl.weight().abs().max() < 1e-6 + sl.base.bias.abs().max() * 0
    model(torch.randn(3, 5)).sum().backward()
    assert torch.all(delta.grad == 0)


def test_rank_k_keeps_residual_frozen():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    w0 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    (delta,) = spectral.reparameterize(model, rank=3)
    sl = model[0]
    assert delta.shape == (3,) and sl.residual is not None and not sl.residual.requires_grad
    assert _rel(sl.weight(), w0) < 1e-5
    with torch.no_grad():
        delta.fill_(0.5)
    diff = sl.weight().detach() - w0
    # the change lives in the top-3 singular subspace only
    U3 = torch.linalg.svd(w0)[0][:, :3]
    torch.testing.assert_close(U3 @ (U3.t() @ diff), diff, rtol=1e-4, atol=1e-5)
    lr = copy.deepcopy(nn.Sequential(nn.Linear(12, 10)))
    lr[0].weight.data.copy_(w0)
    (d_low,) = spectral.reparameterize(lr, rank=3, svd="lowrank")
    assert _rel(lr[0].weight(), w0) < 1e-4


def test_buffers_state_dict_and_fresh_copy_load():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    fresh = copy.deepcopy(src)
    for p in fresh.parameters():     # a different model of the same architecture
        p.data.normal_()
    spectral.reparameterize(src)
    with torch.no_grad():
        for _, sl in spectral.spectral_layers(src):
            sl.delta.normal_(0, 0.1)
    sd = src.state_dict()
    assert {"0.U", "0.S", "0.Vh", "0.delta", "0.base.bias"} <= set(sd)
    spectral.reparameterize(fresh)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(fresh(x), src(x))
    moved = copy.deepcopy(src).to(torch.float64)
    assert moved[0].U.dtype == torch.float64 and moved[0].delta.dtype == torch.float64


def test_freeze_others_and_merge_restores_flags():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    deltas = spectral.reparameterize(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(d) for d in deltas}
    spectral.merge(model)
    assert all(p.requires_grad for p in model.parameters())
    d2 = spectral.reparameterize(model, layer_types=(nn.Linear,), freeze_others=False,
                                 include=lambda name, m: name == "2")
    assert len(d2) == 1 and model[1].weight.requires_grad


def test_low_precision_factors_fp32_delta():
    model = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    (delta,) = spectral.reparameterize(model)
    sl = model[0]
    assert sl.U.dtype == torch.bfloat16 and sl.S.dtype == torch.float32 and delta.dtype == torch.float32
    out = model(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert delta.grad is not None and delta.grad.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="no layer"):
        spectral.reparameterize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="max_norm"):
        spectral.reparameterize(nn.Sequential(nn.Embedding(4, 3, max_norm=1.0)))
    with pytest.raises(ValueError, match="rank"):
        spectral.reparameterize(nn.Sequential(nn.Linear(3, 3)), rank=0)


def test_fip_trains_delta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    deltas = spectral.reparameterize(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = FIP(deltas, lr=0.05, eta_F=0.01)
    losses = []
    for _ in range(10):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(opt.step(closure).item())
    assert losses[-1] < losses[0]
