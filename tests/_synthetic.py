"""A tiny, fast synthetic backdoor for tests: 10×10 images of 4 noisy templates, a 3×3 corner patch trigger,
a small CNN trained with 10 % poisoning.  Shared by the core end-to-end test and the baselines' tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TARGET = 0


def trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., -3:, -3:] = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]) * 2.5
    return x


class TinyCNN(nn.Module):
    """conv 3×3 (``channels``, no bias) → BatchNorm → ReLU → max-pool 2 → Linear(→ ``hidden``) → ReLU → Linear(→ 4),
    for 1×``side``×``side`` inputs.  The purify tests use the default (10×10), the Fast FIP variant tests 8×8."""

    def __init__(self, channels: int = 16, hidden: int = 64, side: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc1 = nn.Linear(channels * (side // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def small_cnn(k: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 25, 32), nn.ReLU(), nn.Linear(32, k))


@dataclass
class Task:
    model: nn.Module
    clean_x: torch.Tensor       # defender's clean data
    clean_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def asr(self, model=None) -> float:
        m = model or self.model
        mask = self.test_y != TARGET
        m.eval()
        with torch.no_grad():
            return (m(trigger(self.test_x[mask])).argmax(1) == TARGET).float().mean().item()

    def acc(self, model=None) -> float:
        m = model or self.model
        m.eval()
        with torch.no_grad():
            return (m(self.test_x).argmax(1) == self.test_y).float().mean().item()


def make_task(seed: int = 0, n: int = 1500, noise: float = 0.9, epochs: int = 8) -> Task:
    g = torch.Generator().manual_seed(seed)
    k = 4
    templates = F.avg_pool2d(torch.randn(k, 1, 12, 12, generator=g), 3, 1)[..., :10, :10] * 3
    def sample(m):
        y = torch.randint(0, k, (m,), generator=g)
        return templates[y] + noise * torch.randn(m, 1, 10, 10, generator=g), y
    x, y = sample(n)
    poison = torch.rand(n, generator=g) < 0.1
    xp, yp = x.clone(), y.clone()
    xp[poison], yp[poison] = trigger(x[poison]), TARGET
    torch.manual_seed(seed)
    model = small_cnn(k)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xp[b]), yp[b]).backward()
            opt.step()
    tx, ty = sample(600)
    cx, cy = x[~poison][:150], y[~poison][:150]
    return Task(model, cx, cy, tx, ty)
