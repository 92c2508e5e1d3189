"""Train a (possibly poisoned) classifier — the attacker's side of the demo.

:func:`train_backdoored` is ordinary supervised training on whatever ``(x, y)`` it is given; pass the output
of :meth:`fip_fast.evaluation.attacks.Attack.poison_train` to obtain a backdoored model.  It is deterministic for a
given ``seed`` (and a fixed number of CPU threads): the shuffling uses its own ``torch.Generator`` and the
global RNG is seeded only for layers that draw random numbers (dropout).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast._utils import model_device

__all__ = ["train_backdoored", "model_device"]


def _make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def train_backdoored(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 4,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    *,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy and return it (in eval mode).

    Args:
        model: any classifier ``(N, C, H, W) → (N, K)`` logits.
        x: ``(N, C, H, W)`` float inputs.  y: ``(N,)`` int64 labels (poisoned labels included).
        epochs: passes over the data.  lr: learning rate (Adam default 2e-3; use ~0.05 for ``"sgd"``).
        batch_size: mini-batch size; the last, smaller batch is kept.
        seed: seeds the shuffling generator and the global RNG (dropout); same seed, same model.
        progress: show a tqdm bar (loss and running accuracy in the postfix).
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9, Nesterov); the LR is cosine-annealed to 0.
        device: where to train; default: the model's device.
    """
    from tqdm.auto import tqdm  # lazy: keeps `import fip_fast.evaluation.train` cheap

    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev).train()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = int(y.shape[0])
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = _make_optimizer(optimizer, model, lr, weight_decay)
    # Cosine annealing: a decaying LR gives a well-converged, reproducible model in few epochs.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="train", unit="step", leave=False)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        correct, seen, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx].to(dev, non_blocking=True), y[idx].to(dev, non_blocking=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yb).sum())
            seen += int(yb.numel())
            loss_sum += float(loss.detach()) * int(yb.numel())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return model.eval()
