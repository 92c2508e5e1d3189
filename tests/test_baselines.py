"""Baselines (fip_fast.baselines): each core step against a hand-written reference, and a tiny backdoor end to end.

* K-FAC factors vs explicit covariances (Linear and strided/padded Conv2d, with and without bias; EMA).
* K-FAC preconditioned update vs (G + λ_G I)⁻¹ ∇W̃ (A + λ_A I)⁻¹ computed explicitly (plain and π-split damping).
* SAM step vs its two-pass definition (plain and adaptive, with momentum, two steps).
* Diagonal NGF step vs its formula (Fisher EMA through ops.fisher_accumulate_, bias correction, anchor, KL clip).
* Benign salience vs an explicit per-neuron grad × weight loop; the adaptive regularizer's gradient; selection.
* End to end on a synthetic 4-class backdoor (8×8 images, blend trigger, a small CNN trained in seconds).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast.baselines import KFAC, SAM, NaturalGradient, run_ft, run_ft_sam, run_ngf, run_salience_ar
from fip_fast.baselines.ngf import kfac_factors_explicit
from fip_fast.baselines.salience_ar import (
    adaptive_reg,
    adaptive_reg_grad,
    adaptive_reg_step_,
    benign_salience,
    neuron_layers,
    neuron_magnitude,
    select_infected,
    suspicion_scores,
)

D = torch.float64


# ------------------------------------------------------------------------------------------------ K-FAC
def _per_sample_out_grads(model, layer, x, y):
    """∂ℓ_n/∂s_n for every sample (sum of per-sample losses: each sample's output only feeds its own loss)."""
    store = {}

    def hook(m, i, o):   # a tensor hook (not retain_grad): right even if a later ReLU(inplace=True) rewrites o
        o.register_hook(lambda g: store.__setitem__("g", g.detach().clone()))

    h = layer.register_forward_hook(hook)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    h.remove()
    model.zero_grad(set_to_none=True)
    return store["g"]


def _layer_input(model, layer, x):
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0].detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return store["x"]


def _conv_net(bias=True):
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4, bias=bias)).to(D)


def _linear_net(bias=True):
    return nn.Sequential(nn.Linear(5, 6, bias=bias), nn.ReLU(inplace=True), nn.Linear(6, 3, bias=bias)).to(D)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv", "linear_hidden"])
def test_kfac_factors_equal_explicit_covariances(kind, bias):
    torch.manual_seed(0)
    if kind == "conv":
        net, x = _conv_net(bias), torch.randn(4, 2, 5, 5, dtype=D)
        layer = net[0]
    else:
        net, x = _linear_net(bias), torch.randn(7, 5, dtype=D)
        # "linear_hidden" is followed by ReLU(inplace=True): the tensor hook must still see ∂ℓ/∂s.
        layer = net[0] if kind == "linear_hidden" else net[2]
    y = torch.randint(0, net[-1].out_features, (x.shape[0],))
    g_ps = _per_sample_out_grads(net, layer, x, y)
    kfac = KFAC([layer], ema=0.9, damping=0.1)
    F.cross_entropy(net(x), y).backward()          # a batch-*mean* loss: KFAC rescales by B
    A_hat, G_hat = kfac.batch_factors(layer)
    A_ref, G_ref = kfac_factors_explicit(layer, _layer_input(net, layer, x), g_ps)
    torch.testing.assert_close(A_hat.double(), A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G_hat.double(), G_ref, rtol=1e-10, atol=1e-12)
    # EMA: the first update initializes, the second mixes.
    kfac.update()
    torch.testing.assert_close(kfac.state[layer]["A"].double(), A_ref)
    x2, y2 = x.flip(0) * 0.5 + 0.1, y.flip(0)
    kfac.capture = False
    g2 = _per_sample_out_grads(net, layer, x2, y2)
    kfac.capture = True
    A2, G2 = kfac_factors_explicit(layer, _layer_input(net, layer, x2), g2)
    net.zero_grad()
    F.cross_entropy(net(x2), y2).backward()
    kfac.update()
    torch.testing.assert_close(kfac.state[layer]["A"].double(), 0.9 * A_ref + 0.1 * A2)
    torch.testing.assert_close(kfac.state[layer]["G"].double(), 0.9 * G_ref + 0.1 * G2)
    kfac.remove()


