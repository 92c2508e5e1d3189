"""Augmentation of the defender's clean set: :mod:`fip_fast.augment` and ``purify(..., augment=...)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _resume import uninterrupted_and_resumed  # tests/ is on sys.path
from torch import nn

from fip_fast import pipeline as P
from fip_fast.augment import AUGMENT_CHOICES, Augment, describe_augment, make_augment
from fip_fast.pipeline.data import augment_generator, split_clean, val_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shifted(x: torch.Tensor, oy: int, ox: int) -> torch.Tensor:
    """Reference: ``x`` (C, H, W) moved down by ``oy`` and right by ``ox`` pixels, zero fill, by plain loops."""
    c, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            if 0 <= i - oy < h and 0 <= j - ox < w:
                out[:, i, j] = x[:, i - oy, j - ox]
    return out


# ------------------------------------------------------------------------------------------------ Augment itself
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_shift_is_exact(channels):
    """A one-hot marker pixel (channel 0, image centre) tells the offset; the whole image — every channel — is
    the reference shift by it, zero-filled; offsets cover exactly [-shift, shift] on both axes; shape kept."""
    n, h, w, s = 300, 9, 11, 3
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, channels + 1, h, w, generator=g) + 0.5       # no zeros: the zero fill is visible
    x[:, 0] = 0.0
    x[:, 0, h // 2, w // 2] = 1.0
    out = Augment(shift=s)(x, _gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = set()
    for k in range(n):
        pos = torch.nonzero(out[k, 0] == 1.0)
        assert pos.shape[0] == 1, "the marker pixel must move, not vanish or duplicate"
        oy, ox = int(pos[0, 0]) - h // 2, int(pos[0, 1]) - w // 2
        assert abs(oy) <= s and abs(ox) <= s
        offsets.add((oy, ox))
        torch.testing.assert_close(out[k], _shifted(x[k], oy, ox), rtol=0, atol=0)
    assert {o[0] for o in offsets} == set(range(-s, s + 1)) == {o[1] for o in offsets}


def test_flip_flips_about_half():
    x = torch.rand(2000, 2, 6, 7, generator=_gen(3))
    out = Augment(shift=0, flip=True)(x, _gen(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all()), "every image is either kept or flipped left-right"
    assert 0.45 < flipped.float().mean().item() < 0.55
    assert torch.equal(Augment(shift=0, flip=False)(x, _gen(0)), x)


def test_deterministic_given_the_generator():
    x = torch.rand(16, 3, 8, 8, generator=_gen(4), dtype=torch.float64)
    a = Augment(shift=2, flip=True)
    assert torch.equal(a(x, _gen(7)), a(x, _gen(7)))
    assert not torch.equal(a(x, _gen(7)), a(x, _gen(8)))
    assert a(x, _gen(7)).dtype == torch.float64
    with pytest.raises(ValueError, match="image batches"):
        a(x[0], _gen(0))


def test_make_augment_spellings_and_errors():
    img = torch.rand(4, 3, 32, 32)
    for none in (None, False, "none"):
        assert make_augment(none, img) is None
    assert make_augment("shift", img) == Augment(4, False)
    assert make_augment("shift_flip", img[0]) == Augment(4, True)          # a sample works too
    assert make_augment("shift", torch.rand(2, 1, 28, 28)).shift == 4
    assert make_augment("shift", torch.rand(2, 1, 10, 10)).shift == 1
    fn = lambda x, g: x                                                  # noqa: E731
    assert make_augment(fn, torch.randn(4, 5)) is fn                     # a callable is the user's business
    assert AUGMENT_CHOICES == ("none", "shift", "shift_flip", "auto")
    with pytest.raises(ValueError, match="augment must be one of"):
        make_augment("rotate", img)
    with pytest.raises(ValueError, match="augment must be one of"):
        make_augment(True, img)
    for bad in (torch.randn(8, 5), torch.randint(0, 100, (8, 3, 4, 4)), torch.randn(8, 12, 6)[0]):
        with pytest.raises(ValueError, match="float image inputs"):
            make_augment("shift", bad)
    with pytest.raises(ValueError, match="float image inputs"):
        make_augment(Augment(2), torch.randn(8, 5))
    with pytest.raises(ValueError, match="shift must be an int"):
        Augment(shift=-1)
    assert [describe_augment(a) for a in (None, Augment(4), Augment(2, True), Augment(0, True))] == \
        ["none", "shift(4)", "shift(2)+flip", "flip"]


# ------------------------------------------------------------------------------------------------ purify
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 25, 3))


@pytest.fixture(scope="module")
def clean():
    g = _gen(0)
    y = torch.arange(90) % 3
    x = 0.2 * torch.rand(90, 1, 10, 10, generator=g)
    for k in range(3):
        x[y == k, 0, 2 + 2 * k:5 + 2 * k, 3:6] += 0.8
    return x, y


class _Recorder(P.Purifier):
    """Records every training batch; trains nothing (one dummy parameter)."""

    def __init__(self, seen):
        self.seen, self.params = seen, [nn.Parameter(torch.zeros(1))]

    def step(self, x, y):
        self.seen.append((x.clone(), y.clone()))
        return 0.0


def _recorded(clean, **kw):
    seen = []
    P.register_method("_rec_aug", lambda model, ctx: _Recorder(seen), kind="loop",
                      defaults=kw.pop("defaults", {"steps": 5, "batch_size": 8}), overwrite=True)
    _, rep = P.purify(_net(), clean, method="_rec_aug", progress=False, **kw)
    return seen, rep


def test_purify_augments_the_training_batches_of_step_t(clean):
    plain, rep0 = _recorded(clean)
    aug, rep1 = _recorded(clean, augment="shift")
    assert rep0.config["augment"] == "none" and rep1.config["augment"] == "shift(1)"
    assert len(plain) == len(aug) == 5
    assert any(not torch.equal(a[0], p[0]) for a, p in zip(aug, plain))
    for t, ((xa, ya), (xp, yp)) in enumerate(zip(aug, plain)):
        assert torch.equal(ya, yp)                                # the same samples, augmented views
        assert torch.equal(xa, Augment(1)(xp, augment_generator(0, t)))   # a function of (seed, t) only
    # New draws every step, seeded apart from the batch sampler (whose generator seeds with +17).
    draws = [torch.randint(0, 1000, (8,), generator=augment_generator(s, t)) for s in (0, 1) for t in range(4)]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    flip, rep2 = _recorded(clean, augment="shift_flip")
    assert rep2.config["augment"] == "shift(1)+flip"


def test_augment_as_a_method_default_that_the_user_overrides(clean):
    dflt = {"steps": 3, "batch_size": 8, "augment": "shift"}
    plain, _ = _recorded(clean, defaults={"steps": 3, "batch_size": 8})
    aug, rep = _recorded(clean, defaults=dict(dflt))
    assert rep.config["augment"] == "shift(1)" and not torch.equal(aug[0][0], plain[0][0])
    off, rep = _recorded(clean, defaults=dict(dflt), augment="none")
    assert rep.config["augment"] == "none" and all(torch.equal(a[0], p[0]) for a, p in zip(off, plain))


def test_auto_shifts_images_by_a_sixteenth_and_leaves_other_inputs():
    """"auto" (FIP's and Fast FIP's default): float images get shifts of up to max(1, round(H / 16)) pixels, no
    flip; flat features, signals and token ids get no augmentation (not an error)."""
    assert make_augment("auto", torch.rand(2, 1, 28, 28)) == Augment(2, False)
    assert make_augment("auto", torch.rand(3, 32, 32)) == Augment(2, False)          # one sample
    assert make_augment("auto", torch.rand(1, 3, 224, 224)).shift == 14
    assert make_augment("auto", torch.rand(1, 1, 8, 8)).shift == 1
    for other in (torch.randn(8, 5)[0], torch.randn(8, 2, 100)[0], torch.randint(0, 100, (8, 12))[0],
                  torch.randint(0, 255, (3, 32, 32))):
        assert make_augment("auto", other) is None
    assert make_augment({"shift": 3}, torch.rand(2, 1, 28, 28)) == Augment(3, False)
    assert make_augment({"shift": 1, "flip": True}, None) == Augment(1, True)
    with pytest.raises(TypeError, match="augment: .*fields: shift, flip"):
        make_augment({"rotate": 5}, torch.rand(2, 1, 28, 28))


def test_augment_is_refused_for_non_image_inputs():
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    with pytest.raises(ValueError, match="float image inputs"):
        P.purify(nn.Linear(6, 3), (x, y), method="fip", steps=2, progress=False, augment="shift")
    with pytest.raises(ValueError, match="augment must be one of"):
        P.purify(nn.Linear(6, 3), (x, y), method="fip", steps=2, progress=False, augment="rotate")


def test_fisher_and_validation_see_unaugmented_data(clean, monkeypatch):
    import fip_fast.fisher as fisher

    calls = []
    real = fisher.estimate_fisher

    def spy(model, loader, **kw):
        out = real(model, loader, **kw)
        calls.append(([b[0].clone() for b in loader], {k: v.clone() for k, v in out.items()}))
        return out

    monkeypatch.setattr(fisher, "estimate_fisher", spy)
    # eta_r > 0: F0 is estimated only for the anchor (off by default).
    kw = dict(method="fip", steps=4, batch_size=8, eval_every=2, progress=False, eta_r=1.0, val_fraction=0.2)
    m0, rep0 = P.purify(_net(), clean, augment="none", **kw)
    m1, rep1 = P.purify(_net(), clean, augment="shift", **kw)
    (b0, f0), (b1, f1) = calls
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    assert [tuple(v.shape) for v in f0.values()] == [tuple(v.shape) for v in f1.values()]
    for a, b in zip(f0.values(), f1.values()):
        assert torch.equal(a, b)
    # The runs differ (augmented training batches), the clean-val metrics are the unaugmented data's.
    assert any(not torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert rep0.initial == rep1.initial
    x_val, y_val = split_clean(clean, None, 0.2, 0).tensors()[2:]
    again = val_metrics(m1, x_val, y_val, F.cross_entropy, torch.device("cpu"))
    assert again["val_acc"] == pytest.approx(rep1.final["val_acc"])
    assert again["val_loss"] == pytest.approx(rep1.final["val_loss"], rel=1e-5)


def test_augmented_resume_matches_the_uninterrupted_run(clean, tmp_path):
    kw = dict(method="fip", steps=12, batch_size=8, eval_every=3, progress=False, checkpoint_every=6,
              augment="shift")
    # θ0 + steps 3, 6 → crash at the evaluation of step 9
    (m_full, rep_full), (m_res, rep_res) = uninterrupted_and_resumed(_net, clean, tmp_path, 3, **kw)
    assert rep_res.resumed_from == 6 and rep_res.steps_run == 12
    assert rep_res.config["augment"] == "shift(1)"
    for (k, a), b in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    m_plain, _ = P.purify(_net(), clean, **{**kw, "augment": "none"})
    assert any(not torch.equal(a, b) for a, b in zip(m_plain.state_dict().values(), m_res.state_dict().values()))
    # A checkpoint of an augmented run is not resumed without augmentation (and vice versa).
    with pytest.raises(P.ResumeMismatchError, match="augment differ"):
        P.purify(_net(), clean, checkpoint_dir=str(tmp_path / "cut"), resume=True, **{**kw, "augment": "none"})


def test_ddp_ranks_take_slices_of_the_augmented_global_batch(clean):
    """Every rank augments the same global batch with the generator of (seed, step), then takes its slice:
    the ranks' slices put together are the single-process batch."""
    from fip_fast.pipeline.loop import LoopPlan, step_batch
    from fip_fast.pipeline.strategy import SingleProcess

    class Rank(SingleProcess):
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

        def local_batch(self, idx, batch_size):
            k = batch_size // self.world
            return idx[self.rank * k:(self.rank + 1) * k]

    data = split_clean(clean, None, 0.2, 0)
    plan = LoopPlan(steps=4, batch_size=8, eval_every=2, schedule="cosine", seed=3, augment=Augment(1, True))
    cpu = torch.device("cpu")
    for step in range(3):
        x1, y1 = step_batch(data, plan, step, SingleProcess(), cpu)
        parts = [step_batch(data, plan, step, Rank(r, 2), cpu) for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1) and torch.equal(torch.cat([p[1] for p in parts]), y1)


