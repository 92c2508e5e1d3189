"""fip_fast.FIP: parity of the implementations, torch.optim conventions, estimators, skip logic, errors."""
import contextlib
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import FIP, estimate_fisher
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


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-6)])  # fp64 params keep fp32 state
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
    one(model, opt)            # call 1 precedes the suppressor call 2 → perturbation applied now
    pert = [opt.state[p]["pert"] for p in model.parameters()]
    assert any(t.abs().sum() > 0 for t in pert)
    perturbed = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        clean = [p.detach().clone() for p in model.parameters()]
        for a, b, e in zip(perturbed, clean, pert):
            torch.testing.assert_close(a - e, b)
        msd = copy.deepcopy(model.state_dict())
        osd = copy.deepcopy(opt.state_dict())
    for a, p in zip(perturbed, model.parameters()):
        torch.testing.assert_close(a, p)
    # Resume: model weights (unperturbed) first, then the optimizer, which re-applies the perturbation.
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
