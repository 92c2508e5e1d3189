"""SAU (fip_fast.baselines.sau): the shared-adversarial masks, the inner PGD, the unlearning loss, and the purification.

* ``adversarial_masks`` on hand-set predictions, and on a 1-D pair of nearest-centre classifiers whose decision
  regions are known in closed form (so "shared" is checked against geometry, not against argmax code).
* ``shared_pgd`` stays in the L∞ ball and the clamp range, and raises the shared objective J above its start.
* ``shared_unlearning_loss`` equals −log(1 − p) written out, touches only masked rows, and one gradient step lowers
  θ's probability of θ0's adversarial label on x̃.
* End to end on the synthetic backdoor of ``tests/_synthetic.py``: SAU lowers ASR where the same run without the
  unlearning term (λ_shared = 0: Adam fine-tuning plus an unused adversarial pass) does not.
* ``purify(method="sau")``, ``augment="shift"``, input checks, flags and mode restored.
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

from fip_fast.baselines.sau import (
    _init_delta,
    _outer_loss,
    _project,
    adversarial_masks,
    run_sau,
    shared_objective,
    shared_pgd,
    shared_unlearning_loss,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import make_task  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return make_task(0)


# ------------------------------------------------------------------------------------------------ masks
def test_masks_on_hand_set_predictions():
    # sample:            0  1  2  3  4
    pred = torch.tensor([1, 2, 0, 3, 2])       # θ(x̃)
    pred_ref = torch.tensor([1, 2, 1, 3, 1])   # θ0(x̃)
    clean = torch.tensor([0, 2, 0, 0, 0])      # θ(x)
    clean_ref = torch.tensor([0, 0, 0, 3, 0])  # θ0(x)
    fooled, fooled_ref, shared = adversarial_masks(pred, pred_ref, clean, clean_ref)
    assert fooled.tolist() == [True, False, False, True, True]
    assert fooled_ref.tolist() == [True, True, True, False, True]
    # 0: both fooled to 1 → shared; 1: θ not fooled; 2: θ not fooled; 3: θ0 not fooled; 4: fooled to 2 vs 1
    assert shared.tolist() == [True, False, False, False, False]
    # several references (the outer step: θ0 must differ from y and from its clean prediction)
    y = torch.tensor([0, 0, 1, 0, 0])
    _, f2, _ = adversarial_masks(pred, pred_ref, y, (y, clean_ref))
    assert f2.tolist() == [True, True, False, False, True]


class _Centres(nn.Module):
    """1-D nearest-centre classifier: logits_k = −s·(x − c_k)², so class k wins on the interval of points
    nearest to c_k (boundaries at the midpoints)."""

    def __init__(self, centres, s=4.0):
        super().__init__()
        self.register_buffer("c", torch.tensor(centres, dtype=torch.float64))
        self.s = s

    def forward(self, x):
        return -self.s * (x.reshape(-1, 1) - self.c) ** 2


def _region(x, bounds):
    """Label of each point from its interval between the (sorted) boundaries."""
    return torch.bucketize(x.reshape(-1), torch.tensor(bounds, dtype=x.dtype))


_REF, _CUR = [0.5, 1.5, 2.5], [0.3, 1.5, 4.5]     # θ0: classes 0 | 1 | 2 split at 1.0, 2.0; θ: at 0.9, 3.0


def _expected(xt, y):
    lab, lab_ref = _region(xt, [0.9, 3.0]), _region(xt, [1.0, 2.0])
    return lab != y, lab_ref != y, (lab != y) & (lab_ref != y) & (lab == lab_ref)


def test_masks_match_the_decision_regions():
    ref, cur = _Centres(_REF), _Centres(_CUR)
    xt = (0.025 + 0.05 * torch.arange(80, dtype=torch.float64)).repeat(3)[:, None]   # no point on a boundary
    y = torch.arange(3).repeat_interleave(80)
    with torch.no_grad():
        got = adversarial_masks(cur(xt).argmax(1), ref(xt).argmax(1), y, y)
    want = _expected(xt, y)
    for g, w in zip(got, want):
        assert g.tolist() == w.tolist()
    fooled, fooled_ref, shared = want
    # every case occurs: shared, only θ, only θ0, both fooled to different labels (e.g. x̃ = 0.95, y = 2)
    assert shared.any() and (fooled & ~fooled_ref).any() and (~fooled & fooled_ref).any()
    assert (fooled & fooled_ref & ~shared).any()


def test_pgd_flips_the_reachable_sample_to_a_shared_label():
    ref, cur = _Centres(_REF), _Centres(_CUR)
    # within ε = 0.5: A (0.6) can reach 1.1, where both say 1; B (1.6) 2.1, only θ0 says 2; D (0.2) nobody;
    # F (0.45) 0.95, only θ says 1.  From the "max" start A is shared at once, and stays (no gradient left there).
    x = torch.tensor([[0.6], [1.6], [0.2], [0.45]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 0])
    delta, _ = shared_pgd(cur, ref, x, y, eps=0.5, alpha=0.125, steps=8, init="max")
    xt = x + delta
    with torch.no_grad():
        got = adversarial_masks(cur(xt).argmax(1), ref(xt).argmax(1), y, y)
    for g, w in zip(got, _expected(xt, y)):
        assert g.tolist() == w.tolist()
    assert got[2].tolist() == [True, False, False, False]
    assert float(xt[0]) > 1.0 and float(delta.abs().max()) <= 0.5 + 1e-12


# ------------------------------------------------------------------------------------------------ PGD
def _objective(cur, ref, x, y, delta):
    with torch.no_grad():
        lo, lr_ = cur(x + delta), ref(x + delta)
        masks = adversarial_masks(lo.argmax(1), lr_.argmax(1), cur(x).argmax(1), ref(x).argmax(1))
        return float(shared_objective(lo, lr_, y, *masks)), masks


@pytest.mark.parametrize("init", ["max", "random", "zero"])
def test_pgd_stays_in_ball_and_clamp_and_raises_the_objective(task, init):
    ref = task.model.eval()
    cur = copy.deepcopy(ref)
    with torch.no_grad():                 # θ ≠ θ0, so the JS term is live (at θ = θ0 it is identically 0)
        for p in cur.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cur.eval()
    x, y = task.clean_x[:64], task.clean_y[:64]
    eps, clamp = 0.8, (-3.0, 3.0)
    delta, it = shared_pgd(cur, ref, x, y, eps=eps, alpha=0.2, steps=5, init=init, clamp=clamp,
                           generator=torch.Generator().manual_seed(0))
    assert delta.shape == x.shape and not delta.requires_grad and 1 <= it <= 5
    assert float(delta.abs().max()) <= eps + 1e-6       # everywhere, also where x itself is outside the clamp range
    inside = (x >= clamp[0]) & (x <= clamp[1])
    xt = x + delta
    assert not bool(inside.all())                       # the data do reach outside (−3, 3): that case is exercised
    assert bool(((xt[inside] >= clamp[0] - 1e-6) & (xt[inside] <= clamp[1] + 1e-6)).all())
    start = _project(_init_delta(x, eps, init, torch.Generator().manual_seed(0)), x, eps, clamp)
    j_zero, j_start, j_end = (_objective(cur, ref, x, y, d)[0] for d in (torch.zeros_like(x), start, delta))
    assert j_end > j_start and j_end > j_zero
    assert all(p.grad is None for p in cur.parameters())           # gradients w.r.t. δ only


def test_pgd_adversarial_term_alone_fools_both_models(task):
    """β_shared = 0: J is the CE of both models on the not-yet-fooled samples, so PGD is a plain (untargeted)
    attack on both; at θ = θ0 every sample it fools is fooled to the same label by both, i.e. shared."""
    ref = task.model.eval()
    cur = copy.deepcopy(ref).eval()
    x, y = task.clean_x[:64], task.clean_y[:64]
    delta, _ = shared_pgd(cur, ref, x, y, eps=1.0, alpha=0.25, steps=5, init="zero", beta_shared=0.0)
    _, (fooled, fooled_ref, shared) = _objective(cur, ref, x, y, delta)
    assert float(fooled.float().mean()) > 0.9 and torch.equal(fooled, fooled_ref) and torch.equal(shared, fooled)


# ------------------------------------------------------------------------------------------------ unlearning loss
def test_unlearning_loss_formula_and_mask():
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, True, True, False, False])
    loss = shared_unlearning_loss(z, lab, mask)
    p = F.softmax(z.detach(), 1).gather(1, lab[:, None]).squeeze(1)
    ref = -(torch.log(1 - p) * mask).sum() / 6
    assert math.isclose(float(loss.detach()), float(ref), rel_tol=1e-6)
    loss.backward()
    assert torch.equal(z.grad[~mask], torch.zeros_like(z.grad[~mask]))    # unmasked rows untouched
    assert bool((z.grad[mask].gather(1, lab[mask][:, None]) > 0).all())  # descent lowers ŷ0's logit
    assert float(shared_unlearning_loss(z, lab, torch.zeros(6, dtype=torch.bool)).detach()) == 0.0


def test_one_unlearning_step_lowers_the_shared_label_probability(task):
    ref = task.model.eval()
    cur = copy.deepcopy(ref).eval()
    x, y = task.clean_x[:64], task.clean_y[:64]
    delta, _ = shared_pgd(cur, ref, x, y, eps=4.0, alpha=1.0, steps=5, init="random",
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lab_ref = ref(x + delta).argmax(1)
        clean_ref = ref(x).argmax(1)
        mask = (lab_ref != y) & (lab_ref != clean_ref)

        def p_shared():
            return F.softmax(cur(x + delta), 1).gather(1, lab_ref[:, None]).squeeze(1)[mask]

        before = p_shared()
    assert int(mask.sum()) >= 5
    loss, _, fooled_rate = _outer_loss(cur, ref, x, y, delta, clean_ref, F.cross_entropy, (0.0, 0.0, 1.0),
                                       "ref_fooled")
    assert math.isclose(fooled_rate, float(mask.float().mean()))
    with torch.no_grad():     # "shared" unlearns a subset of the θ0-fooled samples: a smaller sum of terms ≥ 0
        loss_s, shared_rate, _ = _outer_loss(cur, ref, x, y, delta, clean_ref, F.cross_entropy, (0.0, 0.0, 1.0),
                                             "shared")
    assert 0 < float(loss_s) <= float(loss.detach()) and 0 < shared_rate <= fooled_rate
    loss.backward()
    with torch.no_grad():
        for p in cur.parameters():
            p.sub_(1e-2 * p.grad)
        after = p_shared()
    assert float(after.mean()) < float(before.mean()) - 0.02


# ------------------------------------------------------------------------------------------------ end to end
# Synthetic backdoor (10×10 inputs of scale ≈ 3, trigger at L∞ distance ≈ 4.3 from the clean images): at the
# defaults (ε = 0.2, "max" start) PGD finds few adversarial examples there, and those from the "max" corner land on
# classes 2 / 3, not the target.  With ε = 4 (≈ the trigger's size), α = 1, a random start, lr 1e-3, 60 steps of
# batch 32, ASR after, SAU vs the same run with λ_shared = 0, seeds 0 / 1 / 2: 0.40 / 0.08 / 0.25 vs
# 0.95 / 0.76 / 0.76, clean ACC 1.00 everywhere (40 steps: 0.47 / 0.17 / 0.30 vs 0.98 / 0.90 / 0.86).
_E2E = dict(steps=60, batch_size=32, lr=1e-3, eps=4.0, alpha=1.0, init="random", progress=False)


def test_sau_lowers_asr_where_the_same_run_without_unlearning_does_not(task):
    clean = (task.clean_x, task.clean_y)
    m, info = run_sau(copy.deepcopy(task.model), clean, **_E2E)
    c, info_c = run_sau(copy.deepcopy(task.model), clean, lam_shared=0.0, **_E2E)
    asr, asr_c = task.asr(m), task.asr(c)
    assert asr < 0.5 and asr < asr_c - 0.3, (asr, asr_c)
    assert task.acc(m) > 0.95
    assert info["skipped_steps"] == 0 and 0 < info["ref_fooled_rate"] < 1 and info["pgd_iterations"] <= 5
    assert set(info) >= {"method", "steps", "wall_time_s", "trainable_params", "loss_history", "skipped_steps",
                         "shared_rate"}


def test_runner_contract_purify_augment_and_checks(task):
    net = copy.deepcopy(task.model)
    net[0].weight.requires_grad_(False)               # a frozen tensor stays frozen and unchanged
    w0 = net[0].weight.detach().clone()
    net.train()
    m, info = run_sau(net, (task.clean_x, task.clean_y), steps=2, batch_size=16, pgd_steps=1, augment="shift",
                      progress=False)
    runs = [run_sau(copy.deepcopy(task.model), (task.clean_x, task.clean_y), steps=2, batch_size=16, pgd_steps=1,
                    progress=False, augment=a)[0] for a in ("shift", None, "none")]
    assert not torch.equal(runs[0][-1].weight, runs[1][-1].weight)    # the shifted batches did reach the model
    assert torch.equal(runs[1][-1].weight, runs[2][-1].weight)        # and "none" is no augmentation
    assert info["method"] == "sau" and info["steps"] == 2 and info["pgd_iterations"] <= 1
    assert info["trainable_params"] == sum(p.numel() for p in net.parameters()) - w0.numel()
    assert not m.training and not any(mod.training for mod in m.modules())
    assert not m[0].weight.requires_grad and torch.equal(m[0].weight, w0)
    assert all(p.requires_grad for n, p in m.named_parameters() if n != "0.weight")

    pipeline = pytest.importorskip("fip_fast.pipeline")
    assert "sau" in pipeline.available_methods()
    m2, rep = pipeline.purify(copy.deepcopy(task.model), (task.clean_x, task.clean_y), method="sau", steps=3,
                              batch_size=16, progress=False, pgd_steps=2)
    assert rep.steps_run == 3 and rep.extra["method"] == "sau" and rep.extra["pgd_steps"] == 2

    clean = (task.clean_x[:8], task.clean_y[:8])
    for bad, name in [(dict(eps=-0.1), "eps"), (dict(pgd_steps=0), "pgd_steps"), (dict(alpha=float("nan")), "alpha"),
                      (dict(init="gauss"), "init"), (dict(clamp=(1.0, 0.0)), "clamp"),
                      (dict(lam_shared=-1.0), "lam_shared"), (dict(unlearn_on="x"), "unlearn_on")]:
        with pytest.raises(ValueError, match=name):
            run_sau(copy.deepcopy(task.model), clean, steps=1, progress=False, **bad)
