"""The reference (the spec) against independent, explicit computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import reference as R


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _batch(n=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _hvp_2Hg(model, x, y):
    """2·H·ḡ by explicit double backward: the exact gradient of T = ‖∇ℓ‖²."""
    p = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), p, create_graph=True)
    return torch.autograd.grad(sum(gi.pow(2).sum() for gi in g), p)


def test_trace_batch_gradient_is_2Hg():
    m = _mlp()
    x, y = _batch()
    T = R.trace_batch(m, x, y)
    gT = torch.autograd.grad(T, list(m.parameters()))
    # Independent: H·v by finite differences of the gradient along v = ḡ (fp64, central differences).
    p = list(m.parameters())
    g = torch.autograd.grad(F.cross_entropy(m(x), y), p)
    eps = 1e-5
    with torch.no_grad():
        for pi, gi in zip(p, g):
            pi.add_(gi, alpha=eps)
    gp = torch.autograd.grad(F.cross_entropy(m(x), y), p)
    with torch.no_grad():
        for pi, gi in zip(p, g):
            pi.sub_(gi, alpha=2 * eps)
    gm = torch.autograd.grad(F.cross_entropy(m(x), y), p)
    for a, b, c in zip(gT, gp, gm):
        torch.testing.assert_close(a, 2 * (b - c) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_trace_exact_equals_explicit_loop():
    m = _mlp()
    x, y = _batch(n=5)
    T = R.trace_exact(m, x, y)
    p = list(m.parameters())
    explicit = 0.0
    for n in range(5):
        g = torch.autograd.grad(F.cross_entropy(m(x[n:n + 1]), y[n:n + 1]), p)
        explicit = explicit + sum(gi.pow(2).sum() for gi in g)
    torch.testing.assert_close(T, explicit / 5)
    # Its gradient exists and matches the explicit loop's (double backward through vmap).
    gT = torch.autograd.grad(T, p)
    ge = torch.autograd.grad(explicit / 5, p) if isinstance(explicit, torch.Tensor) and explicit.requires_grad \
        else None
    explicit2 = 0.0
    for n in range(5):
        g = torch.autograd.grad(F.cross_entropy(m(x[n:n + 1]), y[n:n + 1]), p, create_graph=True)
        explicit2 = explicit2 + sum(gi.pow(2).sum() for gi in g)
    ge = torch.autograd.grad(explicit2 / 5, p)
    for a, b in zip(gT, ge):
        torch.testing.assert_close(a, b)


def test_fd_converges_to_batch_as_rho_shrinks():
    m = _mlp()
    x, y = _batch()
    exact = _hvp_2Hg(m, x, y)
    errs = []
    for rho in (1e-1, 1e-2, 1e-3, 1e-4):
        fd = R.suppressor_grad_fd(m, x, y, rho)
        num = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(fd, exact)))
        den = torch.sqrt(sum(b.pow(2).sum() for b in exact))
        errs.append((num / den).item())
    # First-order finite difference: the relative error shrinks about linearly with ρ.
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 and errs[0] / errs[-1] > 100, errs


def test_fd_restores_parameters_exactly():
    m = _mlp()
    before = [p.clone() for p in m.parameters()]
    R.suppressor_grad_fd(m, *_batch(), rho=0.1)
    for a, b in zip(before, m.parameters()):
        assert torch.equal(a, b)


def test_objective_gradient_matches_pieces():
    m = _mlp()
    x, y = _batch()
    p = list(m.parameters())
    theta0 = {q: q.detach() + 0.1 for q in p}
    fisher0 = {q: torch.rand_like(q) for q in p[:2]}
    J = R.fip_objective(m, x, y, eta_F=0.01, eta_r=0.5, theta0=theta0, fisher0=fisher0)
    gJ = torch.autograd.grad(J, p)
    gl = torch.autograd.grad(F.cross_entropy(m(x), y), p)
    hg = _hvp_2Hg(m, x, y)
    for i, q in enumerate(p):
        want = gl[i] + 0.01 * hg[i]
        if q in fisher0:
            want = want + 0.5 * fisher0[q] * (q - theta0[q])
        torch.testing.assert_close(gJ[i], want)


def test_fisher_loop_matches_definition_and_restores_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    m.train()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    Fl = R.fisher_per_sample_loop(m, x, y)
    assert m.training
    m.eval()
    p = list(m.parameters())
    want = [torch.zeros_like(q) for q in p]
    for n in range(6):
        logp = torch.log_softmax(m(x[n:n + 1]), -1)[0, y[n]]
        for w, g in zip(want, torch.autograd.grad(logp, p)):
            w += g.pow(2) / 6
    for a, b in zip(Fl, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- kernel-level reference ops
def test_fip_step_reference_one_tensor_by_hand():
    """The reference step on one element, against the formula of docs/method.md written out by hand."""
    p = torch.tensor([1.0])
    g = torch.tensor([0.5])
    gp = torch.tensor([0.7])
    f0 = torch.tensor([2.0])
    a = torch.tensor([0.9])
    buf = torch.tensor([0.1])
    fis = torch.tensor([0.2])
    lr, mu, wd, eta_r, beta, c, rs, lam, t = 0.1, 0.9, 0.01, 0.5, 0.95, 0.3, 0.2, 1e-3, 3
    theta = 1.0 - rs * 0.5
    d = 0.5 + c * (0.7 - 0.5) + eta_r * 2.0 * (theta - 0.9) + wd * theta
    fisher = beta * 0.2 + (1 - beta) * 0.25
    d = d / (fisher / (1 - beta ** t) + lam)
    b = mu * 0.1 + d
    u = d + mu * b
    want = theta - lr * u
    R.fip_step_([p], [g], [gp], [f0], [a], [buf], [fis], None, lr=lr, momentum=mu, nesterov=True,
                weight_decay=wd, eta_r=eta_r, beta=beta, mix=c, restore_scale=rs, precondition=True, damping=lam,
                step=t, next_pert_scale=None, found_inf=0.0)
    assert abs(p.item() - want) < 1e-6 and abs(buf.item() - b) < 1e-6 and abs(fis.item() - fisher) < 1e-7


def test_fip_step_lagged_restores_then_sets_next():
    p = torch.tensor([1.0, 2.0])
    g = torch.tensor([0.5, -1.0])
    pert = torch.tensor([0.1, 0.2])
    buf = torch.zeros(2)
    fis = torch.zeros(2)
    R.fip_step_([p], [g], None, [None], [None], [buf], [fis], [pert], lr=0.1, momentum=0.0, nesterov=False,
                weight_decay=0.0, eta_r=0.0, beta=0.0, mix=None, restore_scale=None, precondition=False,
                damping=1e-3, step=1, next_pert_scale=0.3, found_inf=0.0)
    theta = torch.tensor([0.9, 1.8]) - 0.1 * g
    torch.testing.assert_close(pert, 0.3 * g)
    torch.testing.assert_close(p, theta)    # stored, not applied: the optimizer perturbs θ at the next forward


def test_fip_step_anchor_one_step_by_hand():
    """One step from zero state, momentum 0, θ ≠ θ0, F0 ≠ 0: θ_new = θ − lr·(g + η_r·F0·(θ − θ0) + wd·θ).
    (With θ0 = θ the anchor term vanishes and a sign error in it would go unnoticed.)"""
    p = torch.tensor([1.0, -2.0, 0.5])
    g = torch.tensor([0.5, 0.25, -1.0])
    f0 = torch.tensor([2.0, 0.5, 1.5])
    a = torch.tensor([0.25, -1.0, 1.5])
    lr, wd, eta_r = 0.1, 0.01, 0.5
    want = [th - lr * (gi + eta_r * fi * (th - ai) + wd * th)
            for th, gi, fi, ai in zip([1.0, -2.0, 0.5], [0.5, 0.25, -1.0], [2.0, 0.5, 1.5], [0.25, -1.0, 1.5])]
    # by hand: 1 − 0.1·(0.5 + 0.75 + 0.01) = 0.874;  −2 − 0.1·(0.25 − 0.25 − 0.02) = −1.998;
    #          0.5 − 0.1·(−1 − 0.75 + 0.005) = 0.6745
    assert want == pytest.approx([0.874, -1.998, 0.6745], abs=1e-12)
    buf, fis = torch.zeros(3), torch.zeros(3)
    R.fip_step_([p], [g], None, [f0], [a], [buf], [fis], None, lr=lr, momentum=0.0, nesterov=False,
                weight_decay=wd, eta_r=eta_r, beta=0.9, mix=None, restore_scale=None, precondition=False,
                damping=0.0, step=1, next_pert_scale=None, found_inf=None)
    torch.testing.assert_close(p, torch.tensor(want), rtol=0, atol=1e-6)


def test_fip_step_per_tensor_step_counts_by_hand():
    """step as one count per tensor: tensor i is preconditioned with its own 1 − β^t_i (fp32)."""
    beta, lam, lr = 0.9, 1e-3, 0.1
    ps = [torch.tensor([1.0]), torch.tensor([1.0])]
    g = [torch.tensor([0.5]), torch.tensor([0.5])]
    fis = [torch.zeros(1), torch.zeros(1)]
    R.fip_step_(ps, g, None, [None, None], [None, None], [torch.zeros(1), torch.zeros(1)], fis, None, lr=lr,
                momentum=0.0, nesterov=False, weight_decay=0.0, eta_r=0.0, beta=beta, mix=None, restore_scale=None,
                precondition=True, damping=lam, step=[1, torch.tensor(7.0)], next_pert_scale=None, found_inf=None)
    f = (1 - beta) * 0.25
    for p, t in zip(ps, (1, 7)):
        want = 1.0 - lr * 0.5 / (f / (1 - beta ** t) + lam)
        assert abs(p.item() - want) < 1e-5, (t, p.item(), want)
    assert abs(ps[0].item() - ps[1].item()) > 1e-3


def test_found_inf_writes_nothing():
    p = torch.randn(5)
    buf = torch.randn(5)
    fis = torch.rand(5)
    snap = [t.clone() for t in (p, buf, fis)]
    R.fip_step_([p], [torch.randn(5)], None, [None], [None], [buf], [fis], None, lr=0.1, momentum=0.9,
                nesterov=False, weight_decay=0.0, eta_r=0.0, beta=0.9, mix=None, restore_scale=None,
                precondition=False, damping=1e-3, step=1, next_pert_scale=None, found_inf=torch.tensor(1.0))
    for a, b in zip(snap, (p, buf, fis)):
        assert torch.equal(a, b)


def test_global_norm_and_found_inf():
    n, inf = R.global_norm([torch.ones(3), None, torch.full((1,), 2.0)])
    assert abs(n.item() - (3 + 4) ** 0.5) < 1e-6 and inf.item() == 0
    _, inf = R.global_norm([torch.tensor([1.0, float("nan")])])
    assert inf.item() == 1.0


@pytest.mark.parametrize("relative", [False, True])
def test_spectral_weight_and_linear_grad(relative):
    torch.manual_seed(0)
    W = torch.randn(7, 5, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    delta = (0.1 * torch.randn(5, dtype=torch.float64)).requires_grad_()
    Wd = R.spectral_weight(U, S, delta, Vh, relative=relative)
    s = S * (1 + delta) if relative else S + delta
    torch.testing.assert_close(Wd, U @ torch.diag(torch.relu(s)) @ Vh)
    # δ-gradient and per-sample squares against autograd per sample (with a token dimension).
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    target = torch.randn(4, 3, 7, dtype=torch.float64)
    per = []
    for n in range(4):
        loss = 0.5 * (x[n] @ R.spectral_weight(U, S, delta, Vh, relative=relative).t() - target[n]).pow(2).sum()
        per.append(torch.autograd.grad(loss, delta)[0])
    per = torch.stack(per)
    gout = x @ Wd.detach().t() - target
    gd, sq = R.spectral_linear_grad(x, gout, U, S, delta.detach(), Vh, relative=relative)
    torch.testing.assert_close(gd.double(), per.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sq.double(), per.pow(2), rtol=1e-5, atol=1e-6)
