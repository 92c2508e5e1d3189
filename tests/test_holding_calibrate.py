"""universal_perturbation.calibrate: δ's bound from the data (fip_fast.pipeline._universal.calibrate_eps)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_purify import backdoored_tiny_cnn
from torch import nn

from fip_fast import pipeline as P
from fip_fast.pipeline import _universal as U
from fip_fast.pipeline import holding as H

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored(one_thread):
    return backdoored_tiny_cnn()


def test_calibration_takes_twice_the_largest_radius_that_keeps_the_share(monkeypatch):
    """Radii eps/2, eps/4, … are probed largest first and the probing stops at the first that leaves ≥ q of the
    clean accuracy; the bound is twice that radius, eps/8 when none passes."""
    model = nn.Linear(4, 3)
    x, y = torch.rand(10, 4), torch.randint(3, (10,))
    with torch.no_grad():
        acc0 = float((model(x).argmax(1) == y).float().mean())
    for holds_below, want, probes in ((0.1, 0.2, 1), (0.05, 0.1, 2), (0.02, 0.025, 4), (0.001, 0.025, 4)):
        seen = []

        def left(m, xb, yb, radius, lo, hi, holds_below=holds_below):
            seen.append(radius)
            return acc0 if radius <= holds_below * (hi - lo) + 1e-12 else 0.0

        monkeypatch.setattr(U, "_excluded_accuracy", left)
        cal = U.calibrate_eps(model, x, y, U.UniversalPerturbation(eps=0.2, calibrate=0.5))
        assert cal.eps == pytest.approx(want) and len(cal.probed) == probes == len(seen)
        assert [r for r, _ in cal.probed] == pytest.approx([0.2 / 2 ** k for k in range(1, probes + 1)])
        assert cal.clean_acc == pytest.approx(acc0)
    with pytest.raises(ValueError, match="needs universal_perturbation.calibrate"):
        U.calibrate_eps(model, x, y, U.UniversalPerturbation(calibrate=None))


def test_excluded_perturbation_erases_weak_evidence_not_strong():
    """A linear model reading class evidence of amplitude 0.3: a universal perturbation of radius 0.01 leaves every
    sample right; one of 1.0 (the attracted class left out) brings the other classes down — and the model is left
    in the mode it came in."""
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = 0.5 + 0.3 * nn.functional.one_hot(y, 3).float() + 0.01 * torch.randn(60, 3)
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    model.train()
    assert U._excluded_accuracy(model, x, y, 0.01, 0.0, 2.0) == 1.0
    assert U._excluded_accuracy(model, x, y, 1.0, 0.0, 2.0) <= 0.6
    cal = U.calibrate_eps(model, x, y, U.UniversalPerturbation(eps=0.2, calibrate=0.5))
    assert cal.eps == pytest.approx(0.2) and model.training


def test_purify_calibrates_once_without_side_effects(backdoored, monkeypatch):
    """Through purify: the bound the calibration set is the one δ is held to (report.extra); a calibration that
    keeps eps leaves the purification bit for bit what it is without one (no state of the model, its BatchNorm or
    the random streams is touched); bad values name the field."""
    model, (xc, yc), _ = backdoored

    def run(q):
        return P.purify(copy.deepcopy(model).train(), (xc, yc), method="fip", steps=5, progress=False, val_fraction=0,
                        universal_perturbation=dict(eps=0.2, calibrate=q))

    plain, kept = run(None), run(1e-6)
    assert "calibration" not in plain[1].extra["universal_perturbation"]
    cal = kept[1].extra["universal_perturbation"]["calibration"]
    assert cal["eps"] == 0.2 and len(cal["probed"]) == 1
    for k, v in plain[0].state_dict().items():
        assert torch.equal(v, kept[0].state_dict()[k]), k
    monkeypatch.setattr(U, "_excluded_accuracy", lambda *a: 0.0)      # fragile everywhere: the smallest bound
    up = run(0.5)[1].extra["universal_perturbation"]
    width = float(xc.max() - xc.min())
    assert up["eps"] == up["calibration"]["eps"] == pytest.approx(0.025)
    assert 0 < up["linf"] <= 0.025 * width * 1.0001
    with pytest.raises(ValueError, match="universal_perturbation.calibrate"):
        H.resolve_holding(dict(calibrate=1.5))
    with pytest.raises(ValueError, match="universal_perturbation.calibrate"):
        H.resolve_holding(dict(calibrate=0))
