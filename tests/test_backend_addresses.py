"""Parameters and state tensors that move between steps under a step plan (fip_fast._plan): the same tensor
objects with their elements somewhere else.  The fused backends (``impl="cpu"``, ``"triton"``) cache pointer tables
under a plan; a plan must notice the move, or the kernels write to the old memory — silently (the parameters stop
moving) when it is still alive, a heap corruption or a segfault when it was freed.  Each scenario trains the same
model with the fused backend and with ``impl="foreach"`` (which reads the tensors afresh every call) and compares.

The scenarios that crashed the process before the fix run in a subprocess, so a crash fails the test instead of
killing pytest.  Triton runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from _hang import run
from torch import nn

from fip_fast import FIP, ops
from fip_fast.backends import host

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = [i for i in ("cpu", "triton") if ops.availability(i, "cpu")[0]]
ESTIMATORS = {
    "plain": dict(eta_F=0.0, eta_r=0.5, weight_decay=0.01),
    "lagged": dict(trace_estimator="lagged", trace_every=1, eta_F=0.01, rho=0.05, eta_r=0.5),
}
STEPS, MOVE_AT = 7, 3
TOL = 1e-6


def _move(name: str, model: nn.Module, opt: FIP, keep: list) -> None:
    """Give the model's parameters (or the optimizer's state tensors) new memory, keeping the tensor objects."""
    if name == "data_clone_kept":            # the old storage stays alive (``keep``): no crash, silent before
        for p in model.parameters():
            keep.append(p.data)
            p.data = p.data.clone()
    elif name == "data_clone_freed":         # the old storage is freed
        for p in model.parameters():
            p.data = p.data.clone()
    elif name == "share_memory":             # new shared storage under the same storage object
        model.share_memory()
    elif name == "half_float":
        model.half()
        model.float()
    elif name == "swap_tensors":             # the Python objects keep their identity, the TensorImpls are swapped
        for p in model.parameters():
            torch.utils.swap_tensors(p, nn.Parameter(p.detach().clone()))
    elif name == "state_data":               # the optimizer's own state tensors get new memory
        for st in opt.state.values():
            for k in ("momentum_buffer", "fisher", "anchor"):
                if k in st:
                    st[k].data = st[k].data.clone()
    else:
        raise ValueError(f"unknown scenario {name!r}")


def _train(impl: str, scenario: str, estimator: str) -> tuple[list, list]:
    """(parameters, state tensors) after STEPS steps with the move between steps MOVE_AT and MOVE_AT + 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    f0 = {p: torch.rand_like(p) for p in model.parameters()}
    opt = FIP(model.parameters(), lr=0.05, momentum=0.9, fisher0=f0, impl=impl, **ESTIMATORS[estimator])
    lagged = estimator == "lagged"
    keep: list = []
    for step in range(STEPS):
        if step == MOVE_AT:
            _move(scenario, model, opt, keep)
        if lagged:
            opt.apply_perturbation()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    ps = [p.detach().clone() for p in model.parameters()]
    state = [opt.state[p][k].clone() for p in model.parameters() for k in sorted(opt.state[p])
             if isinstance(opt.state[p][k], torch.Tensor)]
    return ps, state


def compare(impl: str, scenario: str, estimator: str) -> dict:
    """The largest difference from ``impl="foreach"`` over the parameters and the state tensors."""
    host.wait()
    (pa, sa), (pb, sb) = _train("foreach", scenario, estimator), _train(impl, scenario, estimator)
    err = max([(a - b).abs().max().item() for a, b in zip(pa + sa, pb + sb) if a.numel()] + [0.0])
    return dict(err=err, n_params=len(pa), n_state=len(sa))


def _in_subprocess(impl: str, scenario: str, estimator: str) -> dict:
    code = ("import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "import test_backend_addresses as t; print(json.dumps(t.compare(*sys.argv[2:])))")
    here = os.path.dirname(os.path.abspath(__file__))
    r = run([sys.executable, "-c", code, here, impl, scenario, estimator], env=dict(os.environ))
    assert r.returncode == 0, (f"impl={impl!r} {scenario} ({estimator}) ended with exit status {r.returncode} "
                               f"(negative: killed by that signal):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


CRASHING = [("data_clone_freed", "plain"), ("share_memory", "plain"), ("half_float", "plain"),
            ("swap_tensors", "plain"), ("state_data", "plain"), ("half_float", "lagged")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scenario,estimator", CRASHING)
def test_moved_tensors_in_a_subprocess_match_foreach(impl, scenario, estimator):
    out = _in_subprocess(impl, scenario, estimator)
    assert out["err"] <= TOL, f"impl={impl!r} {scenario} ({estimator}): differs from foreach by {out['err']:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_data_reassigned_with_the_old_storage_alive_matches_foreach(impl, estimator):
    """The silent case: the kernels wrote to the old (still allocated) storage, the parameters stopped moving."""
    out = compare(impl, "data_clone_kept", estimator)
    assert out["err"] <= TOL, f"impl={impl!r}: differs from foreach by {out['err']:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_moved_parameters_are_seen_by_the_python_host_versions(impl):
    with host.python_versions():
        out = compare(impl, "data_clone_kept", "plain")
    assert out["err"] <= TOL, f"impl={impl!r}: differs from foreach by {out['err']:.3g}"


def test_a_move_replaces_the_plan_and_an_unmoved_step_keeps_it():
    p = nn.Parameter(torch.randn(5))
    opt = FIP([p], lr=0.1, eta_F=0.0)
    p.grad = torch.ones(5)
    opt.step()
    plan = opt._plans[id(opt.param_groups[0])]
    assert plan.unmoved()
    opt.step()
    assert opt._plans[id(opt.param_groups[0])] is plan
    p.data = p.data.clone()
    assert not plan.unmoved()
    opt.step()
    new = opt._plans[id(opt.param_groups[0])]
    assert new is not plan and new.unmoved() and new.devices[0].uid != plan.devices[0].uid


def test_addresses_equal_the_python_version_and_see_every_move():
    x = torch.randn(5, 6)
    ts = [torch.randn(4), nn.Parameter(torch.randn(3)), x[1:], x.t(), x[:, 2], x[2:2], torch.zeros(0),
          torch.randn(3, dtype=torch.float64)[1:], torch.randn(3, dtype=torch.float16)[2:], torch.randn(3).to_sparse()]
    rec = host.addresses(ts)
    with host.python_versions():
        assert host.addresses(ts) == rec and host.same_addresses(ts, rec)
    assert len(rec) == 8 * len(ts) and host.same_addresses(ts, rec)
    assert rec[:8] == ts[0].data_ptr().to_bytes(8, sys.byteorder)
    assert not host.same_addresses(ts[:-1], rec)                     # another length
    ts[1].data = ts[1].data.clone()
    assert not host.same_addresses(ts, rec)
    with host.python_versions():
        assert not host.same_addresses(ts, rec)
    s = torch.randn(4)
    rec = host.addresses([s])
    s.share_memory_()                                                  # same storage object, new memory
    assert not host.same_addresses([s], rec)
