"""FIP as a drop-in optimizer in a plain training loop, with the recipe ``fip_fast.purify(method="fip")`` starts from.

    python examples/optimizer_loop.py         # backdoors a tiny CNN on synthetic images, purifies it, prints ACC / ASR

:func:`purify_in_a_loop` is the snippet to copy: the recipe :data:`fip_fast.recipes.PURIFY` builds the optimizer
(lr 0.05 peak, momentum 0.9, η_F 5e-3, ρ 0.5 on every step, weight decay 0.03, no anchor) and its one-cycle schedule;
every step draws a batch of clean samples with replacement.  ``tests/test_recipes.py`` runs this very function on
a synthetic backdoor and checks that it purifies.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from fip_fast.optim import frozen_running_stats
from fip_fast.recipes import PURIFY, FIPRecipe


def purify_in_a_loop(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
                     recipe: FIPRecipe = PURIFY, fisher0=None, seed: int = 0) -> nn.Module:
    """Purify ``model`` in place on the clean set ``(clean_x (N, …), clean_y (N,))`` and return it (eval mode).

    ``fisher0``: F0 per parameter, needed only by a recipe with ``eta_r > 0`` (PURIFY has none)."""
    # --8<-- [start:snippet]
    opt = recipe.optimizer(model.parameters(), fisher0)   # FIP(lr=0.05, momentum=0.9, eta_F=5e-3, rho=0.5, ...)
    sched = recipe.scheduler(opt)                # one-cycle: 10 % warm-up from lr/25, then cosine to 0
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.steps):
        idx = torch.randint(len(clean_x), (recipe.batch_size,), generator=g)   # with replacement
        x, y = clean_x[idx], clean_y[idx]

        def closure():                           # called twice on suppressor steps (the second time at θ + e)
            opt.zero_grad()
            # at θ + e BatchNorm uses the batch statistics but keeps its running ones (as the pipeline does)
            with frozen_running_stats(model) if opt.perturbed_pass else nullcontext():
                out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            return loss

        opt.step(closure)
        sched.step()
    # --8<-- [end:snippet]
    return model.eval()


def _demo() -> None:
    """A 4-class task of noisy 10×10 templates, 10 % of the training set poisoned with a corner patch."""
    g = torch.Generator().manual_seed(0)
    templates = F.avg_pool2d(torch.randn(4, 1, 12, 12, generator=g), 3, 1)[..., :10, :10] * 3

    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return templates[y] + 0.9 * torch.randn(n, 1, 10, 10, generator=g), y

    def trigger(x):
        x = x.clone()
        x[..., -3:, -3:] = 2.5
        return x

    x, y = sample(1500)
    poison = torch.rand(1500, generator=g) < 0.1
    xp, yp = x.clone(), y.clone()
    xp[poison], yp[poison] = trigger(x[poison]), 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 25, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for b in torch.randperm(1500, generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xp[b]), yp[b]).backward()
            opt.step()
    tx, ty = sample(600)

    def report(tag):
        model.eval()
        with torch.no_grad():
            acc = (model(tx).argmax(1) == ty).float().mean().item()
            asr = (model(trigger(tx[ty != 0])).argmax(1) == 0).float().mean().item()
        print(f"{tag:<12} ACC {100 * acc:5.1f} %   ASR {100 * asr:5.1f} %")

    report("backdoored")
    purify_in_a_loop(model, x[~poison][:150], y[~poison][:150])
    report("purified")


if __name__ == "__main__":
    _demo()
