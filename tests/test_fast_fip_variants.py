"""Fast FIP's variants (fip_fast.pipeline.methods.build_fast_fip): ``delta_optimizer="adamw"`` and its optimizer
:class:`fip_fast.pipeline.purifier.SpectralAdamW` (tiny models, CPU, well under a second each)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _synthetic import TinyCNN as _TinyCNN  # tests/ is on sys.path
from torch import nn

from fip_fast import pipeline as P
from fip_fast import spectral
from fip_fast.pipeline.methods import DEFAULTS
from fip_fast.pipeline.purifier import SpectralAdamW


def TinyCNN() -> nn.Module:
    """The 8×8-input variant of the shared tiny CNN (8 channels, 16 hidden)."""
    return _TinyCNN(channels=8, hidden=16, side=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 8, 8, generator=g)
    y = torch.randint(4, (96,), generator=g)
    torch.manual_seed(0)
    return TinyCNN(), (x, y)


#: the variant these tests start from: δ only with the FIP optimizer (build_fast_fip's own defaults), not the
#: shipped DEFAULTS (clipped SGD + mixing band): each test names the options it exercises
DELTA_ONLY = {"delta_optimizer": "fip", "clip_norm": None, "mix_band": 0, "lr_delta": 0.3}


def _run(model, clean, **kw):
    kw = {"steps": 6, "batch_size": 16, "progress": False, "eta_r": 0.0, **DELTA_ONLY, **kw}
    return P.purify(copy.deepcopy(model), clean, method="fast_fip", **kw)


# ------------------------------------------------------------------------------------------- the pipeline option
def test_shipped_default_is_the_protocol_choice():
    """DEFAULTS["fast_fip"]: clipped SGD on δ + the mixing band, at the lr_delta the protocol's rule chose."""
    import json

    from bench.protocol import ROOT

    d = DEFAULTS["fast_fip"]
    assert (d["delta_optimizer"], d["clip_norm"], d["mix_band"], d["lr_delta"], d["eta_r"]) == ("sgd", 0.3, 8, 1.0, 0)
    chosen = json.loads((ROOT / "protocol_dev.json").read_text())["chosen"]["fast_fip"]["cfg"]
    keys = ("delta_optimizer", "clip_norm", "mix_band", "eta_r", "lr_delta", "distill", "augment")
    assert {k: d[k] for k in keys if k not in ("distill", "augment")} == {k: chosen[k] for k in keys[:5]}
    assert d["distill"] == "auto" and chosen["distill"] == {"weight": 1.0, "temperature": 2.0, "schedule": "late"}
    assert d["augment"] == chosen["augment"] == "auto"
    assert d["universal_perturbation"]["schedule"] == chosen["universal_perturbation"]["schedule"] == "constant"


@pytest.mark.parametrize("eta_r", [0.0, 1.0])
def test_adamw_runs_moves_weights_and_merges_back(data, eta_r):
    model, clean = data
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    m, rep = _run(model, clean, delta_optimizer="adamw", lr_delta=0.05, eta_r=eta_r)
    assert rep.steps_run == 6 and rep.skipped_steps == 0
    assert not spectral.spectral_layers(m)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert set(m.state_dict()) == set(model.state_dict())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    fresh = TinyCNN()
    fresh.load_state_dict(m.state_dict())
    # δ moved the weights (the weights themselves are frozen during Fast FIP: only δ can change them) ...
    assert not torch.equal(m.fc1.weight, model.fc1.weight) and not torch.equal(m.conv.weight, model.conv.weight)
    # ... along their own singular directions only: W's singular vectors are unchanged (up to sign), s changed.
    U0, S0, V0 = torch.linalg.svd(model.fc1.weight.detach(), full_matrices=False)
    U1, S1, V1 = torch.linalg.svd(m.fc1.weight.detach(), full_matrices=False)
    assert not torch.allclose(S0, S1)
    # W1 = U0·diag(s)·V0 for some s: its projection onto U0 (·) V0 is diagonal.
    M = U0.t() @ m.fc1.weight.detach() @ V0.t()
    assert torch.allclose(M - torch.diag(torch.diagonal(M)), torch.zeros_like(M), atol=1e-4)
    # the extras (BN affine, biases) trained too
    assert not torch.equal(m.bn.weight, model.bn.weight) and not torch.equal(m.fc2.bias, model.fc2.bias)


