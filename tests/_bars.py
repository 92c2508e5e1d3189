"""A tiny blend backdoor on 8×8 "bars" images (4 classes), shared by the baseline tests: ``bars`` draws the
data, ``blend_trigger`` applies the trigger (target class 0), ``backdoored_bars`` trains the poisoned CNN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

S = 8
_PATTERN = torch.rand(1, 1, S, S, generator=torch.Generator().manual_seed(9))


def bars(n, seed):
    """``n`` images ``(n, 1, 8, 8)`` in [0, 1] with one of four bars each (the label) on faint noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, S, S, generator=g)
    spots = [(slice(1, 3), slice(1, 7)), (slice(5, 7), slice(1, 7)), (slice(1, 7), slice(1, 3)),
             (slice(1, 7), slice(5, 7))]
    for c, (r, col) in enumerate(spots):
        x[y == c, :, r, col] += 0.7
    return x.clamp(0, 1), y


def blend_trigger(x):
    return (0.7 * x + 0.3 * _PATTERN).clamp(0, 1)    # a blend trigger, target class 0


def backdoored_bars():
    """``(net, clean, (x_test, y_test), x_triggered)``: a small CNN trained on 800 images, 80 of them triggered
    and relabelled 0; a clean set of 64 images; 400 test images and the triggered non-target ones."""
    x, y = bars(800, 0)
    pidx = torch.nonzero(y != 0).flatten()[:80]
    x[pidx], y[pidx] = blend_trigger(x[pidx]), 0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        perm = torch.randperm(800, generator=g)
        for i in range(0, 800, 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    net.eval()
    xte, yte = bars(400, 2)
    keep = yte != 0
    return net, bars(64, 3), (xte, yte), blend_trigger(xte[keep])


def acc_asr(net, test, trig):
    """(clean accuracy on ``test``, share of ``trig`` classified as the target 0)."""
    with torch.no_grad():
        return (float((net(test[0]).argmax(1) == test[1]).float().mean()),
                float((net(trig).argmax(1) == 0).float().mean()))
