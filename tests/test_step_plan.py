"""Step plans (fip_fast._plan): a FIP whose steps reuse plans and cached pointer tables must step exactly like
one that rebuilds everything every step, whatever happens to the gradients and the state between steps."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from fip_fast import FIP, ops
from fip_fast.backends import host

# (triton runs on CPU tensors under TRITON_INTERPRET=1, which tests/conftest.py sets)
IMPLS = ["foreach"] + [i for i in ("cpu", "triton") if ops.availability(i, "cpu")[0]]
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (0,), (7,)]
CONFIGS = {
    "plain": dict(eta_F=0.0),
    "fd": dict(trace_estimator="fd", trace_every=2, eta_F=0.01, rho=0.1),
    "lagged": dict(trace_estimator="lagged", trace_every=2, eta_F=0.01, rho=0.1),
    "precondition+anchor": dict(eta_F=0.0, precondition="fisher", eta_r=0.5),
}


def _planless(opt: FIP) -> FIP:
    opt._plan_group = lambda *args: None        # every step takes the general path: no plan, no cache keys
    return opt


def _make(cfg: dict, impl: str, planned: bool):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    f0 = {p: torch.rand_like(p) for p in ps} if cfg.get("eta_r") else None
    kw = dict(cfg)
    opt = FIP([dict(params=ps[:4]), dict(params=ps[4:], lr=0.02)], lr=0.05, momentum=0.9, fisher0=f0, impl=impl,
              **kw)
    return ps, (opt if planned else _planless(opt))


def _loss(ps, used):
    return sum(((p - 0.3) ** 2).sum() + torch.sin(p).sum() for i, p in enumerate(ps) if used[i])


def _set_grads(ps, used, how: str, rng: random.Random) -> None:
    """Gradients of the loss, delivered the way ``how`` says (fresh tensors, written into the old ones, storage
    swapped under the old tensor object), None for the unused parameters."""
    grads = torch.autograd.grad(_loss(ps, used), [p for p, u in zip(ps, used) if u], allow_unused=True)
    it = iter(grads)
    for p, u in zip(ps, used):
        if not u:
            p.grad = None
            continue
        g = next(it).detach()
        if how == "inplace" and p.grad is not None:
            p.grad.copy_(g)
        elif how == "swap" and p.grad is not None:
            p.grad.data = g.clone()
        else:
            p.grad = g.clone()


@pytest.fixture(params=["cpp", "python"])
def host_helper(request):
    """The step's host work in C++ (fip_fast.backends.host, when it is built) or in its Python versions."""
    if request.param == "python":
        with host.python_versions():
            yield request.param
        return
    if not host.wait():
        pytest.skip(f"C++ host helper unavailable: {host.status()}")
    yield request.param


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_planned_steps_equal_planless_steps(name, impl, host_helper):
    cfg = CONFIGS[name]
    runs = [_make(cfg, impl, planned) for planned in (True, False)]
    rng = random.Random(1)
    for step in range(24):
        used = [rng.random() > 0.15 for _ in SHAPES] if step % 5 == 3 else [True] * len(SHAPES)
        how = rng.choice(["fresh", "inplace", "swap"])
        reload = step % 7 == 6
        for ps, opt in runs:
            def closure():
                _set_grads(ps, used, how, random.Random(step))
                return None
            if cfg.get("trace_estimator") == "lagged":
                opt.apply_perturbation()
            with torch.enable_grad():
                closure()
            opt.step(closure if cfg.get("trace_estimator") == "fd" else None)
            if reload:   # a state dict round trip: the plans must be rebuilt from the loaded state
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        (pa, oa), (pb, ob) = runs
        for a, b in zip(pa, pb):
            assert torch.equal(a, b), f"step {step}: parameters differ"
        for a, b in zip(pa, pb):
            sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
            assert sa.keys() == sb.keys()
            for k in sa:
                assert torch.equal(sa[k], sb[k]), f"step {step}: state[{k!r}] differs"


@pytest.mark.parametrize("impl", IMPLS)
def test_each_tensor_keeps_its_own_step_count(impl):
    """Step counts are views of one vector per plan; a parameter left out of some steps keeps its own count."""
    ps = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = FIP(ps, lr=0.01, eta_F=0.0, impl=impl)
    for k in range(6):
        for i, p in enumerate(ps):
            p.grad = torch.ones(3) if (i != 2 or k % 2 == 0) else None
        opt.step()
    assert [float(opt.state[p]["step"]) for p in ps] == [6.0, 6.0, 3.0]


def test_steady_state_reuses_the_plan_and_uses_a_moved_gradient():
    ps = [nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = FIP(ps, lr=0.01, eta_F=0.0)
    for p in ps:
        p.grad = torch.ones(4)
    opt.step()
    plan = opt._plans[id(opt.param_groups[0])]
    opt.step()
    assert opt._plans[id(opt.param_groups[0])] is plan          # same parameters, same state: the plan is reused
    ps[1].grad = torch.full((4,), 2.0)                           # a new tensor, elsewhere in memory
    opt.step()
    assert opt._plans[id(opt.param_groups[0])] is plan          # gradients may move under a plan
    # the new gradient was used: momentum buffer = 0.95·(0.95·1 + 1) + 2 after three steps with gradients 1, 1, 2
    assert torch.allclose(opt.state[ps[1]]["momentum_buffer"], torch.full((4,), 0.95 * (0.95 + 1) + 2.0))
    ps[0].grad = None                                             # the set of parameters with a gradient changes
    opt.step()
    assert opt._plans[id(opt.param_groups[0])] is not plan


def test_invalidate_plans_after_replacing_state_by_hand():
    ps = [nn.Parameter(torch.zeros(2))]
    opt = FIP(ps, lr=1.0, momentum=0.5, eta_F=0.0)
    ps[0].grad = torch.ones(2)
    opt.step()
    opt.state[ps[0]]["momentum_buffer"] = torch.full((2,), 10.0)   # surgery outside load_state_dict
    opt.invalidate_plans()
    opt.step()
    assert torch.allclose(opt.state[ps[0]]["momentum_buffer"], torch.full((2,), 6.0))   # 0.5·10 + 1


def test_a_parameter_swapped_in_the_group_is_stepped_not_the_old_one():
    """Even when the new parameter takes over the old one's gradient tensor (same pointers), the plan is not
    reused for the old parameter."""
    old, other = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    opt = FIP([old, other], lr=1.0, momentum=0.0, eta_F=0.0)
    old.grad, other.grad = torch.ones(3), torch.ones(3)
    opt.step()
    new = nn.Parameter(torch.zeros(3))
    new.grad = old.grad
    opt.param_groups[0]["params"][0] = new
    opt.step()
    assert torch.equal(new.detach(), -torch.ones(3)) and torch.equal(old.detach(), -torch.ones(3))