def test_adamw_lr_delta_scales_the_spectral_change(data):
    model, clean = data

    def change(lr):
        m, _ = _run(model, clean, delta_optimizer="adamw", lr_delta=lr, eta_F=0.0, fast_fip_extra="none",
                    lr_schedule="constant", steps=1, batch_size=96, val_fraction=0.0)
        U0, S0, V0 = torch.linalg.svd(model.fc1.weight.detach().double(), full_matrices=False)
        s = torch.diagonal(U0.t() @ m.fc1.weight.detach().double() @ V0.t())       # s(δ) in W0's own basis
        return s / S0 - 1

    # Adam's first step moves every relative δ_i by exactly lr (the sign of its gradient): s_i/S_i − 1 = ±lr,
    # whatever the scale of ∂ℓ/∂δ_i (the plain SGD step would be proportional to it).
    for lr in (0.01, 0.04):
        c = change(lr)
        assert (c.abs() - lr).abs().max() < 1e-4, c


def test_adamw_bad_options_name_the_input(data):
    model, clean = data
    with pytest.raises(ValueError, match="delta_optimizer"):
        _run(model, clean, delta_optimizer="adam")
    with pytest.raises(ValueError, match="clip_norm"):
        _run(model, clean, delta_optimizer="adamw", clip_norm=-1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        _run(model, clean, delta_optimizer="adamw", clip_norm=float("nan"))
    with pytest.raises(ValueError, match="clip_norm"):
        _run(model, clean, clip_norm=1.0)                       # with the default delta_optimizer "fip"
    with pytest.raises(ValueError, match="trace_estimator"):
        _run(model, clean, delta_optimizer="adamw", trace_estimator="lagged")
    with pytest.raises(ValueError, match="lr"):
        _run(model, clean, delta_optimizer="adamw", lr_delta=-0.1)


# ------------------------------------------------------------------------------------------- the optimizer
def _quadratic(dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    A = A @ A.t() + torch.eye(dim, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def closure():
        theta.grad = None
        loss = 0.5 * theta @ A @ theta
        loss.backward()
        return loss
    return A, theta, closure


def _lockstep(A, theta, closure, opt, ref, ref_opt, clip: float, steps: int = 12) -> None:
    """``steps`` of ``opt`` (a SpectralAdamW on θ) beside torch's ``ref_opt`` on a copy after clip_grad_norm_."""
    for _ in range(steps):
        opt.step(closure)
        ref_opt.zero_grad()
        (0.5 * ref @ A @ ref).backward()
        torch.nn.utils.clip_grad_norm_([ref], clip)
        ref_opt.step()


def test_adamw_group_matches_torch_adamw_with_clipping():
    """eta_F = 0: a kind="adamw" group is torch.optim.AdamW (weight decay 0) after clip_grad_norm_."""
    A, theta, closure = _quadratic()
    ref = nn.Parameter(theta.detach().clone())
    opt = SpectralAdamW([theta], lr=0.05, kind="adamw", clip_norm=0.5)
    _lockstep(A, theta, closure, opt, ref, torch.optim.AdamW([ref], lr=0.05, weight_decay=0.0), clip=0.5)
    assert torch.allclose(theta, ref, atol=1e-6)


def test_sgd_group_matches_torch_sgd_with_clipping():
    """eta_F = 0: a kind="sgd" group is torch.optim.SGD(momentum, weight_decay) after clip_grad_norm_ (torch adds
    the weight decay after the clipping too)."""
    A, theta, closure = _quadratic(seed=2)
    ref = nn.Parameter(theta.detach().clone())
    opt = SpectralAdamW([theta], lr=0.05, kind="sgd", momentum=0.9, weight_decay=0.01, clip_norm=0.3)
    _lockstep(A, theta, closure, opt, ref, torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=0.01),
              clip=0.3)
    assert torch.allclose(theta, ref, atol=1e-10)


def test_sgd_variant_runs_in_the_pipeline(data):
    model, clean = data
    m, rep = _run(model, clean, delta_optimizer="sgd", lr_delta=0.5, clip_norm=0.1)
    assert rep.skipped_steps == 0 and not spectral.spectral_layers(m)
    assert not torch.equal(m.fc1.weight, model.fc1.weight)


def test_suppressor_step_is_fd_mix_and_restores_theta():
    """kind="sgd", momentum 0: θ ← θ − lr·(g + c·(g' − g)), g' = A(θ + ρ·g/‖g‖), c = min(2·η_F·‖g‖/ρ, max_mix)."""
    for eta_F, max_mix in ((0.01, 1.0), (10.0, 1.0), (0.01, 100.0)):
        A, theta, closure = _quadratic(seed=1)
        th0 = theta.detach().clone()
        rho, lr = 0.3, 0.1
        opt = SpectralAdamW([theta], lr=lr, kind="sgd", momentum=0.0, eta_F=eta_F, rho=rho, max_mix=max_mix)
        opt.step(closure)
        g = A @ th0
        gp = A @ (th0 + rho * g / g.norm())
        c = min(2 * eta_F * float(g.norm()) / rho, max_mix)
        assert torch.allclose(theta.detach(), th0 - lr * (g + c * (gp - g)), atol=1e-10)


def test_suppressor_every_trace_every_and_perturbed_pass_flag():
    A, theta, _ = _quadratic()
    seen = []
    opt = SpectralAdamW([theta], lr=0.01, kind="adamw", eta_F=0.01, rho=0.1, trace_every=2)

    def closure():
        seen.append(opt.perturbed_pass)
        theta.grad = None
        loss = 0.5 * theta @ A @ theta
        loss.backward()
        return loss
    for _ in range(4):
        opt.step(closure)
    assert seen == [False, True, False, False, True, False]        # calls 0 and 2 run the second pass


def test_non_finite_step_is_skipped():
    _, theta, _ = _quadratic()
    opt = SpectralAdamW([theta], lr=0.1, kind="adamw", eta_F=0.01, rho=0.1)
    before = theta.detach().clone()

    def closure():
        theta.grad = torch.full_like(theta, float("nan"))
        return torch.tensor(float("nan"))
    opt.step(closure)
    assert opt.skipped_steps == 1 and torch.equal(theta.detach(), before)
    assert "exp_avg" not in opt.state[theta]


def test_state_dict_round_trip_continues_identically():
    A, theta, closure = _quadratic()
    opt = SpectralAdamW([theta], lr=0.05, kind="adamw", eta_F=0.01, rho=0.1, trace_every=3)
    for _ in range(4):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    th = theta.detach().clone()
    for _ in range(3):
        opt.step(closure)
    after = theta.detach().clone()
    _, theta2, closure2 = _quadratic()
    with torch.no_grad():
        theta2.copy_(th)
    opt2 = SpectralAdamW([theta2], lr=0.05, kind="adamw", eta_F=0.01, rho=0.1, trace_every=3)
    opt2.load_state_dict(sd)
    for _ in range(3):
        opt2.step(closure2)
    assert torch.equal(theta2.detach(), after)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(lr=0.1, kind="adam"), dict(lr=0.1, rho=0.0),
                                 dict(lr=0.1, momentum=1.0), dict(lr=0.1, clip_norm=-1.0),
                                 dict(lr=0.1, betas=(0.9, 1.0)), dict(lr=0.1, trace_every=0),
                                 dict(lr=0.1, eta_F=float("inf"))])