@pytest.mark.parametrize("pi_split", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kfac_update_equals_explicit_formula(kind, pi_split):
    torch.manual_seed(1)
    if kind == "conv":
        net, x = _conv_net(), torch.randn(5, 2, 5, 5, dtype=D)
        layer = net[0]
    else:
        net, x = _linear_net(), torch.randn(9, 5, dtype=D)
        layer = net[2]
    y = torch.randint(0, net[-1].out_features, (x.shape[0],))
    lam = 0.05
    kfac = KFAC([layer], ema=0.9, damping=lam, pi_split=pi_split, inv_every=1)
    F.cross_entropy(net(x), y).backward()
    A_hat, G_hat = kfac.batch_factors(layer)
    kfac.update()
    V = kfac.precondition()
    A, G = A_hat.double(), G_hat.double()
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])) if pi_split else 1.0
    grad = torch.cat([layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], 1)
    expect = torch.linalg.solve(G + lam / pi * torch.eye(G.shape[0], dtype=D),
                                torch.linalg.solve(A + lam * pi * torch.eye(A.shape[0], dtype=D), grad.t()).t())
    torch.testing.assert_close(V[layer.weight].double().reshape(layer.weight.shape[0], -1), expect[:, :-1])
    torch.testing.assert_close(V[layer.bias].double(), expect[:, -1])
    assert kfac.dampings(layer) == pytest.approx((lam * pi, lam / pi))
    kfac.remove()


def test_kfac_inverse_refresh_schedule():
    torch.manual_seed(2)
    net, layer = _linear_net(), None
    layer = net[2]
    kfac = KFAC([layer], damping=0.1, inv_every=3)
    invs = []
    for t in range(5):
        x = torch.randn(6, 5, dtype=D)
        net.zero_grad()
        F.cross_entropy(net(x), torch.randint(0, 3, (6,))).backward()
        kfac.update()
        invs.append(kfac.state[layer]["A_inv"].clone())
    # recomputed at updates 0 and 3, kept in between
    assert torch.equal(invs[0], invs[1]) and torch.equal(invs[1], invs[2])
    assert not torch.equal(invs[2], invs[3]) and torch.equal(invs[3], invs[4])
    kfac.remove()


# ------------------------------------------------------------------------------------------------ SAM
def _loss_at(model, params, values, x, y):
    with torch.no_grad():
        saved = [p.clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    loss = F.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return [gi.detach() for gi in g]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_two_pass_definition(adaptive):
    torch.manual_seed(3)
    model = _linear_net().to(D)
    params = list(model.parameters())
    x, y = torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,))
    rho, lr, mu, eta = 0.1, 0.05, 0.9, 0.01
    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=lr, momentum=mu)
    theta = [p.detach().clone() for p in params]
    buf = None
    for _ in range(2):
        g1 = _loss_at(model, params, theta, x, y)
        if adaptive:
            T = [t.abs() + eta for t in theta]
            norm = torch.sqrt(sum(((Ti * gi) ** 2).sum() for Ti, gi in zip(T, g1)))
            e = [rho * Ti ** 2 * gi / norm for Ti, gi in zip(T, g1)]
        else:
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in g1))
            e = [rho * gi / norm for gi in g1]
        g2 = _loss_at(model, params, [t + ei for t, ei in zip(theta, e)], x, y)
        buf = g2 if buf is None else [mu * b + g for b, g in zip(buf, g2)]
        theta = [t - lr * b for t, b in zip(theta, buf)]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        for p, t in zip(params, theta):
            torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-12)
    assert opt.skipped_steps == 0


def test_sam_skips_nonfinite_and_restores():
    model = _linear_net().to(D)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
        return torch.zeros(())

    opt.step(closure)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(RuntimeError):
        opt.step()


# ------------------------------------------------------------------------------------------------ diag NGF
@pytest.mark.parametrize("kl_clip", [None, 1e-4])
def test_diag_ngf_step_matches_formula(kl_clip):
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(4, 3))
    w0 = w.detach().clone()
    f0 = torch.rand(4, 3)
    lr, mu, beta, lam, eta_r = 0.1, 0.9, 0.8, 0.05, 0.5
    opt = NaturalGradient([w], lr=lr, momentum=mu, curvature="diag", beta=beta, damping=lam, kl_clip=kl_clip,
                          eta_r=eta_r, fisher0={w: f0}, impl="reference")
    fisher = torch.zeros(4, 3)
    buf = None
    theta = w0.clone()
    for t in range(1, 4):
        g = torch.randn(4, 3)
        w.grad = g.clone()
        opt.step()
        fisher = beta * fisher + (1 - beta) * g ** 2
        V = g / (fisher / (1 - beta ** t) + lam)
        nu = 1.0 if kl_clip is None else min(1.0, math.sqrt(kl_clip / (lr ** 2 * float((V * g).sum()))))
        d = nu * V + eta_r * f0 * (theta - w0)
        buf = d if buf is None else mu * buf + d
        theta = theta - lr * buf
        torch.testing.assert_close(w.detach(), theta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[w]["fisher"], fisher)
    if kl_clip is not None:
        assert opt.last_nu < 1.0   # the clip was active in this configuration


