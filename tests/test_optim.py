"""fip_fast.FIP: parity of the implementations, torch.optim conventions, estimators, skip logic, errors."""
import contextlib
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import FIP, estimate_fisher, ops
from fip_fast import reference as R

STATE_KEYS = ("step", "momentum_buffer", "fisher", "anchor", "fisher0", "pert")


class Shapes(nn.Module):
    """Parameters of awkward shapes: 1 element, odd sizes, an empty tensor, a matrix — all on the loss path."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.one = nn.Parameter(torch.randn(1, generator=g).to(dtype))
        self.odd = nn.Parameter(torch.randn(7, generator=g).to(dtype))
        self.empty = nn.Parameter(torch.randn(0, generator=g).to(dtype))
        self.mat = nn.Parameter((0.3 * torch.randn(7, 5, generator=g)).to(dtype))
        self.big = nn.Parameter((0.1 * torch.randn(1031, generator=g)).to(dtype))

    def forward(self, x):   # x: (B, 7)
        h = torch.tanh(x * self.odd + self.one) @ self.mat
        return h + self.big[:5] + self.empty.sum() + 0.01 * self.big.pow(2).sum()


def _data(dtype=torch.float32, n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _run(impl, dtype=torch.float32, steps=20, groups=False, fisher=True, **kw):
    model = Shapes(dtype)
    x, y = _data(dtype)
    f0 = {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
          enumerate(model.parameters()) if p.numel() != 7} if fisher else None
    params = ([{"params": [model.one, model.odd, model.empty], "lr": 0.02},
               {"params": [model.mat, model.big], "momentum": 0.5, "weight_decay": 1e-2}]
              if groups else model.parameters())
    opt = FIP(params, impl=impl, fisher0=f0, **kw)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if kw.get("trace_estimator") == "lagged":
            closure()
            opt.step()
        else:
            opt.step(closure)
    return model, opt


def _assert_same(m1, o1, m2, o2, rtol, atol):
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=rtol, atol=atol)
        s1, s2 = o1.state[p1], o2.state[p2]
        assert set(s1) == set(s2)
        for k in s1:
            torch.testing.assert_close(s1[k], s2[k], rtol=rtol, atol=atol, msg=lambda m: f"state {k}: {m}")


CONFIGS = [
    dict(),
    dict(nesterov=True),
    dict(precondition="fisher", damping=1e-2, lr=1e-3),
    dict(weight_decay=1e-2, eta_F=0.05, rho=0.1),
    dict(trace_every=1, eta_F=0.02, max_mix=0.5),
    dict(trace_estimator="lagged", eta_F=0.02, rho=0.1, trace_every=2),
    dict(trace_estimator="batch", eta_F=0.01),
    dict(groups=True),
    dict(fisher=False, eta_F=0.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_foreach_matches_reference_fp32(cfg):
    if cfg.get("trace_estimator") == "batch":
        pytest.skip("batch needs opt.backward in the closure; covered in test_batch_estimator")
    m1, o1 = _run("reference", **cfg)
    m2, o2 = _run("foreach", **cfg)
    # Preconditioning divides by fisher/(1−β^t) + λ with fisher ≈ g² ≪ λ for some elements: the fp32 reference
    # itself sits 3e-6 (relative) from an fp64 run of this config (measured), so two fp32 paths that round in a
    # different order (FMA, operand order) agree only to that level.  Everything else: 1e-6.
    rtol = 1e-5 if cfg.get("precondition") else 1e-6
    _assert_same(m1, o1, m2, o2, rtol=rtol, atol=1e-7)
    assert all(float(o1.state[p]["step"]) == 20 for p in m1.parameters() if p.grad is not None)


# fp64 params keep fp32 state
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-6)])
def test_foreach_matches_reference_low_precision(dtype, tol):
    m1, o1 = _run("reference", dtype=dtype, nesterov=True, eta_F=0.02)
    m2, o2 = _run("foreach", dtype=dtype, nesterov=True, eta_F=0.02)
    _assert_same(m1, o1, m2, o2, rtol=tol, atol=tol)
    for p in m1.parameters():    # state stays fp32 (fp64 for fp64 params is not promised: fp32 state)
        assert o1.state[p]["momentum_buffer"].dtype == torch.float32


def test_state_dict_round_trip_continues_same_trajectory():
    m1, o1 = _run("foreach", steps=7, eta_F=0.02, trace_every=3)
    m2 = copy.deepcopy(m1)
    buf = io.BytesIO()
    torch.save({"opt": o1.state_dict()}, buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu", weights_only=True)["opt"]
    o2 = FIP(m2.parameters(), impl="foreach", eta_F=0.02, trace_every=3)
    o2.load_state_dict(sd)
    x, y = _data()
    for m, o in ((m1, o1), (m2, o2)):
        for _ in range(6):
            def closure():
                o.zero_grad()
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                return loss
            o.step(closure)
    _assert_same(m1, o1, m2, o2, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["first", "second"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_nan_gradient_skips_everything(where, impl, caplog):
    model, opt = _run(impl, steps=3, eta_F=0.05, trace_every=1)
    snap_p = [p.detach().clone() for p in model.parameters()]
    snap_s = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items() for _ in [0]}
    snap_s = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    x, y = _data()
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        if (where == "first" and len(calls) == 1) or (where == "second" and len(calls) == 2):
            model.odd.grad[3] = float("nan")
        return loss

    with caplog.at_level(logging.WARNING, logger="fip_fast"):
        opt.step(closure)
    assert opt.skipped_steps == 1
    assert any("non-finite" in r.message for r in caplog.records)
    for a, p in zip(snap_p, model.parameters()):
        if where == "first":
            assert torch.equal(a, p)
        else:   # θ + e − e: one rounding of the restore (documented), state bit-identical
            torch.testing.assert_close(a, p, rtol=1e-6, atol=1e-7)
    for s, p in zip(snap_s, model.parameters()):
        for k, v in s.items():
            assert torch.equal(v, opt.state[p][k]), k


def test_fd_without_closure_raises_naming_lagged():
    model = Shapes()
    opt = FIP(model.parameters())
    F.cross_entropy(model(_data()[0]), _data()[1]).backward()
    with pytest.raises(ValueError, match="lagged"):
        opt.step()


def test_plain_steps_without_closure_are_fine_between_suppressor_steps():
    model = Shapes()
    opt = FIP(model.parameters(), eta_F=0.0)   # no suppressor: never needs a closure
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_fd_direction_matches_formula():
    """One fd suppressor step from zero state equals g + c·(g' − g) computed by hand (SGD, μ = 0)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    theta = [p.detach().clone() for p in model.parameters()]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    gn = torch.sqrt(sum(t.pow(2).sum() for t in g))
    rho, eta_F, lr = 0.05, 0.01, 0.1
    with torch.no_grad():
        for p, t in zip(model.parameters(), g):
            p.add_(t, alpha=(rho / gn).item())
    g2 = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    c = min(2 * eta_F * gn.item() / rho, 1.0)
    want = [t - lr * (a + c * (b - a)) for t, a, b in zip(theta, g, g2)]
    opt = FIP(model.parameters(), lr=lr, momentum=0.0, eta_F=eta_F, rho=rho, impl="foreach")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    for p, w in zip(model.parameters(), want):
        # the direction passes through the fp32 momentum buffer: fp32 rounding, not fp64
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-9)