def test_optimizer_bad_hyperparameters_name_the_input(bad):
    name = next(k for k in bad if k != "lr" or len(bad) == 1)
    with pytest.raises(ValueError, match=name):
        SpectralAdamW([nn.Parameter(torch.zeros(3))], **bad)


# ------------------------------------------------------------------------------------------- relative="exp"
@pytest.mark.parametrize("layer", [nn.Linear(7, 5), nn.Conv2d(3, 4, 3, padding=1)])
def test_exp_spectrum_gradient_matches_autograd_reference(layer):
    """s = S·exp(δ): the in-place δ-gradient equals autograd through W(δ) = W0 + U·diag(S·e^δ − S)·Vh."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.double())
    x = torch.randn(6, 7, dtype=torch.float64) if isinstance(layer, nn.Linear) else torch.randn(
        2, 3, 5, 5, dtype=torch.float64)
    W0 = layer.weight.detach().clone()
    (delta,) = spectral.reparameterize(net, relative="exp")
    with torch.no_grad():
        delta.copy_(torch.randn_like(delta) * 0.5)
    layer(x).square().sum().backward()
    U, S, Vh = layer.spectral_U, layer.spectral_S, layer.spectral_Vh
    d = delta.detach().clone().requires_grad_(True)
    W = W0.flatten(1) + (U * (S * torch.exp(d) - S)) @ Vh
    if isinstance(layer, nn.Linear):
        out = F.linear(x, W, layer.bias)
    else:
        out = F.conv2d(x, W.reshape(W0.shape), layer.bias, padding=1)
    out.square().sum().backward()
    assert torch.allclose(delta.grad, d.grad, atol=1e-8, rtol=1e-8)
    assert torch.allclose(layer.weight.detach().flatten(1), W.detach(), atol=1e-10)   # the in-place weight
    assert torch.allclose(spectral.spectrum(layer), S * torch.exp(delta.detach()))
    spectral.merge(net)
    assert not hasattr(layer, "spectral_delta")


def test_exp_spectrum_never_kills_a_singular_value():
    """relative=True: δ ≤ −1 zeroes a singular value for good (relu, zero gradient); "exp" keeps it positive."""
    torch.manual_seed(0)
    for mode, alive in ((True, False), ("exp", True)):
        lin = nn.Linear(4, 4).double()
        net = nn.Sequential(lin)
        (delta,) = spectral.reparameterize(net, relative=mode)
        with torch.no_grad():
            delta.fill_(-1.5)
        lin(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        assert bool((delta.grad != 0).any()) == alive
        assert bool((torch.linalg.svdvals(lin.weight.detach()) > 1e-6).all()) == alive
        spectral.merge(net)


def test_exp_spectrum_runs_in_the_pipeline_and_bad_relative_names_it(data):
    model, clean = data
    m, rep = _run(model, clean, relative="exp", lr_delta=0.5)
    assert rep.skipped_steps == 0 and not spectral.spectral_layers(m)
    assert not torch.equal(m.fc1.weight, model.fc1.weight)
    with pytest.raises(ValueError, match="relative"):
        _run(model, clean, relative="log")


# ------------------------------------------------------------------------------------------- mixing (SVFT-like)
@pytest.mark.parametrize("layer", [nn.Linear(7, 5), nn.Conv2d(3, 4, 3, padding=1)])
def test_mixing_gradient_matches_autograd_reference(layer):
    """W = W0 + U·(diag(relu(s) − S) + O ⊙ band)·Vh: in-place δ- and O-gradients equal autograd's; O's gradient is
    zero off the band; the weight follows δ and O."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.double())
    x = torch.randn(6, 7, dtype=torch.float64) if isinstance(layer, nn.Linear) else torch.randn(
        2, 3, 5, 5, dtype=torch.float64)
    W0 = layer.weight.detach().clone()
    (delta,) = spectral.reparameterize(net, relative=True)
    (mix,) = spectral.add_mixing(net, band=1)
    with torch.no_grad():
        delta.copy_(torch.randn_like(delta) * 0.3)
        mix.copy_(torch.randn_like(mix) * 0.3)
    layer(x).square().sum().backward()
    U, S, Vh, mask = layer.spectral_U, layer.spectral_S, layer.spectral_Vh, layer.spectral_mix_mask
    k = S.shape[0]
    assert mask.sum() == 2 * (k - 1) and torch.all(torch.diagonal(mask) == 0)
    d = delta.detach().clone().requires_grad_(True)
    o = mix.detach().clone().requires_grad_(True)
    core = torch.diag(torch.relu(S * (1 + d)) - S) + o * mask
    W = W0.flatten(1) + U @ core @ Vh
    out = F.linear(x, W, layer.bias) if isinstance(layer, nn.Linear) else F.conv2d(
        x, W.reshape(W0.shape), layer.bias, padding=1)
    out.square().sum().backward()
    assert torch.allclose(delta.grad, d.grad, atol=1e-8)
    assert torch.allclose(mix.grad, o.grad, atol=1e-8)
    assert torch.all(mix.grad[mask == 0] == 0)
    assert torch.allclose(layer.weight.detach().flatten(1), W.detach(), atol=1e-10)
    spectral.merge(net)
    assert not hasattr(layer, "spectral_mix") and not hasattr(layer, "spectral_mix_mask")
    assert torch.allclose(layer.weight.detach().flatten(1), W.detach(), atol=1e-10)


