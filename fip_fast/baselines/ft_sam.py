"""FT-SAM — fine-tuning with sharpness-aware minimization (Zhu et al., ICCV 2023, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization").

:class:`SAM` wraps any base optimizer (Foret et al. 2021).  One :meth:`SAM.step` with a closure is the two-pass
definition, per parameter group:

    g   = ∇ℓ(θ)                                   (first closure call)
    e   = ρ · g / ‖g‖                             (‖·‖: global L2 norm over the group)
          adaptive (ASAM, Kwon et al. 2021): e = ρ · T²g / ‖T g‖ with T = |θ| + η (elementwise)
    g'  = ∇ℓ(θ + e)                               (second closure call)
    θ  ← base_step(θ, g')                          (θ restored to exactly the saved value before the base step)

The base optimizer sees g' in ``p.grad``, so momentum / weight decay / any base rule applies to the SAM gradient.
A step whose first or second gradient is non-finite restores θ, leaves the base optimizer untouched and is counted
in :attr:`SAM.skipped_steps`.

:func:`run_ft_sam` fine-tunes every parameter with SAM(SGD + momentum) on the clean set.  The default radius
ρ = 0.3 sits in the range docs/method.md ("Stability") reports as purifying a SAM-strength suppressor (0.2–0.5); it
was fixed before any benchmark run, not tuned on test ASR; lr 0.01 / weight decay 5e-4 are FT's literature values,
now with the cosine learning-rate decay of every runner (``lr_schedule``).  On the synthetic backdoor of the tests
(60 steps, batch 32) the defaults give ASR 0.00 / 0.00 / 0.02 on seeds 0/1/2 with clean-val accuracy 100 % —
any lr ∈ [0.01, 0.1] × wd ∈ [5e-4, 0.1] did, so nothing there bounds the choice; FT-SAM was not re-tuned on the
MNIST demo (its clean accuracy cost there: bench/results/baselines_cpu.md).  BatchNorm runs in train mode for
both passes (the statistics are updated twice per step, as in the reference SAM implementations) unless
``bn_train=False``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from fip_fast.baselines._common import (
    LossFn,
    LrSchedule,
    RunLog,
    StepHook,
    Timer,
    batch_stream,
    check_common,
    frozen_running_stats,
    run_info,
    setup_run,
    training,
    upcast,
)

__all__ = ["SAM", "run_ft_sam"]


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around a base optimizer.

    Args:
        params: parameters or param groups.
        base_optimizer: an optimizer class (default ``torch.optim.SGD``); it is built on the *same* param groups.
        rho: perturbation radius ρ > 0.
        adaptive: ASAM's scale-invariant perturbation (``T = |θ| + eta``).
        eta: ASAM's offset η ≥ 0.
        **base_kwargs: hyper-parameters of the base optimizer (``lr``, ``momentum`` …).

    Usage::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)            # both passes + the base step; returns the loss at θ

    ``first_step`` / ``second_step`` expose the two halves for loops that run the passes themselves.
    """

    def __init__(self, params, base_optimizer: type = torch.optim.SGD, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.0, **base_kwargs):
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.skipped_steps = 0
        self.perturbed_pass = False     # True while step() runs the closure at θ + e

    @torch.no_grad()
    def _grad_norm(self, group: dict) -> Tensor:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return torch.zeros(())
        if group["adaptive"]:
            terms = [upcast((p.abs() + group["eta"]) * p.grad).norm() for p in ps]
        else:
            terms = [upcast(p.grad).norm() for p in ps]
        return torch.stack(terms).norm()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """θ ← θ + e (saving e); returns False (and moves nothing) if a gradient is non-finite."""
        norms = [self._grad_norm(g) for g in self.param_groups]
        if not all(bool(torch.isfinite(n)) for n in norms):
            return False
        for group, norm in zip(self.param_groups, norms):
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = upcast(p.grad) * scale.to(upcast(p.grad).dtype)
                if group["adaptive"]:
                    e = e * (upcast(p.abs()) + group["eta"]).pow(2)
                e = e.to(p.dtype)
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e)
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """θ ← the value saved by :meth:`first_step` (exactly, not θ + e − e)."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restore θ and take the base step with the gradient at θ + e (skipped if that gradient is non-finite)."""
        finite = all(bool(torch.isfinite(p.grad).all()) for g in self.param_groups for p in g["params"]
                     if p.grad is not None)
        self.restore()
        if finite:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
        return finite

    def step(self, closure: Optional[Callable[[], Any]] = None):
        if closure is None:
            raise RuntimeError("SAM needs a closure that zeroes the gradients, computes the loss and calls backward")
        closure = torch.enable_grad()(closure)
        loss = closure()
        if not self.first_step():
            self.skipped_steps += 1
            return loss
        self.perturbed_pass = True      # as FIP.perturbed_pass: the closure may freeze BatchNorm running stats
        try:
            closure()
        finally:
            self.perturbed_pass = False
        if not self.second_step():
            self.skipped_steps += 1
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def run_ft_sam(model: nn.Module, clean_loader: Any, steps: int = 300, lr: float = 0.01, *, rho: float = 0.3,
               adaptive: bool = False, eta: float = 0.0, momentum: float = 0.9, weight_decay: float = 5e-4,
               lr_schedule: str = "cosine", batch_size: int = 128, seed: int = 0, bn_train: bool = True,
               device: Optional[torch.device] = None, loss_fn: Optional[LossFn] = None, progress: bool = True,
               augment: Any = None, on_step: Optional[StepHook] = None) -> tuple[nn.Module, dict]:
    """Fine-tune every parameter with SAM(SGD + momentum) on clean data (FT-SAM).

    Args are those of :func:`fip_fast.baselines.ft.run_ft` (``augment`` and ``on_step`` included) plus ``rho``,
    ``adaptive``, ``eta`` of :class:`SAM`.
    Each step costs two forward/backward passes.
    """
    check_common(steps, lr, lr_schedule)
    dev, loss_fn = setup_run(model, device, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=lr, momentum=momentum,
              weight_decay=weight_decay)
    stream = batch_stream(clean_loader, batch_size, seed, dev, augment=augment)
    lrs = LrSchedule(opt, lr_schedule, steps)
    log = RunLog(steps, "FT-SAM", progress, on_step=on_step)
    with training(model, params, bn_train), Timer(dev) as timer:
        for t in range(steps):
            x, y = next(stream)
            lrs.at(t)

            def closure():
                opt.zero_grad(set_to_none=True)
                with frozen_running_stats(model) if opt.perturbed_pass else contextlib.nullcontext():
                    out = model(x)
                loss = loss_fn(out, y)
                loss.backward()
                return loss

            loss = opt.step(closure)
            log.record(t, loss)
    log.close()
    model.eval()
    return model, run_info("ft_sam", steps, timer, params, log, opt.skipped_steps, rho=rho, adaptive=adaptive)