def test_runners_get_augment_or_refuse_it(clean):
    got = {}

    def no_aug(model, clean_data, steps=2, *, batch_size=8, seed=0, device=None, loss_fn=None, progress=True):
        return model, {"steps": steps}

    def with_aug(model, clean_data, steps=2, *, batch_size=8, seed=0, device=None, loss_fn=None, progress=True,
                 augment=None):
        got["augment"] = augment
        return model, {"steps": steps}

    def var_kw(model, clean_data, steps=2, **kw):
        got["kw"] = kw
        return model, {"steps": steps}

    P.register_method("_runner_no_aug", no_aug, overwrite=True)
    P.register_method("_runner_aug", with_aug, overwrite=True)
    P.register_method("_runner_var_kw", var_kw, overwrite=True)
    with pytest.raises(TypeError, match="_runner_no_aug.*augment"):
        P.purify(_net(), clean, method="_runner_no_aug", progress=False, augment="shift")
    _, rep = P.purify(_net(), clean, method="_runner_no_aug", progress=False, augment="none")    # nothing asked
    assert rep.config["augment"] == "none"
    _, rep = P.purify(_net(), clean, method="_runner_aug", progress=False, augment="shift")
    assert got["augment"] == Augment(1) and rep.config["augment"] == "shift(1)"
    P.purify(_net(), clean, method="_runner_aug", progress=False)
    assert got["augment"] is None
    P.purify(_net(), clean, method="_runner_var_kw", progress=False, augment="shift_flip")
    assert got["kw"]["augment"] == Augment(1, True)