def test_batch_estimator_uses_double_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    theta = [p.detach().clone() for p in model.parameters()]
    eta_F, lr = 0.01, 0.1
    p = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), p, create_graph=True)
    hg = torch.autograd.grad(sum(t.pow(2).sum() for t in g), p)
    want = [t - lr * (a.detach() + eta_F * h) for t, a, h in zip(theta, g, hg)]
    opt = FIP(model.parameters(), lr=lr, momentum=0.0, eta_F=eta_F, trace_estimator="batch", impl="foreach")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss)
        return loss
    opt.step(closure)
    for q, w in zip(model.parameters(), want):
        torch.testing.assert_close(q, w, rtol=1e-6, atol=1e-9)   # fp32 momentum state
    assert all(not q.grad.requires_grad for q in model.parameters())

    def bad_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(4):
        opt.step(bad_closure)
    with pytest.raises(ValueError, match="opt.backward"):
        opt.step(bad_closure)


def test_exact_estimator_with_trace_closure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    theta = [p.detach().clone() for p in model.parameters()]
    eta_F, lr = 0.01, 0.1
    T = R.trace_exact(model, x, y)
    gT = torch.autograd.grad(T, list(model.parameters()))
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    want = [t - lr * (a + eta_F * b) for t, a, b in zip(theta, g, gT)]
    opt = FIP(model.parameters(), lr=lr, momentum=0.0, eta_F=eta_F, trace_estimator="exact", impl="reference")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss, R.trace_exact(model, x, y)
    opt.step(closure)
    for q, w in zip(model.parameters(), want):
        torch.testing.assert_close(q, w, rtol=1e-6, atol=1e-9)   # fp32 momentum state


