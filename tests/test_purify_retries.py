"""``purify(retries=…)``: a run that lost more clean accuracy than accepted is run again from θ0 at half the learning
rate (:data:`fip_fast.pipeline.report.RETRIES` times at most), each abandoned try recorded in ``report.retries``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import purify
from fip_fast.pipeline.report import RETRIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    """A small MLP fitted to 100 % on 200 flat samples of four clusters (flat inputs: the holding options' "auto"
    stays off, so these runs are the plain optimizers)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat(50)
    x = centers[y] + torch.randn(200, 16, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert bool((model(x).argmax(1) == y).all())
    return model, (x, y)


def _purify(fitted, **kw):
    model, clean = fitted
    return purify(copy.deepcopy(model), clean, steps=20, progress=False, **kw)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_run_that_loses_the_accuracy_is_run_again_from_theta0_at_half_the_rate(fitted):
    # lr 20 leaves 72 % of the 200 samples right, lr 10 71.5 %: both abandoned; lr 5 keeps 100 %
    model, rep = _purify(fitted, method="fip", lr=20.0, retries=2)
    assert [t.lrs for t in rep.retries] == [{"lr": 20.0}, {"lr": 10.0}]
    assert all(t.accuracy.exceeded and t.accuracy.data == "purification" for t in rep.retries)
    assert rep.config["lr"] == 5.0 and not rep.accuracy.exceeded and rep.accuracy.after == 1.0
    assert not any("points lost" in w for w in rep.warnings)       # the returned try's warnings only
    # the last try is exactly a run at lr 5 from θ0 (not from the abandoned try's weights)
    direct, _ = _purify(fitted, method="fip", lr=5.0, retries=0)
    assert _same(model, direct)
    assert rep.to_dict()["retries"][0]["lrs"] == {"lr": 20.0}


def test_the_last_try_is_returned_and_flagged_when_every_try_loses_it(fitted):
    model, rep = _purify(fitted, method="fip", lr=20.0, retries=1)
    assert [t.lrs for t in rep.retries] == [{"lr": 20.0}]
    assert rep.config["lr"] == 10.0 and rep.accuracy.exceeded
    assert any("points lost" in w for w in rep.warnings)


def test_fast_fip_halves_both_of_its_rates(fitted):
    model, rep = _purify(fitted, method="fast_fip", lr=300.0, retries=2)      # lr 300: 25 % right
    assert [t.lrs for t in rep.retries] == [{"lr": 300.0, "lr_delta": 1.0}]
    assert rep.config["lr"] == 150.0 and rep.config["lr_delta"] == 0.5 and not rep.accuracy.exceeded


def test_a_run_that_keeps_its_accuracy_runs_once(fitted):
    model, rep = _purify(fitted, method="fip", lr=5.0)
    assert rep.retries == [] and rep.config["lr"] == 5.0
    once, _ = _purify(fitted, method="fip", lr=5.0, retries=0)
    assert _same(model, once)
    assert RETRIES == 2


def test_no_retry_with_retries_0_a_checkpoint_dir_or_no_learning_rate(fitted, tmp_path):
    for kw in (dict(retries=0), dict(checkpoint_dir=str(tmp_path / "ck"))):
        _, rep = _purify(fitted, method="fip", lr=20.0, **kw)
        assert rep.retries == [] and rep.accuracy.exceeded and rep.config["lr"] == 20.0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_bad_retries_are_named(fitted, bad):
    with pytest.raises(ValueError, match="retries must be an int"):
        _purify(fitted, method="fip", retries=bad)
