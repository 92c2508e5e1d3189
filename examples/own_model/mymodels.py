"""The user's own architectures for ``fip-fast purify --arch mymodels:make`` (run from this folder).

A factory is any callable that returns a ``torch.nn.Module``; ``fip-fast`` passes it ``num_classes`` and
``in_channels`` when its signature takes them (``--num-classes``; ``--in-channels``, default: read from the
``--clean`` data — the channel count C of (N, C, H, W) images, the feature count D of flat (N, D) data).  The
model must return (N, num_classes) logits.
"""
from __future__ import annotations

from torch import nn


def make(num_classes: int = 4, in_channels: int = 1) -> nn.Module:
    """A small CNN for 12×12 images (N, in_channels, 12, 12) in [0, 1]."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),    # 6×6
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),             # 3×3
        nn.Flatten(), nn.Linear(32 * 9, 64), nn.ReLU(), nn.Linear(64, num_classes))


def make_mlp(num_classes: int = 4, in_channels: int = 20) -> nn.Module:
    """An MLP for flat (N, D) feature vectors: ``in_channels`` is the feature count D."""
    return nn.Sequential(nn.Linear(in_channels, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))
