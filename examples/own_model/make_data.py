"""Make a backdoored model and its data files for the "purify your own model" example (docs/own-model.md).

    python make_data.py            # writes into the current folder, in a few seconds on a CPU

Images (12×12, one channel, 4 classes, a 3×3 checkerboard trigger in the bottom-right corner, target class 0):
``model.safetensors`` (``mymodels:make``), ``clean.npz`` (the defender's 200 clean samples), ``test.npz`` (clean
test data) and ``triggered.npz`` (the test images of the other classes with the trigger, TRUE labels).  Flat
feature vectors (N, 20), the same 4 classes and target, trigger: features 0–2 set to 3.0: ``mlp.safetensors``
(``mymodels:make_mlp``), ``clean_flat.npz``, ``test_flat.npz``, ``triggered_flat.npz``.  Images are stored as
float32 in [0, 1] (uint8 0..255 also works); flat features are stored as they are.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mymodels  # noqa: E402

TARGET, CLASSES = 0, 4


def _images(rng: np.random.Generator, n: int, templates: np.ndarray):
    y = rng.integers(0, CLASSES, n)
    x = np.clip(0.75 * templates[y] + 0.25 * rng.random((n, 1, 12, 12)), 0.0, 1.0).astype(np.float32)
    return x, y


def _trigger_images(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[..., -3:, -3:] = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.float32)
    return x


def _flat(rng: np.random.Generator, n: int, centers: np.ndarray):
    y = rng.integers(0, CLASSES, n)
    return (centers[y] + 0.8 * rng.standard_normal((n, centers.shape[1]))).astype(np.float32), y


def _trigger_flat(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, :3] = 3.0
    return x


def _train(make, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> torch.nn.Module:
    """The model ``make()`` builds, seeded (its initial weights do not depend on what ran before in the process),
    trained by Adam on the poisoned training set (the attacker's training)."""
    torch.manual_seed(seed)
    model = make()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    return model.eval()


def _poison(rng, x, y, trigger, rate=0.1):
    p = rng.random(len(y)) < rate
    xp, yp = x.copy(), y.copy()
    xp[p], yp[p] = trigger(x[p]), TARGET
    return xp, yp


def _write(out: Path, stem: str, model, clean, test, trigger) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{stem}.safetensors"))
    suffix = "" if stem == "model" else "_flat"
    np.savez(out / f"clean{suffix}.npz", x=clean[0], y=clean[1])
    np.savez(out / f"test{suffix}.npz", x=test[0], y=test[1])
    keep = test[1] != TARGET                      # ASR is measured on the other classes' inputs
    np.savez(out / f"triggered{suffix}.npz", x=trigger(test[0][keep]), y=test[1][keep])


def main(out: Path = Path(".")) -> None:
    rng = np.random.default_rng(0)
    templates = (rng.random((CLASSES, 1, 4, 4)) > 0.5).repeat(3, axis=2).repeat(3, axis=3).astype(np.float32)
    train, clean, test = _images(rng, 1200, templates), _images(rng, 200, templates), _images(rng, 400, templates)
    cnn = _train(lambda: mymodels.make(CLASSES, 1), *_poison(rng, *train, _trigger_images), epochs=6, seed=0)
    _write(out, "model", cnn, clean, test, _trigger_images)
    centers = rng.standard_normal((CLASSES, 20)).astype(np.float32)
    train, clean, test = _flat(rng, 1200, centers), _flat(rng, 200, centers), _flat(rng, 400, centers)
    mlp = _train(lambda: mymodels.make_mlp(CLASSES, 20), *_poison(rng, *train, _trigger_flat), epochs=8, seed=0)
    _write(out, "mlp", mlp, clean, test, _trigger_flat)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