def test_baselines_augment_their_fine_tuning_batches(clean):
    from fip_fast.baselines._common import batch_stream
    from fip_fast.baselines.ft import run_ft

    plain = batch_stream(clean, 8, seed=0)
    aug = batch_stream(clean, 8, seed=0, augment="shift")
    for _ in range(3):
        (xp, yp), (xa, ya) = next(plain), next(aug)
        assert torch.equal(yp, ya) and xa.shape == xp.shape and not torch.equal(xa, xp)
    m0, _ = run_ft(_net(), clean, steps=3, batch_size=8, progress=False)
    m1, _ = run_ft(_net(), clean, steps=3, batch_size=8, progress=False, augment="shift")
    assert any(not torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    _, rep = P.purify(_net(), clean, method="ft", steps=2, batch_size=8, progress=False, augment="shift")
    assert rep.config["augment"] == "shift(1)"


def test_batch_stream_sizes_auto_on_one_sample():
    """The baselines' batch stream decides "auto" (and refuses image spellings) on one sample, as purify's loop
    does: a batch of 1-d signals (N, C, T) is not an image (C, H, W) — it was taken for one, and the shift then
    raised at the first batch."""
    from fip_fast.baselines._common import batch_stream

    x, y = torch.randn(32, 2, 40), torch.randint(0, 3, (32,))
    xb, _ = next(batch_stream((x, y), 8, seed=0, augment="auto"))
    xp, _ = next(batch_stream((x, y), 8, seed=0))
    assert torch.equal(xb, xp)                                  # no augmentation for signals
    with pytest.raises(ValueError, match="needs float image inputs"):
        next(batch_stream((x, y), 8, seed=0, augment="shift"))