def test_lagged_unperturbed_and_state_dict_resume():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = FIP(model.parameters(), trace_estimator="lagged", trace_every=2, eta_F=0.05, rho=0.1, impl="foreach")

    def one(m, o):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    one(model, opt)            # call 0 (suppressor calls are 0, 2, 4, …)
    assert all(opt.state[p]["pert"].abs().sum() == 0 for p in model.parameters())
    one(model, opt)            # call 1 precedes the suppressor call 2 → it stores e, applied lazily
    pert = [opt.state[p]["pert"] for p in model.parameters()]
    assert any(t.abs().sum() > 0 for t in pert)
    # Between steps the parameters hold θ: evaluation under no_grad and eval mode leave them alone.
    clean = [p.detach().clone() for p in model.parameters()]
    assert not opt.is_perturbed
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.enable_grad():
        model(x)
    model.train()
    assert not opt.is_perturbed and all(torch.equal(a, p) for a, p in zip(clean, model.parameters()))
    # The first training forward with gradients applies e.
    with torch.enable_grad():
        model(x)
    assert opt.is_perturbed
    perturbed = [p.detach().clone() for p in model.parameters()]
    for a, b, e in zip(perturbed, clean, pert):
        torch.testing.assert_close(a - e, b)
    with opt.unperturbed():
        for a, p in zip(clean, model.parameters()):
            torch.testing.assert_close(p, a)
        msd = copy.deepcopy(model.state_dict())
        osd = copy.deepcopy(opt.state_dict())
    for a, p in zip(perturbed, model.parameters()):
        torch.testing.assert_close(a, p)
    # Resume: model weights (unperturbed) and the optimizer, whose stored e is applied at the next forward.
    m2 = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    m2.load_state_dict(msd)
    o2 = FIP(m2.parameters(), trace_estimator="lagged", trace_every=2, eta_F=0.05, rho=0.1, impl="foreach")
    o2.load_state_dict(osd)
    for _ in range(5):
        one(model, opt)
        one(m2, o2)
    for a, b in zip(model.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lagged_direction_matches_fd_to_first_order():
    """The lagged step's gradient at θ + r·v is g + 2·η_F·H·v·‖g‖ ≈ the fd direction (fp64, small radius)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    eta_F, rho = 1e-4, 1e-3
    p = list(base.parameters())
    g = torch.autograd.grad(F.cross_entropy(base(x), y), p)
    fd = R.suppressor_grad_fd(base, x, y, rho)
    want = [a + eta_F * b for a, b in zip(g, fd)]               # d of an fd step (c below the cap)
    m = copy.deepcopy(base)
    opt = FIP(m.parameters(), lr=0.0, momentum=0.0, trace_estimator="lagged", trace_every=2, eta_F=eta_F,
              rho=rho, impl="foreach")
    for _ in range(2):          # calls 0 and 1; lr = 0: θ unchanged; call 1 applies e = 2·η_F·g for call 2
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    got = [q.grad for q in m.parameters()]
    num = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(got, want)))
    den = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(g, want)))   # size of the suppressor term
    assert (num / den).item() < 1e-2


def test_param_groups_lr_scheduler_and_add_param_group():
    model = Shapes()
    opt = FIP([model.one, model.odd], lr=0.1, eta_F=0.0)
    opt.add_param_group({"params": [model.mat], "lr": 0.01})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[1]["lr"] == 0.005
    assert "step" not in opt.state[model.big]       # not in the optimizer: untouched
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [model.big], "rho": -1.0})


def test_parameters_without_grad_are_skipped():
    model = Shapes()
    opt = FIP(model.parameters(), eta_F=0.0)
    before = model.empty.detach().clone()
    model.one.grad = torch.ones(1)
    opt.step()
    assert "step" not in opt.state[model.odd] and float(opt.state[model.one]["step"]) == 1
    assert torch.equal(before, model.empty)


def test_tensor_lr_no_item():
    m1, o1 = _run("foreach", lr=0.01)
    m2, o2 = _run("foreach", lr=torch.tensor(0.01))
    _assert_same(m1, o1, m2, o2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1.0), "lr"), (dict(rho=0.0), "rho"), (dict(momentum=1.0), "momentum"),
    (dict(trace_every=0), "trace_every"), (dict(trace_estimator="sam"), "trace_estimator"),
    (dict(beta=1.0), "beta"), (dict(precondition="kfac"), "precondition"), (dict(damping=0.0), "damping"),
    (dict(eta_F=-1.0), "eta_F"), (dict(eta_r=-1.0), "eta_r"), (dict(max_mix=0.0), "max_mix"),
    (dict(impl="cuda-fast"), "impl"), (dict(nesterov=True, momentum=0.0), "nesterov"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        FIP(Shapes().parameters(), **kw)


def test_bad_fisher0_and_params():
    model = Shapes()
    with pytest.raises(ValueError, match="shape"):
        FIP(model.parameters(), fisher0={model.mat: torch.ones(3)})
    with pytest.raises(ValueError, match="not among"):
        FIP([model.one], fisher0={model.mat: torch.ones_like(model.mat)})
    with pytest.raises(ValueError, match="complex"):
        FIP([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    emb = nn.Embedding(5, 3, sparse=True)
    opt = FIP(emb.parameters(), eta_F=0.0)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_unavailable_impl_is_a_clear_error():
    from fip_fast.ops import ImplUnavailableError
    with pytest.raises(ImplUnavailableError, match="cuda"):
        FIP(Shapes().parameters(), impl="cuda")


def _purify_with(task, eta_F, steps=150):
    model = copy.deepcopy(task.model)
    f0 = estimate_fisher(model, [(task.clean_x, task.clean_y)], normalize="max")
    opt = FIP(model.parameters(), lr=0.02, eta_F=eta_F, rho=0.5, trace_every=1, fisher0=f0, eta_r=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(task.clean_y), (32,), generator=g)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(task.clean_x[idx]), task.clean_y[idx])
            loss.backward()
            return loss
        opt.step(closure)
    return model


def test_fip_lowers_backdoor_asr_on_synthetic_task():
    """End-to-end sanity on a tiny CNN with a planted patch backdoor: with the same steps, data and anchor,
    plain fine-tuning (η_F = 0) keeps the backdoor while FIP's suppressor lowers the ASR, at equal accuracy."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _synthetic import make_task

    task = make_task(seed=0)
    assert task.asr() > 0.95 and task.acc() > 0.9
    ft = _purify_with(task, eta_F=0.0)
    fip = _purify_with(task, eta_F=1.0)
    assert task.asr(ft) > 0.9                    # the control: fine-tuning alone does not remove it
    assert task.asr(fip) < task.asr(ft) - 0.2, (task.asr(ft), task.asr(fip))
    assert task.acc(fip) > task.acc() - 0.05


def test_perturbed_pass_flag_and_frozen_running_stats():
    """The fd suppressor's second pass runs at θ + e; with ``frozen_running_stats`` it must leave BatchNorm's
    running estimates exactly as the first (unperturbed) pass left them."""
    from fip_fast.optim import frozen_running_stats

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(net)
    ref(x)                                   # one train-mode forward at θ: the expected running stats
    opt = FIP(net.parameters(), lr=0.1, eta_F=1.0, rho=0.5, trace_every=1)
    flags = []

    def closure():
        flags.append(opt.perturbed_pass)
        opt.zero_grad()
        with frozen_running_stats(net) if opt.perturbed_pass else contextlib.nullcontext():
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert flags == [False, True] and opt.perturbed_pass is False
    bn, bn_ref = net[1], ref[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats
    # Without the context the perturbed pass does fold θ + e into the statistics (what the flag is for).
    net2 = copy.deepcopy(ref)
    net2.load_state_dict(ref.state_dict())
    opt2 = FIP(net2.parameters(), lr=0.1, eta_F=1.0, rho=0.5, trace_every=1)

    def closure2():
        opt2.zero_grad()
        loss = F.cross_entropy(net2(x), y)
        loss.backward()
        return loss

    before = net2[1].running_mean.clone()
    opt2.step(closure2)
    assert int(net2[1].num_batches_tracked) == 3 and not torch.equal(net2[1].running_mean, before)


def test_purifier_freezes_batchnorm_stats_on_the_perturbed_pass():
    from fip_fast.pipeline import OptimizerPurifier

    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    ref = copy.deepcopy(net).train()
    ref(x)
    pur = OptimizerPurifier(net, FIP(net.parameters(), lr=0.1, eta_F=1.0, rho=0.5, trace_every=1))
    pur.step(x, y)
    assert int(net[1].num_batches_tracked) == 1
    torch.testing.assert_close(net[1].running_var, ref[1].running_var, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ hardening
def _step_plain(model, opt, x, y, set_to_none=True):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return opt.step(closure)


def test_generator_param_groups_train_like_sgd():
    """``{"params": layer.parameters()}`` is a generator: it must be kept, not consumed by validation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    groups = lambda: [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}]  # noqa
    sgd = torch.optim.SGD(groups(), lr=0.1)
    opt = FIP(groups(), lr=0.1, eta_F=0.0)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in sgd.param_groups] == [2, 2]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    _step_plain(model, opt, x, y)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.add_param_group({"params": (p for p in [nn.Parameter(torch.ones(2))])})
    assert len(opt.param_groups[-1]["params"]) == 1


def test_rejected_param_group_is_not_registered():
    model = nn.Linear(3, 2)
    opt = FIP([model.weight], eta_F=0.0)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [model.bias], "lr": -5.0})
    assert len(opt.param_groups) == 1 and all(p is not model.bias for p in opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match="rho"):
        FIP([{"params": [model.weight], "rho": float("inf")}])


@pytest.mark.parametrize("kw,match", [
    (dict(lr=float("inf")), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr="0.1"), "lr"), (dict(lr=True), "lr"),
    (dict(rho=float("inf")), "rho"), (dict(weight_decay=float("inf")), "weight_decay"),
    (dict(momentum=float("nan")), "momentum"), (dict(eta_F=float("inf")), "eta_F"), (dict(eta_r="1"), "eta_r"),
    (dict(damping=float("inf")), "damping"), (dict(max_mix=float("inf")), "max_mix"),
    (dict(lr=torch.tensor(float("inf"))), "lr"), (dict(nesterov=1), "nesterov"), (dict(trace_every=2.0), "trace_every"),
])
def test_non_finite_and_mistyped_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        FIP(Shapes().parameters(), **kw)


def test_load_state_dict_validates():
    m1, o1 = _run("foreach", steps=2, eta_F=0.02, trace_every=2)
    sd = o1.state_dict()
    fresh = lambda: FIP(Shapes().parameters(), impl="foreach", eta_F=0.02, trace_every=2)  # noqa: E731
    model = Shapes()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(_data()[0]), _data()[1]).backward()
    sgd.step()
    with pytest.raises(ValueError, match="not a FIP state"):
        fresh().load_state_dict(sgd.state_dict())
    bad = copy.deepcopy(sd)
    del bad["param_groups"][0]["calls"]
    with pytest.raises(ValueError, match="calls"):
        fresh().load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        fresh().load_state_dict(bad)
    bad = copy.deepcopy(sd)
    k = next(iter(bad["state"]))
    bad["state"][k]["momentum_buffer"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        fresh().load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][k]["exp_avg"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown"):
        fresh().load_state_dict(bad)
    o2 = fresh()
    o2.load_state_dict(copy.deepcopy(sd))          # the real thing still loads
    assert o2.param_groups[0]["calls"] == 2


def test_fd_second_pass_leaves_other_groups_gradient_at_theta():
    """Group A has the fd suppressor, group B none; the closure zeroes gradients in place.  B must step with its
    gradient at θ, not with the one taken at θ + e (A perturbed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    gB = torch.autograd.grad(F.cross_entropy(model(x), y), list(model[2].parameters()))
    want = [p.detach() - 0.1 * g for p, g in zip(model[2].parameters(), gB)]
    opt = FIP([{"params": model[0].parameters(), "eta_F": 1.0, "rho": 0.5},
               {"params": model[2].parameters(), "eta_F": 0.0}], lr=0.1, momentum=0.0, trace_every=1,
              impl="foreach")
    _step_plain(model, opt, x, y, set_to_none=False)
    for p, w in zip(model[2].parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-9)
    for p, g in zip(model[2].parameters(), gB):        # and p.grad is the gradient at θ afterwards
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", ["reference", "foreach", "triton"])
def test_bias_correction_uses_each_tensors_own_step(impl):
    """Parameter b gets its first gradient at the third step: its preconditioned first move is
    lr·g/((1−β)g²/(1−β¹) + λ), not the one with the first tensor's count t = 3 (≈ 5× larger at β = 0.95)."""
    if impl == "triton" and not ops.availability("triton", "cpu")[0]:
        pytest.skip("Triton unavailable")
    a, b = nn.Parameter(torch.tensor([1.0, -2.0])), nn.Parameter(torch.tensor([0.5, 0.25, 2.0]))
    lr, beta, lam = 0.01, 0.95, 1e-3
    opt = FIP([a, b], lr=lr, momentum=0.0, eta_F=0.0, beta=beta, precondition="fisher", damping=lam, impl=impl)
    for t in range(3):
        opt.zero_grad()
        loss = (a ** 2).sum() + ((b ** 2).sum() if t == 2 else 0.0)
        loss.backward()
        if t < 2:
            assert b.grad is None
        b0 = b.detach().clone()
        opt.step()
    g = 2 * b0
    want = b0 - lr * g / ((1 - beta) * g * g / (1 - beta) + lam)
    assert float(opt.state[b]["step"]) == 1 and float(opt.state[a]["step"]) == 3
    torch.testing.assert_close(b.detach(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["reference", "foreach", "triton"])
def test_one_step_with_theta_away_from_anchor(impl):
    """θ ≠ θ0: one step from zero state with μ = 0 is θ − lr·(g + η_r·F0·(θ − θ0) + wd·θ), computed by hand.
    (With θ = θ0 the anchor term vanishes and a sign error in it goes unnoticed.)"""
    if impl == "triton" and not ops.availability("triton", "cpu")[0]:
        pytest.skip("Triton unavailable")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    f0 = torch.rand(5, 3) + 0.1
    lr, eta_r, wd = 0.1, 2.0, 0.01
    opt = FIP([w], lr=lr, momentum=0.0, eta_F=0.0, eta_r=eta_r, weight_decay=wd, fisher0={w: f0}, impl=impl)
    theta0 = w.detach().clone()
    with torch.no_grad():
        w.add_(torch.randn(5, 3))                     # move away from the anchor θ0
    theta = w.detach().clone()
    x = torch.randn(7, 3)
    (x @ w.t()).pow(2).mean().backward()
    g = w.grad.detach().clone()
    opt.step()
    want = theta - lr * (g + eta_r * f0 * (theta - theta0) + wd * theta)
    torch.testing.assert_close(w.detach(), want, rtol=1e-6, atol=1e-6)
    assert (theta - theta0).abs().min() > 1e-3


@pytest.mark.parametrize("max_mix", [0.3, 1.0])
def test_fd_mix_is_capped_at_max_mix(max_mix):
    """2·η_F·‖g‖/ρ far above the cap: the fd direction is exactly g + max_mix·(g' − g) (a cap doubled, or no cap,
    changes it)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    theta = [p.detach().clone() for p in model.parameters()]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    gn = torch.sqrt(sum(t.pow(2).sum() for t in g))
    rho, eta_F, lr = 0.05, 10.0, 0.1
    assert 2 * eta_F * gn.item() / rho > 4 * max_mix
    with torch.no_grad():
        for p, t in zip(model.parameters(), g):
            p.add_(t, alpha=(rho / gn).item())
    g2 = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    want = [t - lr * (a + max_mix * (b - a)) for t, a, b in zip(theta, g, g2)]
    opt = FIP(model.parameters(), lr=lr, momentum=0.0, eta_F=eta_F, rho=rho, max_mix=max_mix, trace_every=1,
              impl="foreach")
    _step_plain(model, opt, x, y)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-9)


def test_lagged_radius_is_capped_at_max_mix_rho():
    """r = min(2·η_F·‖g‖, max_mix·ρ): with a large η_F the stored perturbation has norm exactly max_mix·ρ."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = FIP(model.parameters(), lr=0.0, eta_F=100.0, rho=0.2, max_mix=0.25, trace_every=1,
              trace_estimator="lagged", impl="foreach")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    norm = torch.sqrt(sum(opt.state[p]["pert"].pow(2).sum() for p in model.parameters()))
    torch.testing.assert_close(norm, torch.tensor(0.25 * 0.2), rtol=1e-5, atol=0)


def test_group_norm_is_global_across_devices():
    """‖g‖ of a group spanning devices is one norm: the per-device parts are combined (simulated here with two
    slices of one group on the CPU; tests/test_kernels_cuda.py runs it on two GPUs where available)."""
    from fip_fast.optim import _Slice

    opt = FIP([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))], impl="foreach")
    g = opt.param_groups[0]
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])
    sls = [_Slice(g, True, [g["params"][0]], [a], "foreach", torch.device("cpu")),
           _Slice(g, True, [g["params"][1]], [b], "foreach", torch.device("cpu"))]
    opt._norms(sls)
    assert [float(s.gnorm) for s in sls] == [5.0, 5.0]
    b[1] = float("nan")
    opt._norms(sls)
    assert [float(s.found_inf) for s in sls] == [1.0, 1.0]      # a skip is step-wide