def test_mixing_state_dict_round_trip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4).double())
    spectral.reparameterize(net, relative=True)
    (mix,) = spectral.add_mixing(net, band=2)
    with torch.no_grad():
        mix.add_(0.1)
        net[0].spectral_delta.add_(0.2)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = net(x)
    sd = copy.deepcopy(net.state_dict())
    net2 = nn.Sequential(nn.Linear(6, 4).double())
    spectral.reparameterize(net2, relative=True)
    spectral.add_mixing(net2, band=2)
    net2.load_state_dict(sd)
    assert torch.allclose(net2(x), y)
    with torch.no_grad():                              # and from the loaded point it follows δ, O again
        net2[0].spectral_mix.zero_()
        net2[0].spectral_delta.zero_()
    W0 = net2[0].weight.detach().clone()
    net2(x)
    assert not torch.allclose(net2[0].weight, W0)


@pytest.mark.parametrize("opt", ["fip", "sgd"])
def test_mixing_runs_in_the_pipeline_and_rotates_singular_vectors(data, opt):
    model, clean = data
    kw = {"clip_norm": 1.0} if opt == "sgd" else {}
    m, rep = _run(model, clean, delta_optimizer=opt, mix_band=2, lr_delta=0.5, **kw)
    assert rep.skipped_steps == 0 and not spectral.spectral_layers(m)
    fresh = TinyCNN()
    fresh.load_state_dict(m.state_dict())
    U0, S0, V0 = torch.linalg.svd(model.fc1.weight.detach(), full_matrices=False)
    M = U0.t() @ m.fc1.weight.detach() @ V0.t()
    off = M - torch.diag(torch.diagonal(M))
    assert off.abs().max() > 1e-4                      # no longer diagonal in W0's basis: U, V moved
    i = torch.arange(M.shape[0])
    assert off[(i[:, None] - i[None, :]).abs() > 2].abs().max() < 1e-4     # only within the band


def test_mixing_bad_options_name_the_input(data):
    model, clean = data
    with pytest.raises(ValueError, match="mix_band"):
        _run(model, clean, mix_band=-1)
    with pytest.raises(ValueError, match="eta_r"):
        _run(model, clean, mix_band=1, eta_r=1.0)
    with pytest.raises(ValueError, match="lr_mix"):
        _run(model, clean, lr_mix=0.1)
    with pytest.raises(ValueError, match="band"):
        spectral.add_mixing(nn.Sequential(nn.Linear(3, 3)), band=0)