def test_ngf_skips_nonfinite():
    w = nn.Parameter(torch.ones(3))
    opt = NaturalGradient([w], curvature="diag")
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(w.detach(), torch.ones(3)) and "fisher" not in opt.state[w]


# ------------------------------------------------------------------------------------------------ salience
def _salience_net():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3)).to(D)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


def test_benign_salience_equals_explicit_grad_times_weight():
    net = _salience_net()
    batches = [(torch.randn(5, 1, 8, 8, dtype=D), torch.randint(0, 3, (5,))),
               (torch.randn(3, 1, 8, 8, dtype=D), torch.randint(0, 3, (3,)))]
    layers = neuron_layers(net)
    assert [n for n, _ in layers] == ["0", "5"]        # the output layer "7" is excluded
    sal = benign_salience(net, batches, layers)
    for name, mod in layers:
        expect = torch.zeros(mod.weight.shape[0], dtype=D)
        for x, y in batches:
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            for j in range(mod.weight.shape[0]):
                t = 0.0
                for w_ji, g_ji in zip(mod.weight[j].flatten().tolist(), mod.weight.grad[j].flatten().tolist()):
                    t += g_ji * w_ji
                t += float(mod.bias.grad[j]) * float(mod.bias.detach()[j])
                expect[j] += x.shape[0] * abs(t)
        torch.testing.assert_close(sal[name].double(), expect / 8, rtol=1e-5, atol=1e-9)
    # magnitude of a conv feeding a BatchNorm = the folded weight's row norm
    bn = net[1]
    folded = net[0].weight.detach() * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    torch.testing.assert_close(neuron_magnitude(net, net[0]).double(), folded.flatten(1).norm(dim=1))
    torch.testing.assert_close(neuron_magnitude(net, net[5]).double(), net[5].weight.detach().norm(dim=1))


def test_suspicion_flags_large_dormant_neuron():
    net = _salience_net()
    with torch.no_grad():   # hidden unit 2: large incoming weights but a bias that keeps it off on clean data
        net[5].weight[2].mul_(5.0)
        net[5].bias[2] = -1e3
    batches = [(torch.randn(16, 1, 8, 8, dtype=D), torch.randint(0, 3, (16,)))]
    layers = neuron_layers(net)
    sal = benign_salience(net, batches, layers)
    assert float(sal["5"][2]) == 0.0
    scores = suspicion_scores(net, sal, layers)
    assert int(scores["5"].argmax()) == 2
    masks = select_infected(scores, 0.2)
    assert masks["5"].sum() == 2 and masks["5"][2] and masks["0"].sum() == 1


def test_adaptive_regularizer_gradient():
    torch.manual_seed(6)
    w = torch.randn(5, 3, 2, 2, dtype=D, requires_grad=True)
    mask = torch.tensor([True, False, True, False, False])
    scale, lam = 0.7, 0.3
    (g,) = torch.autograd.grad(adaptive_reg(w, mask, scale, lam), w)
    torch.testing.assert_close(g, adaptive_reg_grad(w.detach(), mask, scale, lam))
    expect = lam * w.detach().abs() * w.detach() / scale
    expect[~mask] = 0
    torch.testing.assert_close(g, expect)
    # the runner's semi-implicit step: the explicit step divided by (1 + lr·λ·|w|/scale); shrinks, never flips sign
    lr = 5.0
    stepped = adaptive_reg_step_(w.detach().clone(), mask, scale, lam, lr)
    shrink = 1 + lr * lam * w.detach().abs() / scale * mask.view(-1, 1, 1, 1)
    torch.testing.assert_close(stepped, w.detach() - lr * expect / shrink)
    assert (stepped.abs() <= w.detach().abs()).all() and (stepped * w.detach() >= 0).all()
    # value: (λ/3)·Σ|w|³/scale over the masked rows
    val = adaptive_reg(w.detach(), mask, scale, lam)
    assert float(val) == pytest.approx(lam / 3 * float(w.detach()[mask].abs().pow(3).sum()) / scale)


# ------------------------------------------------------------------------------------------------ end to end
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bars import acc_asr as _acc_asr  # noqa: E402
from _bars import backdoored_bars  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored(one_thread):
    return backdoored_bars()