@pytest.mark.parametrize("estimator,extra", [("fd", {}), ("lagged", {}), ("fd", dict(precondition="fisher"))])
def test_whole_step_has_no_host_sync(estimator, extra):
    """FIP.step with Triton kernels (interpreter, CPU tensors standing in for a device) and a tensor lr: no
    .item() / float(tensor) / bool(tensor) anywhere in a step — including the suppressor schedule with
    trace_every > 1, the skip counter and the lagged perturbation."""
    if not ops.availability("triton", "cpu")[0]:
        pytest.skip("Triton unavailable")
    from unittest import mock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    f0 = {p: torch.rand_like(p) for p in model.parameters()}
    opt = FIP(model.parameters(), lr=torch.tensor(0.05), eta_F=0.05, rho=0.1, trace_every=2,
              trace_estimator=estimator, fisher0=f0, impl="triton", **extra)
    boom = AssertionError("host sync inside FIP.step")
    for i in range(5):
        opt.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        with mock.patch.object(torch.Tensor, "item", side_effect=boom), \
                mock.patch.object(torch.Tensor, "__float__", side_effect=boom), \
                mock.patch.object(torch.Tensor, "__bool__", side_effect=boom), \
                mock.patch.object(torch.Tensor, "tolist", side_effect=boom):
            if estimator == "fd":
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.step()
    assert opt.skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
