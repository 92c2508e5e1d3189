"""Model zoo for the demo and the benchmarks.

* :class:`DemoCNN` — a small convolutional network that trains on 4–5 k MNIST digits in seconds on two CPU cores,
  yet is wide enough (a hidden Linear layer of 256 units, 32/64 conv channels) that its layers have rich
  singular-value spectra for Fast FIP.
* :func:`preact_resnet18`, :func:`resnet18` — the CIFAR-style (32×32 input, 3×3 stem, no max-pool) networks used
  in the backdoor-defence literature (PreAct-ResNet-18 is the paper's main model).
* :func:`build_model` — by registry name or by a ``"module:factory"`` import string.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Type, Union

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DemoCNN",
    "PreActBlock",
    "BasicBlock",
    "PreActResNet",
    "ResNet",
    "preact_resnet18",
    "resnet18",
    "MODELS",
    "build_model",
]


class DemoCNN(nn.Module):
    """conv-BN-ReLU-pool ×2 → Linear-ReLU → Linear.

    Input ``(N, in_channels, H, W)`` with H, W ≥ 4 (an adaptive pool fixes the head size, so any image size
    works); output logits ``(N, num_classes)``.  ~0.3 M parameters at the default width.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # 28×28 → 7×7 → 4×4; also makes 32×32 (→ 8×8 → 4×4) work
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------------- ResNets
class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv ×2 + shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the reference implementation.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2015): conv-BN-ReLU-conv-BN + shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_layers(block: Type[nn.Module], in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*layers)


class PreActResNet(nn.Module):
    """CIFAR-style PreAct-ResNet: 3×3 stem, four stages (w, 2w, 4w, 8w channels; w = ``width``, 64 in the
    paper's model), final BN-ReLU, global average pool, Linear.  Input ``(N, in_channels, H, W)``, H, W ≥ 8.
    ``stem_stride`` 2 halves the resolution in the stem (4× less compute; the CPU benchmark's residual net)."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 stem_stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        widths, strides, planes = tuple(width * k for k in (1, 2, 4, 8)), (1, 2, 2, 2), width
        stages = []
        for w, s, n in zip(widths, strides, num_blocks):
            stages.append(_make_layers(PreActBlock, planes, w, n, s))
            planes = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(8 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(F.relu(self.bn(out))).flatten(1)
        return self.linear(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem with BN-ReLU (no max-pool), four stages, global average pool, Linear."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides, planes = (64, 128, 256, 512), (1, 2, 2, 2), 64
        stages = []
        for w, s, n in zip(widths, strides, num_blocks):
            stages.append(_make_layers(BasicBlock, planes, w, n, s))
            planes = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


def preact_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64,
                    stem_stride: int = 1) -> PreActResNet:
    """PreAct-ResNet-18 for 32×32 inputs (11.2 M parameters at ``width`` 64; ``width`` 8 with ``stem_stride`` 2:
    0.18 M parameters, the CPU-feasible residual network of the benchmark protocol, ``bench/protocol.py``)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width, stem_stride)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32×32 inputs (11.2 M parameters)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


def demo_cnn(num_classes: int = 10, in_channels: int = 1, **kwargs) -> DemoCNN:
    """The :class:`DemoCNN` (keyword arguments ``width``, ``hidden`` pass through)."""
    return DemoCNN(num_classes, in_channels, **kwargs)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "cnn": demo_cnn,
    "demo_cnn": demo_cnn,
    "preact_resnet18": preact_resnet18,
    "preactresnet18": preact_resnet18,
    "resnet18": resnet18,
}


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model import string must look like 'package.module:factory', got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for model {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj


def build_model(name: Union[str, Callable[..., nn.Module]], num_classes: int = 10, in_channels: int = 1,
                **kwargs) -> nn.Module:
    """Build a model by registry name (:data:`MODELS`), ``"module:factory"`` import string, or callable.

    The factory receives ``num_classes`` and ``in_channels`` only if its signature accepts them (or
    ``**kwargs``), so a plain ``def make(): ...`` works too; extra ``kwargs`` are passed through.
    """
    if callable(name):
        factory = name
    elif name.lower() in MODELS:
        factory = MODELS[name.lower()]
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or give 'module:factory'")
    args = dict(num_classes=num_classes, in_channels=in_channels)
    try:
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            args = {k: v for k, v in args.items() if k in params}
    except (TypeError, ValueError):  # builtins / C callables without a signature
        pass
    model = factory(**args, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