def test_synthetic_backdoor_is_planted(backdoored):
    net, _, test, trig = backdoored
    acc, asr = _acc_asr(net, test, trig)
    assert acc > 0.97 and asr > 0.95


def test_ft_sam_lowers_asr_and_keeps_accuracy(backdoored):
    net, clean, test, trig = backdoored
    _, asr0 = _acc_asr(net, test, trig)
    m, info = run_ft_sam(copy.deepcopy(net), clean, steps=60, batch_size=32, progress=False)
    acc, asr = _acc_asr(m, test, trig)
    assert asr < 0.5 * asr0 and acc > 0.95
    assert info["trainable_params"] == sum(p.numel() for p in net.parameters())


# FT, NGF and Salience-AR run through, keep the clean accuracy and change what they should — but at their
# defaults they do NOT lower the ASR of this backdoor.  The defaults were re-chosen (lr, weight decay, cosine
# schedule; Salience-AR's fraction / λ; NGF's weight decay) by the clean-data rule documented in
# fip_fast/baselines/__init__.py: the strongest pressure whose clean-val accuracy stays within 0.03 of the start on
# this task (seeds 0, 1, 2) *and* on the MNIST demo (badnets, blend).  Measured (60 steps, batch 32, seeds 0/1/2):
#   ft           lr 0.02, wd 0.01:  ASR 1.00 / 1.00 / 1.00.  FT does purify here at lr·wd ≥ 3e-3 (lr 0.1, wd 0.03:
#                ASR 0.00 / 0.00 / 0.03), but at that pressure the MNIST demo loses 7–20 clean-val points.
#   ngf          K-FAC and diagonal, classifier layer only: ASR 1.00 at the defaults; no tried setting (lr ≤ 0.3,
#                wd ≤ 0.3) took seed 0 below 0.75 — the trigger lives in the features, the classifier alone
#                cannot drop it with clean data.
#   salience_ar  fraction 0.3, lr 0.05, λ 1: ASR 1.00 / 1.00 / 1.00; fraction 0.5 lowers it (0.04 / 0.47 / 0.28 at
#                lr 0.05) but fails the clean-val margin on the MNIST demo.
# The xfail tests record that; they are not skipped, so a change that makes a baseline purify shows up as XPASS.
_NO_PURIFY = pytest.mark.xfail(reason="measured: ASR stays ≈100 % at the clean-val-selected defaults (see comment)",
                               strict=False)


@pytest.fixture(scope="module")
def baseline_runs(backdoored):
    net, clean, _, _ = backdoored
    kw = dict(steps=60, batch_size=32, progress=False)
    return {"ft": run_ft(copy.deepcopy(net), clean, **kw),
            "ngf_kfac": run_ngf(copy.deepcopy(net), clean, **kw),
            "ngf_diag": run_ngf(copy.deepcopy(net), clean, curvature="diag", **kw),
            "salience_ar": run_salience_ar(copy.deepcopy(net), clean, **kw)}


@pytest.mark.parametrize("name", ["ft", "ngf_kfac", "ngf_diag", "salience_ar"])
def test_other_baselines_run_and_keep_accuracy(backdoored, baseline_runs, name):
    net, clean, test, trig = backdoored
    m, info = baseline_runs[name]
    acc, _ = _acc_asr(m, test, trig)
    assert acc > 0.95 and info["steps"] == 60 and info["skipped_steps"] == 0
    moved = {n for (n, p), (_, q) in zip(m.named_parameters(), net.named_parameters()) if not torch.equal(p, q)}
    if name.startswith("ngf"):     # only the classifier (the last Linear) trains
        assert moved == {"7.weight", "7.bias"} and info["trainable_params"] == 32 * 4 + 4
    elif name == "salience_ar":
        f = info["fraction"]
        assert moved and sum(len(v) for v in info["infected"].values()) == math.ceil(f * 8) + math.ceil(f * 32)
    else:
        assert len(moved) == len(list(m.parameters()))
    assert all(p.requires_grad for p in m.parameters())


@_NO_PURIFY
@pytest.mark.parametrize("name", ["ft", "ngf_kfac", "ngf_diag", "salience_ar"])
def test_other_baselines_lower_asr(backdoored, baseline_runs, name):
    _, _, test, trig = backdoored
    _, asr = _acc_asr(baseline_runs[name][0], test, trig)
    assert asr < 0.5


