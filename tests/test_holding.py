"""fip_fast.pipeline.holding: each mechanism does what it claims (tiny synthetic backdoor, CPU, one thread)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _resume import uninterrupted_and_resumed  # tests/ is on sys.path
from _synthetic import small_cnn
from test_purify import TARGET, _images, backdoored_tiny_cnn
from torch import nn

from fip_fast import pipeline as P
from fip_fast.pipeline import holding as H
from fip_fast.pipeline._distill import distill_term
from fip_fast.pipeline.methods import DEFAULTS, build_fip
from fip_fast.pipeline.purifier import MethodContext, OptimizerPurifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored(one_thread):
    """The backdoored TinyCNN of tests/test_purify.py, its clean set and test set."""
    return backdoored_tiny_cnn()


def _ctx(x, y, seed: int = 0) -> MethodContext:
    return MethodContext(x, y, torch.device("cpu"), F.cross_entropy, seed, False)


# ------------------------------------------------------------------------------------ universal perturbation
def _updated(model, xc, yc, cfg, n: int):
    """A _Universal of ``cfg`` after ``n`` updates on seeded clean batches of 64; the generator, for more draws."""
    u = H._Universal(cfg, xc, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        i = torch.randint(xc.shape[0], (64,), generator=g)
        u.update(model, xc[i], yc[i])
    return u, g


def _target_rate(model, x) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == TARGET).float().mean())


@pytest.mark.parametrize("objective", ["loss", "attract"])
def test_universal_perturbation_finds_the_backdoor(backdoored, objective):
    """20 per-batch updates of δ (eps 0.2) on clean batches send most clean non-target test images of the backdoored
    model to the target class; no perturbation and a random sign pattern of the same L∞ norm send none."""
    model, (xc, yc), (xt, yt) = backdoored
    u, g = _updated(model, xc, yc, H.UniversalPerturbation(eps=0.2, objective=objective, scale="absolute"), 20)
    keep = yt != TARGET

    def target_rate(x):
        return _target_rate(model, x)

    rand = torch.sign(torch.randn(xc.shape[1:], generator=g)) * 0.2
    assert float(u.delta.abs().max()) <= 0.2 + 1e-7
    assert target_rate(xt[keep]) < 0.05
    assert target_rate(u.perturb(xt[keep], rand)) < 0.2
    assert target_rate(u.perturb(xt[keep])) > 0.8
    if objective == "attract":
        assert u.attracted == TARGET


def test_universal_perturbation_mixes_a_fraction_with_true_labels(backdoored):
    """The purifier replaces the first ⌊fraction·B⌉ samples by x + δ and trains on the unchanged labels."""
    model, (xc, yc), _ = backdoored
    m = copy.deepcopy(model)
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()) if mod.training else None)
    # separate: δ moves before the step, so the first training forward already sees it
    opts = dict(DEFAULTS["fip"], universal_perturbation=dict(eps=0.2, fraction=0.25, gradient="separate"),
                distill=None)
    for k in ("steps", "batch_size", "patience", "lr_schedule", "augment"):
        opts.pop(k)
    pur = build_fip(m, _ctx(xc, yc), **opts)
    assert isinstance(pur, H.HoldingPurifier)
    x, y = xc[:64], yc[:64]
    pur.step(x, y)
    d = pur.universal.delta
    assert float(d.abs().max()) > 0
    lo, hi = float(xc.min()), float(xc.max())      # clamp: the clean set's range
    assert torch.equal(seen[0][:16], (x[:16] + d).clamp(lo, hi)) and torch.equal(seen[0][16:], x[16:])
    assert not torch.equal(seen[0][:16], x[:16])


def test_universal_append_and_lr_schedule(backdoored):
    """placement="append": perturbed copies of the first ⌊fraction·B⌉ samples join the batch (labels copied, the
    clean samples all kept); schedule="lr": that share follows lr / the largest lr so far, down to none."""
    model, (xc, yc), _ = backdoored
    m, seen = copy.deepcopy(model), []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()) if mod.training else None)
    pur = build_fip(m, _ctx(xc, yc), **_fip_opts(eta_F=0.0),
                    universal_perturbation=dict(placement="append", schedule="lr", gradient="separate"))
    x, y = xc[:64], yc[:64]
    lr0 = pur.optimizer.param_groups[0]["lr"]
    sizes, deltas = [], []
    for scale in (1.0, 0.25, 0.0):
        for g in pur.optimizer.param_groups:
            g["lr"] = lr0 * scale
        pur.step(x, y)
        sizes.append(seen[-1].shape[0])
        deltas.append(pur.universal.delta.clone())      # "separate": δ moved before the step that used it
    assert sizes == [96, 72, 64]
    d = deltas[1]
    lo, hi = float(xc.min()), float(xc.max())
    assert float(d.abs().max()) > 0 and torch.equal(seen[1][:64], x)
    torch.testing.assert_close(seen[1][64:], (x[:8] + d).clamp(lo, hi), rtol=0, atol=0)


def _fip_opts(**kw) -> dict:
    """FIP's default builder options, without the loop's and without the holding options the tests set."""
    o = {k: v for k, v in DEFAULTS["fip"].items()
         if k not in ("steps", "batch_size", "patience", "lr_schedule", "augment", "universal_perturbation",
                      "distill")}
    o.update(kw)
    return o


def test_universal_shared_gradient_is_the_training_loss(backdoored):
    """gradient="shared" (the default with objective "loss"): after one step without the suppressor, δ is
    step·sign(∂ℓ/∂δ), ℓ the training loss of the mixed batch at the pre-step weights, in train mode — computed
    here independently through clamp(x + δ)."""
    model, (xc, yc), _ = backdoored
    x, y = xc[:64], yc[:64]
    lo, hi = float(xc.min()), float(xc.max())
    ref = copy.deepcopy(model).train()
    d0 = torch.full(xc.shape[1:], 0.15)
    d = d0.clone().requires_grad_(True)
    xm = torch.cat([(x[:32] + d).clamp(lo, hi), x[32:]])
    (g,) = torch.autograd.grad(F.cross_entropy(ref(xm), y), d)
    assert int((g != 0).sum()) > 10
    pur = build_fip(copy.deepcopy(model), _ctx(xc, yc), **_fip_opts(eta_F=0.0),
                    universal_perturbation=dict(eps=0.2, gradient="shared", scale="absolute"))
    assert pur.universal.cfg.shared
    pur.universal.delta.copy_(d0)
    pur.step(x, y)
    torch.testing.assert_close(pur.universal.delta, (d0 + 0.02 * g.sign()).clamp(-0.2, 0.2), rtol=0, atol=1e-7)


def test_universal_shared_finds_the_backdoor(backdoored):
    """The shared update alone (the training backward's input gradient, train mode, the model not stepped) sends
    most clean non-target test images of the backdoored model to the target class within 20 batches."""
    model, (xc, yc), (xt, yt) = backdoored
    u = H._Universal(H.UniversalPerturbation(eps=0.2, gradient="shared", scale="absolute"), xc, torch.device("cpu"))
    work = copy.deepcopy(model).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        i = torch.randint(xc.shape[0], (64,), generator=g)
        xm, _ = u.mix(xc[i], yc[i])
        F.cross_entropy(work(xm), yc[i]).backward()
        u.update_shared(xm)
    keep = yt != TARGET
    with torch.no_grad():
        assert float((model(u.perturb(xt[keep])).argmax(1) == TARGET).float().mean()) > 0.8


@pytest.mark.parametrize("gradient, forwards", [("shared", 6), ("separate", 9)])
def test_universal_shared_costs_no_extra_forward(backdoored, gradient, forwards):
    """With the fd suppressor (two forwards per step), the shared gradient adds no forward; separate adds one."""
    model, (xc, yc), _ = backdoored
    m, n = copy.deepcopy(model), [0]
    m.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    pur = build_fip(m, _ctx(xc, yc), **_fip_opts(trace_every=1), universal_perturbation=dict(gradient=gradient))
    n[0] = 0                    # the steps' forwards (not the calibration's, once in build_fip)
    for _ in range(3):
        pur.step(xc[:64], yc[:64])
    assert n[0] == forwards


# ------------------------------------------------------------------------------------------------- path aware
def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _plain_sgd(model, ctx, path_aware, **kw):
    o = dict(lr=0.1, rho=0.5, momentum=0.0, weight_decay=0.0, eta_F=0.0, eta_r=0.0, trace_every=1,
             trace_estimator="fd", max_mix=1.0)
    o.update(kw)
    return build_fip(model, ctx, path_aware=path_aware, **o)


@pytest.mark.parametrize("relative", [False, True])
def test_path_aware_step_uses_the_gradient_at_the_shifted_point(relative):
    """With plain SGD (no momentum, decay or suppressor): the gradient is that of w + ρ·(θ0 − w)/‖θ0 − w‖ (with
    ``relative``: w + ρ·(θ0 − w)) and the new weights are w − lr·that gradient (not the gradient at w)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(3, (32,), generator=g)
    model = _mlp()
    theta0 = [p.detach().clone() for p in model.parameters()]
    pur = _plain_sgd(model, _ctx(x, y), dict(rho=0.5, relative=relative))
    pur.step(x, y)                  # at w = θ0 the direction is undefined: a plain step, w moves off θ0
    w = [p.detach().clone() for p in model.parameters()]
    diff = [a - b for a, b in zip(theta0, w)]
    norm = torch.sqrt(sum((d * d).sum() for d in diff))
    assert norm > 0
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, wi, d in zip(ref.parameters(), w, diff):
            p.copy_(wi + 0.5 * d / (1.0 if relative else norm))
    F.cross_entropy(ref(x), y).backward()
    g_shift = [p.grad for p in ref.parameters()]
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    assert max(float((a - b.grad).abs().max()) for a, b in zip(g_shift, plain.parameters())) > 1e-3
    pur.step(x, y)
    for p, wi, gs in zip(model.parameters(), w, g_shift):
        torch.testing.assert_close(p.grad, gs, rtol=1e-10, atol=1e-12)
        # the FIP step's arithmetic is fp32 (docs/method.md): 1e-7 here, against a 1e-4 gap to w − lr·∇ℓ(w)
        torch.testing.assert_close(p.detach(), wi - 0.1 * gs, rtol=0, atol=1e-7)


def test_path_aware_costs_no_extra_forward():
    """With the fd suppressor on, a step runs two forwards with or without path_aware."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(3, (32,), generator=g)
    counts = []
    for pa in (None, 0.5):
        model, n = _mlp(), [0]
        model.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        pur = _plain_sgd(model, _ctx(x, y), pa, eta_F=0.005)
        for _ in range(3):
            pur.step(x, y)
        counts.append(n[0])
    assert counts == [6, 6]


def test_path_aware_refuses_estimators_outside_the_closure():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g)
    with pytest.raises(ValueError, match="path_aware needs trace_estimator='fd'"):
        _plain_sgd(_mlp(), _ctx(x, y), 0.5, eta_F=0.005, trace_estimator="batch")


# --------------------------------------------------------------------------------------- reactivation aware
@pytest.mark.parametrize("relative", [False, True])
def test_reactivation_aware_step_uses_the_gradient_at_the_shifted_point(relative):
    """With plain SGD and every row perturbed: g = ∂CE(f(x + δ), y)/∂w at the δ before this step's update, the
    step's gradient is that of the mixed batch (x + δ', δ' = δ after the update) at w + r·g/‖g‖ (r = ρ, or ρ·‖w‖
    with ``relative``), and the new weights are w − lr·that gradient."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(3, (32,), generator=g)
    model = _mlp()
    up = dict(eps=0.3, scale="absolute", fraction=1.0, schedule="constant")
    pur = _plain_sgd(model, _ctx(x, y), None, universal_perturbation=up,
                     reactivation_aware=dict(rho=0.2, relative=relative))
    pur.step(x, y)                                   # δ = 0 before the first update: move it off zero first
    u = pur.universal
    w, d_before = [p.detach().clone() for p in model.parameters()], u.delta.clone()
    ref = copy.deepcopy(model)
    # the perturbation's objective is the cross-entropy of the fp32-cast outputs (as for any model dtype)
    gw = torch.autograd.grad(F.cross_entropy(ref(u.perturb(x, d_before)).float(), y), list(ref.parameters()))
    r = 0.2 * (float(torch.sqrt(sum((wi * wi).sum() for wi in w))) if relative else 1.0)
    norm = torch.sqrt(sum((gi * gi).sum() for gi in gw))
    pur.step(x, y)
    assert not torch.equal(u.delta, d_before)        # the update ran before the mix
    with torch.no_grad():
        for p, wi, gi in zip(ref.parameters(), w, gw):
            p.copy_(wi + r * gi / norm)
    g_shift = torch.autograd.grad(F.cross_entropy(ref(u.perturb(x)), y), list(ref.parameters()))
    at_w = _with(model, w)
    plain = torch.autograd.grad(F.cross_entropy(at_w(u.perturb(x)), y), list(at_w.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(g_shift, plain)) > 1e-3
    for p, wi, gs in zip(model.parameters(), w, g_shift):
        torch.testing.assert_close(p.grad, gs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.detach(), wi - 0.1 * gs, rtol=0, atol=1e-7)


def _with(model: nn.Module, w) -> nn.Module:
    """A copy of ``model`` holding the weights ``w``."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, wi in zip(m.parameters(), w):
            p.copy_(wi)
    return m


def test_reactivation_aware_costs_no_extra_forward_and_needs_a_separate_perturbation():
    """The direction comes from the perturbation's own pass: with the fd suppressor, a step runs the same three
    forwards with or without it (perturbation, w, w + e); without a separate-gradient perturbation it is refused."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(3, (32,), generator=g)
    up = dict(eps=0.3, scale="absolute")
    counts = []
    for ra in (None, 0.05):
        model, n = _mlp(), [0]
        model.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        pur = _plain_sgd(model, _ctx(x, y), None, eta_F=0.005, universal_perturbation=up, reactivation_aware=ra)
        n[0] = 0                # the steps' forwards (not the calibration's, once in build_fip)
        for _ in range(3):
            pur.step(x, y)
        counts.append(n[0])
    assert counts == [9, 9]
    with pytest.raises(ValueError, match="reactivation_aware needs universal_perturbation"):
        _plain_sgd(_mlp(), _ctx(x, y), None, reactivation_aware=0.05)
    with pytest.raises(ValueError, match="reactivation_aware needs universal_perturbation"):
        _plain_sgd(_mlp(), _ctx(x, y), None, universal_perturbation=dict(up, gradient="shared"),
                   reactivation_aware=0.05)
    flat = MethodContext(torch.randn(8, 6), torch.randint(3, (8,)), torch.device("cpu"), F.cross_entropy, 0, False)
    with pytest.raises(ValueError, match="universal_perturbation='auto' turns off"):   # not dropped silently
        H.prepare(_mlp(), flat, {}, "auto", None, None, None, reactivation_aware=0.05)
    with pytest.raises(ValueError, match="reactivation_aware needs trace_estimator='fd'"):
        _plain_sgd(_mlp(), _ctx(x, y), None, eta_F=0.005, trace_estimator="batch", universal_perturbation=up,
                   reactivation_aware=0.05)


# ------------------------------------------------------------------------------------------------ unit reset
def _reference_changes(model, x, y, cfg, seed):
    """Σ|Δw| per output unit of every conv after the ascent, computed independently of the implementation."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 7919)
    for _ in range(cfg.steps):
        i = torch.randint(x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=g)
        out = m(x[i])
        if float((out.argmax(1) == y[i]).float().mean()) <= cfg.stop_acc:
            break
        opt.zero_grad()
        (-F.cross_entropy(out, y[i])).backward()
        opt.step()
    mods = dict(m.named_modules())
    return {n: (mods[n].weight - mod.weight).detach().abs().flatten(1).sum(1) for n, mod in model.named_modules()
            if isinstance(mod, nn.Conv2d)}


@pytest.mark.parametrize("weight_fraction", [1.0, 0.7])
def test_reset_zeroes_the_units_it_ranks_first(weight_fraction):
    """The ranking is by the ascent's Σ|Δw| (checked against an independent re-computation), most changed first;
    the top ⌈fraction·units⌉ units lose their most changed weights (all of them at weight_fraction 1); every other
    weight of the model is untouched."""
    g = torch.Generator().manual_seed(0)
    x, y = _images(128, g)
    torch.manual_seed(0)
    model = small_cnn()
    before = copy.deepcopy(model)
    cfg = H.UnitReset(fraction=0.1, weight_fraction=weight_fraction, steps=5, lr=0.05, stop_acc=0.0)
    res = H.reset_units_(model, _ctx(x, y, seed=3), cfg)
    ref = _reference_changes(before, x, y, cfg, seed=3)
    scores = [s for _, _, s in res.ranking]
    assert scores == sorted(scores, reverse=True) and len(res.ranking) == 32
    for n, i, s in res.ranking:
        assert s == pytest.approx(float(ref[n][i]), rel=1e-5)
    assert res.reset == [(n, i) for n, i, _ in res.ranking[:4]]
    zeroed = 0
    chosen = set(res.reset)
    for (n, m), (_, m0) in zip(model.named_modules(), before.named_modules()):
        if not isinstance(m, nn.Conv2d):
            continue
        for i in range(m.weight.shape[0]):
            if (n, i) in chosen:
                z = m.weight[i] == 0
                zeroed += int(z.sum())
                assert torch.equal(m.weight[i][~z], m0.weight[i][~z])
                if weight_fraction == 1.0:
                    assert bool(z.all())
            else:
                assert torch.equal(m.weight[i], m0.weight[i])
    assert zeroed == res.zeroed
    n_w = sum(model.get_submodule(n).weight[i].numel() for n, i in res.reset)
    assert zeroed == pytest.approx(weight_fraction * n_w, abs=1)
    for (k, v), v0 in zip(model.state_dict().items(), before.state_dict().values()):
        if not k.endswith("weight") or v.dim() != 4:
            assert torch.equal(v, v0), k


# ---------------------------------------------------------------------------------------------- through purify
@pytest.mark.parametrize("method", ["fip", "fast_fip"])
def test_purify_with_every_mechanism(backdoored, method):
    """All five options through ``purify``: the run completes, reports what each did, and the model keeps its
    architecture; with every option off the purifier is the plain one."""
    model, (xc, yc), _ = backdoored
    m, rep = P.purify(copy.deepcopy(model), (xc, yc), method=method, steps=6, progress=False, val_fraction=0,
                      universal_perturbation=0.2, path_aware=True, reset_units=dict(fraction=0.1, steps=3),
                      distill=True, reactivation_aware=0.05)
    assert rep.steps_run == 6 and rep.extra["reset_units"]["units_reset"] == 2
    assert 0 < rep.extra["universal_perturbation"]["linf"] <= 0.2 + 1e-7
    assert set(m.state_dict()) == set(model.state_dict())
    assert type(build_fip(copy.deepcopy(model), _ctx(xc, yc), **_fip_opts(), universal_perturbation=None)) \
        is OptimizerPurifier


def test_options_parse_and_reject():
    assert H.resolve_holding(0.3, None, None).universal == H.UniversalPerturbation(eps=0.3)
    assert H.resolve_holding(None, True, 0.2) == H.HoldingOptions(None, H.PathAware(), H.UnitReset(fraction=0.2))
    with pytest.raises(ValueError, match="universal_perturbation.fraction"):
        H.resolve_holding(dict(fraction=0.0))
    with pytest.raises(TypeError, match="reset_units"):
        H.resolve_holding(None, None, dict(bogus=1))
    with pytest.raises(TypeError, match="path_aware must be"):
        H.resolve_holding(None, "yes")
    with pytest.raises(ValueError, match="gradient='shared' needs objective='loss'"):
        H.resolve_holding(dict(objective="attract", gradient="shared"))
    assert H.UniversalPerturbation(gradient="shared").shared and not H.UniversalPerturbation().shared
    with pytest.raises(ValueError, match="universal_perturbation.placement"):
        H.resolve_holding(dict(placement="prepend"))
    with pytest.raises(ValueError, match="universal_perturbation.schedule"):
        H.resolve_holding(dict(schedule="cosine"))
    with pytest.raises(ValueError, match="universal_perturbation.scale"):
        H.resolve_holding(dict(scale="pixels"))
    with pytest.raises(TypeError, match="or 'auto'"):
        H.resolve_holding("yes")
    assert H.resolve_holding(0.2, reactivation_aware=0.1).react == H.ReactivationAware(rho=0.1)
    with pytest.raises(ValueError, match="reactivation_aware.schedule"):
        H.resolve_holding(0.2, reactivation_aware=dict(schedule="late"))
    with pytest.raises(ValueError, match="reactivation_aware.rho"):
        H.resolve_holding(0.2, reactivation_aware=-1.0)


def test_universal_eps_is_a_share_of_the_input_range():
    """scale="range" (the default): eps and step are shares of the clean inputs' max − min, so standardized images
    get the same relative perturbation as [0, 1] ones; "absolute" keeps input units."""
    x = torch.rand(16, 1, 4, 4) * 5.0 - 2.0            # range ≈ 5
    width = float(x.max() - x.min())
    u = H._Universal(H.UniversalPerturbation(eps=0.2), x, torch.device("cpu"))
    assert u.eps == pytest.approx(0.2 * width) and u.step_size == pytest.approx(0.02 * width)
    a = H._Universal(H.UniversalPerturbation(eps=0.2, scale="absolute"), x, torch.device("cpu"))
    assert a.eps == 0.2 and a.step_size == pytest.approx(0.02)
    with pytest.raises(ValueError, match="constant"):
        H._Universal(H.UniversalPerturbation(), torch.ones(4, 3), torch.device("cpu"))


def test_universal_auto_is_on_for_float_inputs_only():
    """"auto" (FIP's default; Fast FIP's with fields) perturbs floating-point inputs with ≥ 2 dimensions per sample
    (images, signals) and leaves integer ones (token ids) and flat feature vectors alone."""
    y = torch.randint(3, (32,))
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 3))
    assert type(build_fip(emb, _ctx(torch.randint(20, (32, 5)), y), **_fip_opts(),
                          universal_perturbation="auto")) is OptimizerPurifier
    assert type(build_fip(nn.Linear(6, 3), _ctx(torch.rand(32, 6), y), **_fip_opts(),
                          universal_perturbation="auto")) is OptimizerPurifier
    conv = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 3))
    pur = build_fip(conv, _ctx(torch.rand(32, 2, 8), y), **_fip_opts(), universal_perturbation="auto")
    assert isinstance(pur, H.HoldingPurifier) and pur.universal.cfg == H.UniversalPerturbation(inputs="auto")
    # fields with the rule kept (Fast FIP's default): on for the signal, off for flat features
    fields = {"inputs": "auto", "schedule": "constant"}
    pur = build_fip(conv, _ctx(torch.rand(32, 2, 8), y), **_fip_opts(), universal_perturbation=fields)
    assert pur.universal.cfg == H.UniversalPerturbation(inputs="auto", schedule="constant")
    assert type(build_fip(nn.Linear(6, 3), _ctx(torch.rand(32, 6), y), **_fip_opts(),
                          universal_perturbation=fields)) is OptimizerPurifier
    # inputs="any" (a dict without it, as before): on whatever the inputs
    assert isinstance(build_fip(nn.Linear(6, 3), _ctx(torch.rand(32, 6), y), **_fip_opts(),
                                universal_perturbation={"schedule": "constant"}), H.HoldingPurifier)
    with pytest.raises(ValueError, match="universal_perturbation.inputs"):
        H.resolve_holding(dict(inputs="images"))


def test_fip_default_perturbation_carries_the_patch_where_the_inputs_allow():
    """FIP's shipped perturbation ({"inputs": "auto", "patch": 0.02}) builds the patch surrogate — a mask over the
    positions with a budget of 2 % of them — for images and signals, and nothing for flat features or token ids
    (where "auto" turns the perturbation off, the patch goes with it instead of raising)."""
    fip = DEFAULTS["fip"]["universal_perturbation"]
    y = torch.randint(3, (32,))
    img = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    pur = build_fip(img, _ctx(torch.rand(32, 1, 10, 10), y), **_fip_opts(), universal_perturbation=fip)
    u = pur.universal
    assert u.mask is not None and u.mask.shape == (1, 10, 10) and u.budget == pytest.approx(0.02 * 100)
    conv = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 3))
    sig = build_fip(conv, _ctx(torch.rand(32, 2, 8), y), **_fip_opts(), universal_perturbation=fip).universal
    assert sig.mask is not None and sig.mask.shape == (1, 8)
    assert type(build_fip(nn.Linear(6, 3), _ctx(torch.rand(32, 6), y), **_fip_opts(),
                          universal_perturbation=fip)) is OptimizerPurifier
    emb = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 3))
    assert type(build_fip(emb, _ctx(torch.randint(20, (32, 5)), y), **_fip_opts(),
                          universal_perturbation=fip)) is OptimizerPurifier
    assert DEFAULTS["fip"]["weight_decay"] == 0.02 and pur.optimizer.param_groups[0]["weight_decay"] == 0.02


@pytest.mark.parametrize("method", ["fip", "fast_fip"])
def test_universal_perturbation_resumes_with_its_delta(backdoored, tmp_path, method):
    """δ (and the patch surrogate's mask and pattern) travel in the checkpoint: a run interrupted after step 8 and
    resumed ends where the uninterrupted one does (weights, δ, the mask's mass); without them restored the resumed
    run would restart them and end elsewhere."""
    model, (xc, yc), _ = backdoored
    clean = (xc[:192], yc[:192])
    (m_full, rep_full), (m_res, rep_res) = uninterrupted_and_resumed(
        lambda: copy.deepcopy(model), clean, tmp_path, 3,         # θ0 + steps 4, 8 → crash at step 12's evaluation
        method=method, steps=16, batch_size=32, eval_every=4, progress=False, checkpoint_every=8, val_fraction=0,
        universal_perturbation=dict(eps=0.2, step=0.05, patch=0.04))
    assert rep_res.resumed_from == 8 and rep_res.steps_run == 16
    assert rep_res.extra["universal_perturbation"] == rep_full.extra["universal_perturbation"]
    for (k, a), b in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_universal_non_finite_gradient_leaves_delta():
    """A gradient with one non-finite entry leaves δ as it was (no entry moves) and counts one skip; a finite one
    then moves it.  Decided on the device: no host read per update."""
    x, y = torch.rand(8, 1, 4, 4), torch.randint(3, (8,))
    u = H._Universal(H.UniversalPerturbation(gradient="shared"), x, torch.device("cpu"))
    for bad in (True, False):
        before = u.delta.clone()
        xm, _ = u.mix(x, y)
        g = torch.ones_like(xm)
        if bad:
            g[0, 0, 1, 2] = float("inf")
        xm.grad = g
        u.update_shared(xm)
        assert torch.equal(u.delta, before) is bad and u.skipped == 1


# ------------------------------------------------------------------------------- universal perturbation: patch
def test_patch_surrogate_finds_the_backdoor_patch(backdoored):
    """40 updates of the patch surrogate (budget 4 of 100 pixels; δ held at 10⁻³) on clean batches: the patched
    clean test images go to the target, the mask covers the trigger's two bright pixels, and the same patch moved
    to the opposite corner (or δ alone) sends almost none there."""
    model, (xc, yc), (xt, yt) = backdoored
    u, _ = _updated(model, xc, yc, H.UniversalPerturbation(eps=1e-3, scale="absolute", patch=0.04), 40)
    keep = yt != TARGET

    def target_rate(x):
        return _target_rate(model, x)

    assert float(u.mask.sum()) <= 4.0 + 1e-4 and float(u.mask.min()) >= 0 and float(u.mask.max()) <= 1
    assert float(u.mask[0, -2, -2]) > 0.9 and float(u.mask[0, -1, -1]) > 0.9    # the trigger's 1-pixels
    assert target_rate(u.patched(xt[keep])) > 0.9
    flipped = u.patched(xt[keep], u.mask.flip(-1, -2), u.pattern.flip(-1, -2))
    assert target_rate(flipped) < 0.1 and target_rate(u.perturb(xt[keep])) < 0.1


def test_patch_mask_projection():
    """_project_mask: inside [0, 1], the sum at most the budget, equal to the exact projection (the threshold τ found
    by sorting), and a mask already inside the set unchanged."""
    from fip_fast.pipeline._universal import _project_mask

    g = torch.Generator().manual_seed(0)
    m = 1.5 * torch.rand(1, 8, 8, generator=g) - 0.2
    p = _project_mask(m, 5.0)
    assert float(p.min()) >= 0 and float(p.max()) <= 1 and float(p.sum()) == pytest.approx(5.0, abs=1e-4)
    c = m.clamp(0, 1).flatten()                     # exact: Σ clip(c − τ, 0, 1) is piecewise linear in τ
    taus = torch.linspace(0, 1, 200001)
    sums = (c[None, :] - taus[:, None]).clamp(0, 1).sum(1)
    tau = float(taus[int((sums > 5.0).sum())])
    torch.testing.assert_close(p, (m.clamp(0, 1) - tau).clamp(0, 1), rtol=0, atol=1e-4)
    small = 0.01 * torch.rand(1, 8, 8, generator=g)
    assert torch.equal(_project_mask(small, 5.0), small)


def test_patch_mix_appends_patched_copies_with_true_labels(backdoored):
    """With ``patch`` the step's batch is the mixed one plus ⌊patch_fraction·k⌉ patched copies of the clean
    samples after the k perturbed ones, with their own labels; the teacher sees only the unperturbed rows."""
    model, (xc, yc), _ = backdoored
    u = H._Universal(H.UniversalPerturbation(eps=0.2, fraction=0.25, patch=0.05), xc, torch.device("cpu"))
    u.mask.fill_(0.05)
    x, y = xc[:64], yc[:64]
    xm, ym = u.mix(x, y)
    assert xm.shape[0] == 64 + 8 and torch.equal(ym, torch.cat([y, y[16:24]]))
    torch.testing.assert_close(xm[64:], 0.95 * x[16:24] + 0.05 * u.pattern, rtol=0, atol=1e-6)
    assert torch.equal(xm[16:64], x[16:]) and u.clean_rows == slice(16, 64)
    xm, ym = u.mix(x, y, share=0.0)                 # nothing perturbed: nothing patched either
    assert xm is x and ym is y


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_keeps_the_batch_layout(channels):
    """The batch with patched copies keeps the per-sample strides of the channels_last batch it came from, also
    for one-channel images (where the concatenation alone returns NCHW strides and the step runs slower)."""
    x = torch.rand(16, channels, 6, 6).to(memory_format=torch.channels_last)
    x = x.as_strided(x.shape, (36 * channels, 1, 6 * channels, channels))          # channels_last, also for C = 1
    y = torch.zeros(16, dtype=torch.long)
    u = H._Universal(H.UniversalPerturbation(patch=0.1), x, torch.device("cpu"))
    xm, _ = u.mix(x, y)
    assert xm.shape[0] == 16 + 4 and xm.stride() == x.stride()
    model = nn.Conv2d(channels, 2, 3)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].stride()))
    u.update(nn.Sequential(model, nn.Flatten(), nn.LazyLinear(3)), x, y)
    assert seen == [x.stride()]


def test_patch_needs_the_separate_pass_and_positions():
    with pytest.raises(ValueError, match="patch needs gradient='separate'"):
        H.UniversalPerturbation(patch=0.04, gradient="shared")
    with pytest.raises(ValueError, match="universal_perturbation.patch"):
        H.UniversalPerturbation(patch=1.5)
    with pytest.raises(ValueError, match="patch_fraction"):
        H.UniversalPerturbation(patch=0.04, patch_fraction=0)
    with pytest.raises(ValueError, match="≥ 2 dimensions per sample"):
        H._Universal(H.UniversalPerturbation(patch=0.04), torch.rand(8, 6), torch.device("cpu"))


def test_patch_non_finite_gradient_leaves_delta_mask_and_pattern():
    """A non-finite gradient in any of δ, the mask or the pattern moves none of them and counts one skip."""
    x = torch.rand(8, 1, 4, 4)
    u = H._Universal(H.UniversalPerturbation(patch=0.25), x, torch.device("cpu"))
    before = [u.delta.clone(), u.mask.clone(), u.pattern.clone()]
    gs = [torch.ones_like(t) for t in before]
    gs[1][0, 1, 1] = float("nan")
    u._steps(gs)
    assert all(torch.equal(a, b) for a, b in zip(before, (u.delta, u.mask, u.pattern))) and u.skipped == 1
    u._steps([torch.ones_like(t) for t in before])
    assert not torch.equal(u.mask, before[1]) and not torch.equal(u.delta, before[0]) and u.skipped == 1


# --------------------------------------------------------------------------------------------------- distill
def _step_from(model, x, y, **holding):
    """One FIP step (plain SGD, no suppressor) of a copy of ``model``; its parameters after."""
    m = copy.deepcopy(model)
    o = dict(lr=0.1, rho=0.5, momentum=0.0, weight_decay=0.0, eta_F=0.0, eta_r=0.0, trace_every=1,
             trace_estimator="fd", max_mix=1.0)
    pur = build_fip(m, _ctx(x, y), universal_perturbation=None, **o, **holding)
    pur.step(x, y)
    return [p.detach().clone() for p in m.parameters()], pur


def test_distill_teacher_matches_the_student_at_the_start(backdoored):
    """At θ0 the teacher (the starting model, BatchNorm on batch statistics as the student's train-mode step) gives
    the student's own outputs, so the term and its gradient vanish: the first step is the step without it (with a
    teacher on BatchNorm's running estimates it is not)."""
    model, (xc, yc), _ = backdoored
    x, y = xc[:64], yc[:64]
    plain, _ = _step_from(model, x, y)
    kd, pur = _step_from(model, x, y, distill=dict(weight=1.0, temperature=2.0))
    for a, b in zip(plain, kd):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in pur.teacher.parameters())
    for p, p0 in zip(pur.teacher.parameters(), model.parameters()):
        assert torch.equal(p, p0)                     # the teacher is the model as purification found it
    running = copy.deepcopy(pur.teacher)
    for mod in running.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
            mod.track_running_stats = True
    with torch.no_grad():
        assert float((running(x) - pur.teacher(x)).abs().max()) > 1e-2   # the two teachers differ on this batch


def test_distill_term_is_the_tempered_kl_on_the_unperturbed_rows(backdoored):
    """The term the closure adds is weight·T²·KL(teacher ‖ model) of the softmaxes at T, mean over the rows the
    universal perturbation left clean; the teacher never moves."""
    model, (xc, yc), _ = backdoored
    m = copy.deepcopy(model)
    pur = build_fip(m, _ctx(xc, yc), **_fip_opts(), universal_perturbation=dict(fraction=0.25, schedule="constant"),
                    distill=dict(weight=0.7, temperature=3.0))
    for i in range(3):
        pur.step(xc[64 * i:64 * (i + 1)], yc[64 * i:64 * (i + 1)])
    x, y = pur.universal.mix(xc[:64], yc[:64])
    assert pur.universal.clean_rows == slice(16, 64)
    term = distill_term(pur.teacher, pur.distill, x, pur.universal.clean_rows)
    m.train()
    out = m(x)
    with torch.no_grad():
        t = pur.teacher(x[16:])
    p_t = F.softmax(t / 3.0, 1)
    ref = 0.7 * 9.0 * (p_t * (p_t.log() - F.log_softmax(out[16:] / 3.0, 1))).sum(1).mean()
    torch.testing.assert_close(term(out), ref, rtol=1e-5, atol=1e-7)
    assert float(ref.detach()) > 1e-4                 # the student has moved off the teacher
    for p, p0 in zip(pur.teacher.parameters(), model.parameters()):
        assert torch.equal(p, p0)


def test_distill_refuses_outputs_that_are_not_class_logits():
    x, y = torch.randn(8, 3, 4), torch.randint(3, (8,))
    seq = nn.Sequential(nn.Linear(4, 3))          # (batch, 3, 3): one row of logits per position
    with pytest.raises(ValueError, match=r"distill needs the model to return class logits"):
        _step_from(seq, x, y, distill=True)


def test_distill_late_weight_follows_one_minus_the_lr_ratio(backdoored):
    """schedule="late": at the peak learning rate the term is off and the teacher does not run; at half the peak it
    is half the constant schedule's term."""
    model, (xc, yc), _ = backdoored
    m = copy.deepcopy(model)
    pur = build_fip(m, _ctx(xc, yc), **_fip_opts(), universal_perturbation=None, distill=dict(schedule="late"))
    calls = [0]
    pur.teacher.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    pur.step(xc[:64], yc[:64])                        # lr = its largest so far: factor 0
    assert calls[0] == 0
    for g in pur.optimizer.param_groups:
        g["lr"] = g["lr"] / 2
    pur.step(xc[64:128], yc[64:128])
    assert calls[0] == 1
    x, rows = xc[:64], slice(0, 64)
    m.train()
    out = m(x)
    half, full = (distill_term(pur.teacher, pur.distill, x, rows, f)(out) for f in (0.5, 1.0))
    assert float(full.detach()) > 1e-6               # the student has moved off the teacher
    torch.testing.assert_close(half, 0.5 * full, rtol=1e-5, atol=0)   # relative: the term is small here
    assert pur._lr_ratio() == pytest.approx(0.5)


def test_distill_auto_is_on_for_image_classifiers_only():
    """"auto" (the default): on for floating-point inputs with ≥ 2 dims per sample, the default cross-entropy and
    (batch, classes) outputs."""
    y = torch.randint(3, (32,))
    torch.manual_seed(0)
    img = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    forwards = [0]
    hook = img.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    pur = build_fip(img, _ctx(torch.rand(32, 1, 6, 6), y), **_fip_opts(), universal_perturbation=None,
                    distill="auto")
    hook.remove()
    assert pur.distill == H.Distill() and pur.distill.schedule == "late" and img.training
    assert forwards == [1]                            # one check of the outputs, not one per decision
    flat = nn.Linear(6, 3)
    assert type(build_fip(flat, _ctx(torch.randn(32, 6), y), **_fip_opts(), universal_perturbation=None,
                          distill="auto")) is OptimizerPurifier
    bce = MethodContext(torch.rand(32, 1, 6, 6), y, torch.device("cpu"), lambda o, t: F.cross_entropy(o, t), 0, False)
    assert type(build_fip(copy.deepcopy(img), bce, **_fip_opts(), universal_perturbation=None,
                          distill="auto")) is OptimizerPurifier        # a loss of the user's: off
    per_row = nn.Conv1d(2, 3, 1)                      # (batch, 3, length): not class logits
    assert type(build_fip(per_row, _ctx(torch.randn(32, 2, 5), y), **_fip_opts(), universal_perturbation=None,
                          distill="auto")) is OptimizerPurifier


def test_reactivation_shift_reduces_over_ranks_in_one_collective():
    """Under data-parallel purification the perturbed samples' gradients are summed over the ranks first: one
    collective over the flattened tensors, written back in each tensor's shape (a one-rank gloo group: the sum is
    the tensors themselves, so the shift equals the single-process one)."""
    import socket

    import torch.distributed as dist

    from fip_fast.pipeline._reactivation import reactivation_shift
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = [torch.randn(2, 3), torch.randn(4)]
    grads = [torch.randn(2, 3), torch.randn(4)]
    before = [g.clone() for g in grads]
    want = reactivation_shift(grads, params, H.ReactivationAware(rho=0.3))
    assert all(torch.equal(a, b) for a, b in zip(grads, before))      # the caller's gradients are not written
    calls = []
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    real = dist.all_reduce
    try:
        dist.all_reduce = lambda t, *a, **k: (calls.append(t.shape), real(t, *a, **k))[1]
        got = reactivation_shift(grads, params, H.ReactivationAware(rho=0.3), world_size=2)
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()
    assert calls == [torch.Size([10])]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
