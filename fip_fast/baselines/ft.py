"""FT — plain fine-tuning on the clean set, the control every defense is compared against.

Mini-batch SGD with (heavy-ball) momentum and L2 weight decay on the mean cross-entropy of clean batches, all
parameters trainable, the model in train mode (BatchNorm statistics are re-estimated on the clean data, as in
ordinary fine-tuning; ``bn_train=False`` keeps them frozen).  Defaults (lr 0.01, momentum 0.9, weight decay 5e-4)
are the usual fine-tuning baseline of the backdoor-defense literature (e.g. BackdoorBench's FT).  On its own it
is expected *not* to remove a backdoor reliably (METHOD.md, "Stability": ASR stayed 100 % in the spec's runs);
it isolates what the regularizers of the other methods add.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ._common import (LossFn, Timer, batch_stream, check_common, count_trainable, default_loss, grads_finite,
                      history_every, model_device, module_modes, only_trainable, progress_bar)

__all__ = ["run_ft"]


def run_ft(model: nn.Module, clean_loader: Any, steps: int = 300, lr: float = 0.01, *, momentum: float = 0.9,
           weight_decay: float = 5e-4, nesterov: bool = False, batch_size: int = 128, seed: int = 0,
           bn_train: bool = True, device: Optional[torch.device] = None, loss_fn: Optional[LossFn] = None,
           progress: bool = True) -> tuple[nn.Module, dict]:
    """Fine-tune every parameter of ``model`` on clean data with SGD + momentum.

    Args:
        model: purified in place and returned in eval mode.
        clean_loader: ``(x, y)`` tensors (sampled with replacement) or an iterable of batches (cycled).
        steps: optimizer steps.  lr, momentum, weight_decay, nesterov: of ``torch.optim.SGD``.
        batch_size: for tensor input.  seed: seeds the batch sampler.
        bn_train: BatchNorm in train mode (re-estimate its statistics) or eval mode.
        loss_fn: ``loss_fn(logits, y)`` → scalar, default cross-entropy.
    Returns:
        ``(model, info)`` — see :mod:`fip_fast.baselines._common` for the keys of ``info``.
    """
    check_common(steps, lr)
    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev)
    loss_fn = default_loss(loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    stream = batch_stream(clean_loader, batch_size, seed, dev)
    hist, skipped, every = [], 0, history_every(steps)
    bar = progress_bar(steps, "FT", progress)
    with only_trainable(model, params), module_modes(model, bn_train), Timer(dev) as timer:
        for t in range(steps):
            x, y = next(stream)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if not grads_finite(params):
                skipped += 1
                continue
            opt.step()
            if t % every == 0 or t == steps - 1:
                hist.append((t, float(loss.detach())))
            bar.update(1)
    bar.close()
    model.eval()
    return model, {"method": "ft", "steps": steps, "wall_time_s": timer.seconds,
                   "trainable_params": count_trainable(params), "loss_history": hist, "skipped_steps": skipped}
