"""Copies of FIP and of the models it trains: ``copy.deepcopy`` / ``pickle`` of the optimizer itself, and of a model
that the lagged estimator's lazy perturbation has hooked."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast.optim import FIP


def _task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    return model, x, y


def _steps(model, opt, x, y, n):
    for _ in range(n):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def _copy(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("estimator", ["fd", "lagged"])
def test_a_copied_optimizer_steps_like_the_original(estimator, how):
    """A copy of (model, optimizer) taken between steps continues bit for bit as the original does: same impl,
    schedule, state; for "lagged", the copy's pending perturbation is applied at the copy's own forward."""
    model, x, y = _task()
    f0 = {p: torch.rand_like(p) for p in model.parameters()}
    opt = FIP(model.parameters(), lr=0.05, trace_estimator=estimator, trace_every=2, eta_F=0.01, fisher0=f0,
              impl="foreach")
    _steps(model, opt, x, y, 3)
    model2, opt2 = _copy((model, opt), how)
    assert opt2.impl == "foreach" and opt2.param_groups[0]["calls"] == 3
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    _steps(model, opt, x, y, 4)
    _steps(model2, opt2, x, y, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p2][k]), k
    assert not opt.is_perturbed and not opt2.is_perturbed


def test_a_model_hooked_by_the_lazy_perturbation_can_be_saved_whole():
    """torch.save(model) after lagged steps (the model carries the lazy perturbation's forward pre-hook): the
    loaded model's hook belongs to no optimizer and changes nothing; the original keeps training."""
    model, x, y = _task()
    opt = FIP(model.parameters(), lr=0.05, trace_estimator="lagged", trace_every=1, eta_F=0.01, impl="foreach")
    _steps(model, opt, x, y, 2)
    assert len(model._forward_pre_hooks) == 1
    loaded = _copy(model, "pickle")
    before = [p.detach().clone() for p in loaded.parameters()]
    loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.parameters()))
    model(x)
    assert opt.is_perturbed              # the original's hook still applies e at its forward
    _steps(model, opt, x, y, 1)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_taken_while_e_is_applied_takes_it_off_at_its_step(how):
    """Copied between the training forward and the step (the parameters hold θ + e): the copy knows e is applied,
    does not apply it a second time at its forward, and its step restores θ as the original's does."""
    model, x, y = _task()
    opt = FIP(model.parameters(), lr=0.05, trace_estimator="lagged", trace_every=1, eta_F=0.05, impl="foreach")
    _steps(model, opt, x, y, 2)
    model(x)
    assert opt.is_perturbed
    model2, opt2 = _copy((model, opt), how)
    assert opt2.is_perturbed
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert not opt2.is_perturbed
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