# Each baseline's purifying mechanism does work on this backdoor once its pressure knob is turned up past what the
# clean-val rule accepts on the MNIST demo (so these are not the defaults; measured 60 steps, batch 32, seeds 0/1/2,
# ACC / ASR):
#   ft           lr 0.1, wd 0.03 (weight decay shrinks the trigger weights clean data do not use):
#                1.00/0.00, 1.00/0.00, 1.00/0.00
#   ngf (K-FAC)  damping 1e-3, no KL clip (natural-gradient steps are large along rarely-active features):
#                1.00/0.32, 0.98/0.00, 0.88/0.35.  On the MNIST demo this damping takes clean ACC to 17–36 %.
#                The diagonal version lowered ASR only on the first conv layer (damping 1e-3: 0.86/0.73/0.51).
#   salience_ar  fraction 0.5, λ 10 (half of every ranked layer's neurons under a strong adaptive regularizer):
#                1.00/0.20, 1.00/0.13, 1.00/0.25
_MECHANISM = {"ft": (run_ft, dict(lr=0.1, weight_decay=0.03)),
              "ngf_kfac": (run_ngf, dict(damping=1e-3, kl_clip=None)),
              "salience_ar": (run_salience_ar, dict(fraction=0.5, lam=10.0))}


@pytest.mark.parametrize("name", sorted(_MECHANISM))
def test_baseline_mechanism_lowers_asr_at_higher_pressure(backdoored, name):
    net, clean, test, trig = backdoored
    fn, kw = _MECHANISM[name]
    m, info = fn(copy.deepcopy(net), clean, steps=60, batch_size=32, progress=False, **kw)
    acc, asr = _acc_asr(m, test, trig)
    assert asr < 0.5 and acc > 0.95 and info["skipped_steps"] == 0


def test_registered_with_purify(backdoored):
    purify_mod = pytest.importorskip("fip_fast.pipeline")
    assert {"ft", "ft_sam", "ngf", "salience_ar"} <= set(purify_mod.available_methods())
    net, clean, _, _ = backdoored
    m, rep = purify_mod.purify(copy.deepcopy(net), clean, method="ngf", steps=5, batch_size=16, progress=False,
                               curvature="diag")
    assert rep.steps_run == 5 and rep.trainable_params == 32 * 4 + 4 and rep.extra["curvature"] == "diag"


def test_tensor_pair_and_loader_inputs_agree():
    torch.manual_seed(7)
    net = _linear_net().to(torch.float32)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    m1, i1 = run_ft(copy.deepcopy(net), loader, steps=4, progress=False)   # cycles the two batches
    m2, i2 = run_ft(copy.deepcopy(net), loader * 2, steps=4, progress=False)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)
    _, i3 = run_ft(copy.deepcopy(net), (x, y), steps=3, batch_size=4, progress=False)
    assert i3["steps"] == 3 and i1["trainable_params"] == sum(p.numel() for p in net.parameters())


def test_ngf_on_a_named_conv_layer(backdoored):
    net, clean, _, _ = backdoored
    m, info = run_ngf(copy.deepcopy(net), clean, steps=3, batch_size=16, layer="0", progress=False)
    assert info["layer"] == "0" and info["trainable_params"] == 8 * 9 + 8
    moved = {n for (n, p), (_, q) in zip(m.named_parameters(), net.named_parameters()) if not torch.equal(p, q)}
    assert moved == {"0.weight", "0.bias"}
    with pytest.raises(ValueError, match="no sub-module"):
        run_ngf(copy.deepcopy(net), clean, steps=1, layer="nope", progress=False)


@pytest.mark.parametrize("name", ["ft", "fst", "sau", "superft", "salience_ar"])
def test_runners_count_the_steps_they_skip(backdoored, name):
    """A runner that skips a step with a non-finite gradient inside its own loop counts it once in
    ``info["skipped_steps"]`` (RunLog.skip) and reports it to ``on_step`` with a NaN loss; the weights stay finite."""
    from fip_fast.baselines import RUNNERS

    net, clean, _, _ = backdoored
    poison = {"on": False}

    def loss_fn(out, y):          # NaN for the whole of step 3 (switched by the hook after step 2)
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if poison["on"] else loss

    seen = []

    def on_step(done, loss):
        seen.append((done, loss))
        poison["on"] = done == 2

    m, info = RUNNERS[name][0](copy.deepcopy(net), clean, steps=5, batch_size=16, progress=False, loss_fn=loss_fn,
                               on_step=on_step)
    assert info["skipped_steps"] == 1
    assert [d for d, _ in seen] == [1, 2, 3, 4, 5] and math.isnan(seen[2][1])
    assert not any(math.isnan(v) for d, v in seen if d != 3)
    assert all(torch.isfinite(p).all() for p in m.parameters())
