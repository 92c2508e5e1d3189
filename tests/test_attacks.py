"""Attacks: poison fraction, target exclusion, determinism, clean-label SIG, shapes/channels."""
import pytest
import torch

from fip_fast.evaluation.attacks import ATTACKS, SIG, WaNet, make_attack

NAMES = sorted(ATTACKS)


def _data(n=200, shape=(1, 28, 28), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + shape, generator=g)
    y = torch.arange(n) % classes
    return x, y


@pytest.mark.parametrize("name", NAMES)
def test_registry_and_output_range(name):
    atk = make_attack(name, target=3, seed=1)
    assert atk.name == name and atk.target == 3
    x, _ = _data(16)
    xt = atk.apply(x)
    assert xt.shape == x.shape and xt.dtype == x.dtype
    assert xt.min() >= 0 and xt.max() <= 1
    assert not torch.equal(xt, x), "the trigger must change the image"
    assert torch.equal(atk.apply(x[0]), xt[0]), "single images and batches agree"


def test_unknown_attack_and_wrong_shape():
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("nope")
    atk = make_attack("badnets", image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="built for images"):
        atk.apply(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("name", [n for n in NAMES if not ATTACKS[n].clean_label])
def test_dirty_label_poison_fraction_and_labels(name):
    x, y = _data(500)
    atk = make_attack(name, target=0)
    xp, yp, idx = atk.poison_train(x, y, rate=0.1, seed=0)
    assert idx.numel() == 50
    assert torch.all(y[idx] != 0), "dirty-label attacks poison non-target samples"
    assert torch.all(yp[idx] == 0)
    assert torch.equal(xp[idx], atk.apply(x[idx]))
    rest = torch.ones(500, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(yp[rest], y[rest])
    if not getattr(atk, "noise", False):
        assert torch.equal(xp[rest], x[rest])
    assert torch.equal(x, _data(500)[0]), "inputs are not modified in place"


def test_sig_is_clean_label():
    x, y = _data(500)
    atk = make_attack("sig", target=2)
    assert atk.clean_label
    xp, yp, idx = atk.poison_train(x, y, rate=0.08, seed=0)
    assert idx.numel() == 40
    assert torch.all(y[idx] == 2), "only target-class samples are poisoned"
    assert torch.equal(yp, y), "labels are never changed"
    assert not torch.equal(xp[idx], x[idx])


def test_sig_rate_capped_with_warning():
    x, y = _data(100)
    with pytest.warns(UserWarning, match="poisoning all"):
        _, _, idx = SIG(target=0).poison_train(x, y, rate=0.5, seed=0)
    assert idx.numel() == int((y == 0).sum())


@pytest.mark.parametrize("name", NAMES)
def test_triggered_test_excludes_target(name):
    x, y = _data(100)
    atk = make_attack(name, target=4)
    xt, yt = atk.triggered_test(x, y)
    assert torch.all(yt != 4)
    assert xt.shape[0] == yt.shape[0] == int((y != 4).sum())
    assert torch.equal(yt, y[y != 4])


@pytest.mark.parametrize("name", NAMES)
def test_determinism(name):
    x, y = _data(300)
    a = make_attack(name, target=1, seed=5).poison_train(x, y, seed=7)
    b = make_attack(name, target=1, seed=5).poison_train(x, y, seed=7)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = make_attack(name, target=1, seed=5).poison_train(x, y, seed=8)
    assert not torch.equal(a[2], c[2]), "the poison seed chooses the samples"


@pytest.mark.parametrize("name", ["blend", "wanet"])
def test_trigger_seed_changes_pattern(name):
    x, _ = _data(4)
    assert not torch.equal(make_attack(name, seed=0).apply(x), make_attack(name, seed=1).apply(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 64, 48), (3, 16, 16)])
def test_any_channels_and_size(name, shape):
    atk = make_attack(name, image_shape=shape)
    x, y = _data(40, shape)
    xp, yp, idx = atk.poison_train(x, y, rate=0.1, seed=0)
    assert xp.shape == x.shape
    xt, _ = atk.triggered_test(x, y)
    assert xt.shape[1:] == shape and xt.min() >= 0 and xt.max() <= 1


def test_wanet_noise_mode_warps_extra_samples_keeping_labels():
    x, y = _data(300)
    atk = WaNet(target=0, noise=True, cross_ratio=2.0)
    xp, yp, idx = atk.poison_train(x, y, rate=0.1, seed=0)
    rest = torch.ones(300, dtype=torch.bool)
    rest[idx] = False
    changed = (xp[rest] != x[rest]).flatten(1).any(1)
    assert int(changed.sum()) == 2 * idx.numel()
    assert torch.equal(yp[rest], y[rest])


def test_badnets_patch_location():
    atk = make_attack("badnets", image_shape=(1, 28, 28))
    xt = atk.apply(torch.zeros(1, 1, 28, 28))
    diff = xt[0, 0] != 0
    rows, cols = torch.nonzero(diff, as_tuple=True)
    assert rows.min() >= 24 and cols.min() >= 24, "patch sits in the bottom-right corner"
    assert int(diff.sum()) == 5  # 3×3 checkerboard: 5 white cells
