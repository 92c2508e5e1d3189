"""Super-FT and FST (fip_fast.baselines.superft / .fst): each mechanism checked directly, then end to end.

* Super-FT: the optimizer's lr follows the schedule (cosine / cyclic / onecycle, peak = lr); clipping caps the
  first update at lr·clip; a large peak lr removes the synthetic backdoor that a small one leaves, clean accuracy
  kept.
* FST: the re-initialized head differs from the original and is a function of the seed; the penalty's gradient is
  α·W₀ (autograd, and in a real step); ‖W‖ = ‖W₀‖ at every step; the synthetic backdoor is removed at the defaults;
  the final head is less aligned with W₀ than plain fine-tuning's (and than without the penalty).
* Both: registered with purify, ``augment="shift"`` accepted, flags / eval mode restored, bad inputs named.

The synthetic backdoor is the one of ``tests/test_baselines.py`` (8×8 bars, blend trigger, a small BN-CNN).
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

from fip_fast.baselines.fst import alignment_penalty, reinit_head_, run_fst
from fip_fast.baselines.ft import run_ft
from fip_fast.baselines.superft import run_superft, superft_lr_factor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bars import acc_asr as _acc_asr  # noqa: E402
from _bars import backdoored_bars  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backdoored(one_thread):
    return backdoored_bars()


def _tiny():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    return net, (x, y)


KW = dict(steps=60, batch_size=32, progress=False)


def test_synthetic_backdoor_is_planted(backdoored):
    net, _, test, trig = backdoored
    acc, asr = _acc_asr(net, test, trig)
    assert acc > 0.97 and asr > 0.95


# ------------------------------------------------------------------------------------------------ Super-FT
@pytest.mark.parametrize("schedule", ["cosine", "cyclic", "onecycle"])
def test_superft_lr_follows_schedule(schedule):
    net, data = _tiny()
    lr, T = 0.3, 40
    _, info = run_superft(net, data, steps=T, lr=lr, lr_schedule=schedule, batch_size=8, progress=False)
    steps, lrs = zip(*info["lr_history"])
    assert list(steps) == list(range(T))            # 40 steps ≤ 40 history points: every step recorded
    assert max(lrs) == pytest.approx(lr, rel=1e-12) and info["peak_lr"] == lr
    for t, v in info["lr_history"]:                 # what the optimizer held at step t
        assert v == pytest.approx(lr * superft_lr_factor(schedule, t, T, warmup=info["warmup"]), rel=1e-12)
    d = [b - a for a, b in zip(lrs, lrs[1:])]
    if schedule == "cosine":                        # peak at 0, half at T/2, decreasing to ~0
        assert lrs[0] == lr and lrs[T // 2] == pytest.approx(lr / 2) and all(x <= 0 for x in d)
        assert lrs[-1] < 0.01 * lr
    elif schedule == "cyclic":                      # 2 triangles of 20 steps: floors at 0, 20; peaks at 10, 30
        assert lrs[10] == lrs[30] == pytest.approx(lr)
        assert lrs[0] == lrs[20] == pytest.approx(0.01 * lr)
        assert all(x > 0 for x in d[0:10] + d[20:30]) and all(x < 0 for x in d[10:19] + d[30:])
        assert lrs[-1] < 0.15 * lr
    else:                                           # onecycle: 4 warm-up steps from lr/25, then cosine to ~0
        assert info["warmup"] == 4 and lrs[0] == pytest.approx(lr / 25) and lrs[3] == pytest.approx(lr)
        assert all(x > 0 for x in d[:3]) and all(x <= 0 for x in d[3:]) and lrs[-1] < 0.01 * lr


@pytest.mark.parametrize("clip", [1.0, None])
def test_superft_clipping_caps_the_update(clip):
    net, data = _tiny()
    before = [p.detach().clone() for p in net.parameters()]
    lr = 0.5

    def big_loss(logits, y):     # a gradient far above the clip threshold
        return 1e4 * F.cross_entropy(logits, y)

    # cosine: step 0 runs at the peak lr (the default cyclic schedule starts at its floor).
    _, info = run_superft(net, data, steps=1, lr=lr, lr_schedule="cosine", momentum=0.0, weight_decay=0.0,
                          clip_grad=clip, batch_size=32, loss_fn=big_loss, progress=False)
    step = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(net.parameters(), before)))
    if clip is None:             # unclipped: lr·‖g‖, orders of magnitude above lr·1
        assert step > 100 * lr and info["clipped_steps"] == 0 and info["max_grad_norm"] is None
    else:                        # plain SGD, one step at the peak lr: ‖Δθ‖ = lr·clip exactly
        assert step == pytest.approx(lr * clip, rel=1e-4)
        assert info["clipped_steps"] == 1 and info["max_grad_norm"] > 100 * clip


def test_superft_large_lr_lowers_asr_and_keeps_accuracy(backdoored):
    """The tiny net sits at CE ≈ 1e-5 on the clean data, so only a very large peak lr moves it; the MNIST demo's
    default 0.1 does not (measured, default cyclic schedule, seeds 0/1/2: ASR 1.00 at lr 0.1, 0.98 / 0.97 / 1.00
    at 1, 0.19 / 0.00 / 0.10 at 2.5, 0.00 at 5, clean accuracy 1.00 throughout)."""
    net, clean, test, trig = backdoored
    small, _ = run_superft(copy.deepcopy(net), clean, lr=0.1, **KW)
    large, info = run_superft(copy.deepcopy(net), clean, lr=5.0, **KW)
    (acc_s, asr_s), (acc, asr) = _acc_asr(small, test, trig), _acc_asr(large, test, trig)
    assert asr < 0.5 and asr < asr_s - 0.4 and acc > 0.95 and acc_s > 0.95
    assert info["skipped_steps"] == 0 and info["trainable_params"] == sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------------ FST
def test_fst_reinit_differs_and_is_deterministic(backdoored):
    net = backdoored[0]
    w0, b0 = net[7].weight.detach().clone(), net[7].bias.detach().clone()
    heads = []
    for seed in (0, 0, 1):
        h = copy.deepcopy(net[7])
        reinit_head_(h, seed)
        heads.append((h.weight.detach(), h.bias.detach()))
    (wa, ba), (wb, bb), (wc, _) = heads
    assert torch.equal(wa, wb) and torch.equal(ba, bb) and not torch.equal(wa, wc)
    assert not torch.allclose(wa, w0) and not torch.allclose(ba, b0)
    bound = 1 / math.sqrt(32)                          # nn.Linear's U(±1/√fan_in)
    assert wa.abs().max() <= bound and wa.abs().max() > 0.8 * bound
    # run_fst with 0 steps returns exactly the re-initialized head (seeded by `seed`).
    m, info = run_fst(copy.deepcopy(net), backdoored[1], steps=0, progress=False)
    assert torch.equal(m[7].weight, wa) and info["head"] == "7"
    assert abs(info["cos_after_reinit"]) < 0.3 and info["head_norm"] == pytest.approx(float(w0.norm()))


def test_fst_penalty_gradient_is_alpha_w_ori():
    torch.manual_seed(0)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w_ori = torch.randn(4, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad(alignment_penalty(w, w_ori, 0.3), w)
    torch.testing.assert_close(g, 0.3 * w_ori, rtol=0, atol=1e-15)
    # In the runner: one plain-SGD step with a zero data loss moves the head by −lr·α·W₀, then back onto the
    # sphere of radius ‖W₀‖.
    net, data = _tiny()
    w0 = net[2].weight.detach().clone()
    h = copy.deepcopy(net[2])
    reinit_head_(h, 0)
    lr, alpha = 0.5, 0.2
    want = h.weight.detach() - lr * alpha * w0
    want = want * w0.norm() / want.norm()
    m, _ = run_fst(net, data, steps=1, lr=lr, alpha=alpha, momentum=0.0, weight_decay=0.0, batch_size=8,
                   loss_fn=lambda logits, y: 0.0 * logits.sum(), progress=False)
    torch.testing.assert_close(m[2].weight.detach(), want, rtol=1e-6, atol=1e-7)


def test_fst_norm_constraint_holds_after_every_step(backdoored):
    net, clean, _, _ = backdoored
    net = copy.deepcopy(net)
    target = float(net[7].weight.detach().norm())
    seen = []     # ‖W‖ when the head is used: at step t ≥ 1, right after step t − 1's projection
    h = net[7].register_forward_pre_hook(lambda mod, inp: seen.append(float(mod.weight.detach().norm())))
    m, info = run_fst(net, clean, **KW)
    h.remove()
    assert len(seen) == 60 and seen[0] != pytest.approx(target, rel=1e-3)    # step 0: the raw re-init
    assert all(n == pytest.approx(target, rel=1e-5) for n in seen[1:])
    assert float(m[7].weight.detach().norm()) == pytest.approx(target, rel=1e-5) and info["head_norm"] == target


def test_fst_lowers_asr_keeps_accuracy_and_shifts_the_head(backdoored):
    """Defaults (lr 0.01, α 0.1), 60 steps: measured ASR 0.04 / 0.24 / 0.00 on seeds 0/1/2 of this task (α 0,
    i.e. re-init only: 0.22 / 0.33 / 0.00; plain FT 1.00)."""
    net, clean, test, trig = backdoored
    m, info = run_fst(copy.deepcopy(net), clean, **KW)
    acc, asr = _acc_asr(m, test, trig)
    assert asr < 0.5 and acc > 0.95 and info["skipped_steps"] == 0
    assert info["trainable_params"] == sum(p.numel() for p in net.parameters())
    w0 = net[7].weight.detach()
    ft, _ = run_ft(copy.deepcopy(net), clean, **KW)
    cos_ft = float(F.cosine_similarity(ft[7].weight.detach().flatten(), w0.flatten(), dim=0))
    _, info0 = run_fst(copy.deepcopy(net), clean, alpha=0.0, **KW)
    # FT stays aligned with the backdoored head; the penalty pushes W further from W₀ than re-init alone does.
    assert cos_ft > 0.9 and info["cos_to_original"] < info0["cos_to_original"] - 0.05
    assert info["cos_to_original"] < cos_ft - 0.3


# ------------------------------------------------------------------------------------------------ both
@pytest.mark.parametrize("method", ["superft", "fst"])
def test_registered_with_purify(backdoored, method):
    pipeline = pytest.importorskip("fip_fast.pipeline")
    assert method in pipeline.available_methods()
    net, clean, _, _ = backdoored
    m, rep = pipeline.purify(copy.deepcopy(net), clean, method=method, steps=5, batch_size=16, progress=False,
                             val_fraction=0.2)
    assert rep.steps_run == 5 and rep.extra["method"] == method and "val_acc" in rep.final
    assert rep.trainable_params == sum(p.numel() for p in net.parameters()) and not m.training


@pytest.mark.parametrize("fn", [run_superft, run_fst])
def test_augment_accepted_and_flags_restored(backdoored, fn):
    net, clean, _, _ = backdoored
    net = copy.deepcopy(net)
    net[0].weight.requires_grad_(False)               # a frozen tensor stays frozen and untouched
    w_frozen = net[0].weight.detach().clone()
    net.train()
    plain, _ = fn(copy.deepcopy(net), clean, steps=3, batch_size=16, progress=False)
    m, info = fn(net, clean, steps=3, batch_size=16, augment="shift", progress=False)
    assert info["steps"] == 3 and not m.training and not any(mod.training for mod in m.modules())
    assert not m[0].weight.requires_grad and torch.equal(m[0].weight, w_frozen)
    assert all(p.requires_grad for n, p in m.named_parameters() if n != "0.weight")
    assert not torch.equal(m[5].weight, plain[5].weight)       # the shifted views did change the run


@pytest.mark.parametrize("fn, kw, name", [
    (run_fst, dict(alpha=-0.1), "alpha"),
    (run_fst, dict(alpha=float("nan")), "alpha"),
    (run_fst, dict(lr_schedule="cyclic"), "lr_schedule"),
    (run_fst, dict(momentum=1.0), "momentum"),
    (run_fst, dict(head="nope"), "no sub-module"),
    (run_fst, dict(lr=-1.0), "lr"),
    (run_superft, dict(lr_schedule="linear"), "lr_schedule"),
    (run_superft, dict(warmup=1), "warmup"),
    (run_superft, dict(lr_schedule="onecycle", warmup=-1), "warmup"),
    (run_superft, dict(clip_grad=0.0), "clip_grad"),
    (run_superft, dict(cycles=0, lr_schedule="cyclic"), "cycles"),
    (run_superft, dict(cycle_floor=1.5, lr_schedule="cyclic"), "cycle_floor"),
    (run_superft, dict(weight_decay=-1e-4), "weight_decay"),
    (run_superft, dict(steps=-1), "steps"),
])
def test_bad_inputs_raise_naming_the_input(fn, kw, name):
    net, data = _tiny()
    with pytest.raises(ValueError, match=name):
        fn(net, data, **{"steps": 2, "progress": False, **kw})
