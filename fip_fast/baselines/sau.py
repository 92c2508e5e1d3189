"""SAU — Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, NeurIPS 2023, "Shared Adversarial Unlearning:
Backdoor Mitigation by Unlearning Shared Adversarial Examples", arXiv 2307.10562).

Idea: a backdoor trigger is one (very effective) adversarial perturbation of the backdoored model θ0.  The paper
bounds the backdoor risk of the purified model θ by its risk on *shared* adversarial examples — perturbed inputs
x̃ on which θ and θ0 are both fooled **to the same label** — and purifies by unlearning them: making θ either
classify x̃ correctly or at least differently from θ0.  θ0 is a frozen copy of the model taken at the start.

Every step, on a clean batch ``(x, y)`` (N samples, K classes):

**Inner maximization** (:func:`shared_pgd`, the model in eval mode as in the authors' code): PGD on δ in the
L∞ ball ‖δ‖∞ ≤ ε (and, with ``clamp=(lo, hi)``, lo ≤ x + δ ≤ hi), x̃ = x + δ, ascending ::

    J(δ) = β_adv / (2N) · [ Σ_{i ∉ F}  CE(θ(x̃_i), y_i) + Σ_{i ∉ F0} CE(θ0(x̃_i), y_i) ]
           − β_shared / N · Σ_{i ∉ S} JS( softmax θ(x̃_i) ‖ softmax θ0(x̃_i) )

    δ ← Π( δ + α · sign ∇_δ J(δ) ),   init δ = +ε ("max", the authors' default), U[−ε, ε] or 0

where, at the current δ, F = {i : θ(x̃_i) ≠ θ(x_i)} (θ already fooled), F0 = {i : θ0(x̃_i) ≠ θ0(x_i)} and
S = F ∩ F0 ∩ {θ(x̃_i) = θ0(x̃_i)} (shared) — the masks are recomputed each iteration and not differentiated.
The CE term pushes the samples that are not yet adversarial away from y for both models; the Jensen–Shannon term
pulls the two models' predictions together where they are not yet shared.  PGD stops early once every sample
is shared (as the authors do).  This is the authors' ``Shared_PGD`` (BackdoorBench ``defense/sau.py``), written
as an ascent on J (they descend on −J).

**Outer minimization** (one optimizer step on θ)::

    L(θ) = λ_clean · ℓ(θ(x), y) + λ_at · ℓ(θ(x̃), y) + λ_shared · L_sar(θ)
    L_sar(θ) = 1/N · Σ_{i ∈ M} −log(1 − p_θ(ŷ0_i | x̃_i)),   ŷ0_i = argmax θ0(x̃_i)

with ℓ = ``loss_fn`` (cross-entropy by default) and M = A0 = {i : ŷ0_i ≠ y_i and ŷ0_i ≠ θ0(x_i)} — the samples
on which the *original* model is fooled (``unlearn_on="ref_fooled"``, the authors' choice).  −log(1 − p) is the
paper's relaxation of the indicator 1[θ(x̃_i) = ŷ0_i], so the term weights each sample by how much θ still
*shares* θ0's adversarial label: it is ≈ 0 where θ already disagrees and large where both models agree on the
wrong class.  ``unlearn_on="shared"`` restricts M to the hard shared set S_out = A0 ∩ {θ(x̃) ≠ y} ∩
{θ(x̃) = ŷ0}.  log(1 − p) is computed as logsumexp of the other K − 1 logits minus logsumexp of all K (stable;
the authors clamp p to [0.001, 0.999] instead, which differs only where the gradient is already ≈ 0).

Defaults and their sources (BackdoorBench ``config/defense/sau/config.yaml``, the authors' settings for CIFAR-10,
GTSRB, …): ε = 0.2 (``trigger_norm``, L∞, in [0, 1] pixel units), α = 0.2 (``adv_lr``), 5 PGD steps
(``adv_steps``), init "max" (``pgd_init``), β_adv = 0.01 (``beta_1``), β_shared = 1 (``beta_2``),
λ_clean = 1, λ_at = 0, λ_shared = 1 (``lmd_1``, ``lmd_2``, ``lmd_3``), Adam (betas 0.9 / 0.999), weight decay
0, cosine decay.  Their lr is 1e-4 over 100 epochs of a 5 % clean set (≈ 1000 steps of batch 256), which at this
package's budget (300 steps) leaves the backdoor in place.  ``lr`` = 3e-3 was chosen by the rule of
:mod:`fip_fast.baselines` (clean data only: the largest lr whose clean-val accuracy stays within 0.03 of the start)
on the MNIST demo, seed 0, 300 steps, batch 64, through ``purify`` (80-image clean-val), candidates 1e-4 / 1e-3 /
3e-3 / 1e-2: BadNets clean-val 0.988 → 0.975 / 0.963 / 0.975 / 0.963, Blend 1.000 → 0.975 at 3e-3 and 0.925 at
1e-2 (rejected).  Test ACC / ASR, recorded, not used: BadNets 95.4 / 99.7, 96.4 / 24.6, 96.0 / 2.0, 94.0 / 0.3 %;
Blend 95.9 / 0.1 (3e-3), 93.3 / 0.1 (1e-2); backdoored 97.7 / 99.9 and 97.5 / 99.9.  The same runs without the
unlearning term (λ_shared = 0, i.e. Adam fine-tuning) kept BadNets ASR at 98.3 % (lr 1e-3) and 76.6 % (3e-3), so
the unlearning term is what purifies.  A random PGD start (3e-3, BadNets) gave 95.3 / 7.3; "max" is kept.
Single seed, two attacks, 80 clean-val images: a coarse choice.  ``batch_size`` defaults to 128 (the package's
runners; the authors use 256).

``eps`` / ``alpha`` are in **input units**: the authors perturb de-normalized pixels in [0, 1], so for inputs
normalized as (x − μ)/σ pass ε/σ.  The package's MNIST data are in [0, 1] (``load_mnist5k``), where the defaults
apply as they are.  Inputs must be continuous (floating point).

Deviation (BatchNorm): the authors' default is ``train_mode=False`` (BN frozen throughout: "higher ACC but also
higher ASR"), and with train mode they forward [x, x̃] as one batch.  Here ``bn_train=True`` (the default, like
every runner of the package) forwards x in train mode (batch statistics, running statistics updated) and x̃ in
train mode under :func:`fip_fast.optim.frozen_running_stats` (batch statistics, running ones *not* updated), so
the statistics used at test time stay those of clean data; PGD always runs in eval mode.

Cost per step ≈ (2 · pgd_steps + 2) FT steps on the same batch (an FT step: one forward + one backward).  Each
PGD iteration forwards θ and θ0 on x̃ and back-propagates through both to δ (no weight gradients): ≈ 2 FT steps;
the outer step forwards and back-propagates θ on x and on x̃ (2 FT steps) and forwards θ0 on x̃; the clean
predictions θ(x), θ0(x) are two forwards without grad.  Measured (one CPU thread, batch 64, 20 steps): 11.4× FT
on the tests' small CNN and 12.3× on the MNIST demo CNN at 5 PGD steps; 4.6× / 5.3× at 1 PGD step.
Memory: a second copy of the model (θ0).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
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
    grads_finite,
    module_modes,
    run_info,
    setup_run,
    training,
)

__all__ = ["run_sau", "shared_pgd", "shared_objective", "adversarial_masks", "shared_unlearning_loss",
           "PGD_INITS", "UNLEARN_ON"]

PGD_INITS = ("max", "random", "zero")
UNLEARN_ON = ("ref_fooled", "shared")
Refs = Union[Tensor, Sequence[Tensor]]


def _differs(pred: Tensor, refs: Refs) -> Tensor:
    """``pred`` differs from every tensor in ``refs`` (one tensor or several), elementwise, bool ``(N,)``."""
    refs = (refs,) if isinstance(refs, Tensor) else tuple(refs)
    out = torch.ones_like(pred, dtype=torch.bool)
    for r in refs:
        out &= pred != r
    return out


def adversarial_masks(pred: Tensor, pred_ref: Tensor, refs: Refs, refs_ref: Refs) -> tuple[Tensor, Tensor, Tensor]:
    """Which perturbed samples fool θ, fool θ0, and are *shared* adversarial examples.

    Args:
        pred, pred_ref: ``(N,)`` labels θ(x̃), θ0(x̃) predict on the perturbed inputs.
        refs, refs_ref: what counts as "not fooled" for θ / θ0 — one ``(N,)`` label tensor or several (fooled
            means different from all of them).  PGD uses the models' clean predictions; the outer step uses
            ``y`` for θ and ``(y, θ0(x))`` for θ0, as the authors do.
    Returns:
        ``(fooled, fooled_ref, shared)``, bool ``(N,)``; ``shared = fooled & fooled_ref & (pred == pred_ref)``:
        both models fooled **to the same label**.
    """
    fooled, fooled_ref = _differs(pred, refs), _differs(pred_ref, refs_ref)
    return fooled, fooled_ref, fooled & fooled_ref & (pred == pred_ref)


def _js(logits: Tensor, logits_ref: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) between the two softmax distributions, per sample ``(N,)``."""
    lp, lq = F.log_softmax(logits.float(), 1), F.log_softmax(logits_ref.float(), 1)
    lm = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2.0)     # log of the mixture ½(p + q), stable
    return 0.5 * ((lp.exp() * (lp - lm)).sum(1) + (lq.exp() * (lq - lm)).sum(1))


def shared_objective(logits: Tensor, logits_ref: Tensor, y: Tensor, fooled: Tensor, fooled_ref: Tensor,
                     shared: Tensor, beta_adv: float = 0.01, beta_shared: float = 1.0) -> Tensor:
    """The inner objective J (maximized by :func:`shared_pgd`; formula in the module docstring).

    Args:
        logits, logits_ref: ``(N, K)`` of θ and θ0 on x̃.  y: ``(N,)`` true labels.
        fooled, fooled_ref, shared: bool ``(N,)`` masks at the current δ (:func:`adversarial_masks`).
    Returns:
        scalar J (sums over the masked samples divided by N, so the scale does not depend on how many are masked).
    """
    n = logits.shape[0]
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    ce_ref = F.cross_entropy(logits_ref.float(), y, reduction="none")
    adv = (ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()     # push the not-yet-adversarial ones off y
    share = (_js(logits, logits_ref) * ~shared).sum()              # pull the not-yet-shared ones together
    return beta_adv * adv / (2 * n) - beta_shared * share / n


def _project(delta: Tensor, x: Tensor, eps: float, clamp: Optional[tuple[float, float]]) -> Tensor:
    """Onto {‖δ‖∞ ≤ ε} ∩ {lo ≤ x + δ ≤ hi}: both are boxes, so clamping to one then the other is the exact
    projection when the intersection is non-empty (always, for x inside [lo, hi]).  For a coordinate of x outside
    [lo, hi] by more than ε the ball wins (it is clamped last): δ = ±ε, towards the valid range."""
    if clamp is not None:
        delta = torch.max(torch.min(delta, clamp[1] - x), clamp[0] - x)
    return delta.clamp(-eps, eps)


def _init_delta(x: Tensor, eps: float, init: str, generator: Optional[torch.Generator]) -> Tensor:
    if init == "max":          # the authors' default: every coordinate at +ε
        return torch.full_like(x, eps)
    if init == "random":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return ((2 * u - 1) * eps).to(x.device)
    return torch.zeros_like(x)


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def shared_pgd(model: nn.Module, model_ref: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.2,
               alpha: float = 0.2, steps: int = 5, init: str = "max", clamp: Optional[tuple[float, float]] = None,
               beta_adv: float = 0.01, beta_shared: float = 1.0, generator: Optional[torch.Generator] = None,
               clean_pred: Optional[Tensor] = None, clean_pred_ref: Optional[Tensor] = None
               ) -> tuple[Tensor, int]:
    """Shared adversarial perturbations δ of a batch by PGD ascent on :func:`shared_objective`.

    The models are used in whatever mode they are in (:func:`run_sau` puts θ in eval mode; θ0 always is).
    Gradients are taken with respect to δ only, so no parameter ``.grad`` is touched.

    Args:
        x: ``(N, …)`` inputs, y: ``(N,)`` labels.  eps: L∞ radius, alpha: step size, both in input units.
        steps: PGD iterations (≥ 1).  init: ``"max"`` (δ = +ε), ``"random"`` (U[−ε, ε], from ``generator``) or
            ``"zero"``.  clamp: ``(lo, hi)`` valid input range of x + δ, or None.
        clean_pred, clean_pred_ref: θ(x), θ0(x) if already computed (else computed here).
    Returns:
        ``(delta, iterations)``: δ detached, shape and dtype of x, inside the ball (and the clamp range); the number
        of gradient iterations run (fewer than ``steps`` when every sample became shared).
    """
    if not x.is_floating_point():
        raise ValueError(f"SAU perturbs the inputs: x must be floating point (e.g. images), got {x.dtype}")
    if clean_pred is None:
        clean_pred = _predict(model, x)
    if clean_pred_ref is None:
        clean_pred_ref = _predict(model_ref, x)
    delta = _project(_init_delta(x, eps, init, generator), x, eps, clamp)
    it = 0
    for it in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            logits, logits_ref = model(x + delta), model_ref(x + delta)
            masks = adversarial_masks(logits.argmax(1), logits_ref.argmax(1), clean_pred, clean_pred_ref)
            if bool(masks[2].all()):      # every sample already shared: nothing left to gain (authors stop too)
                delta = delta.detach()
                break
            obj = shared_objective(logits, logits_ref, y, *masks, beta_adv=beta_adv, beta_shared=beta_shared)
            (grad,) = torch.autograd.grad(obj, delta)
        delta = _project(delta.detach() + alpha * grad.sign(), x, eps, clamp)
    else:
        it = steps
    return delta.detach(), it


def shared_unlearning_loss(logits_adv: Tensor, label_ref: Tensor, mask: Tensor) -> Tensor:
    """L_sar = 1/N · Σ_{i ∈ mask} −log(1 − p_θ(label_ref_i | x̃_i)) — pushes θ's probability of θ0's adversarial
    label down on the masked samples.

    Args:
        logits_adv: ``(N, K)`` θ's logits on x̃ (with grad).  label_ref: ``(N,)`` ŷ0 = argmax θ0(x̃).
        mask: bool ``(N,)`` the samples to unlearn.
    Returns:
        scalar; 0 when the mask is empty.
    """
    z = logits_adv.float()
    own = F.one_hot(label_ref, z.shape[1]).bool()
    log_not = torch.logsumexp(z.masked_fill(own, float("-inf")), 1) - torch.logsumexp(z, 1)   # log(1 − p), stable
    return -(log_not * mask).sum() / z.shape[0]


def _check_sau(reals: dict, pgd_steps, init, clamp, unlearn_on, optimizer) -> None:
    """ValueError naming the first bad option; ``reals``: ``{name: value}`` that must be finite numbers ≥ 0."""
    for name, v in reals.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {v!r}")
    if not isinstance(pgd_steps, int) or isinstance(pgd_steps, bool) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be an int ≥ 1, got {pgd_steps!r}")
    if init not in PGD_INITS:
        raise ValueError(f"init must be one of {PGD_INITS}, got {init!r}")
    if unlearn_on not in UNLEARN_ON:
        raise ValueError(f"unlearn_on must be one of {UNLEARN_ON}, got {unlearn_on!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if clamp is not None and not (isinstance(clamp, (tuple, list)) and len(clamp) == 2
                                  and float(clamp[0]) < float(clamp[1])):
        raise ValueError(f"clamp must be None or (lo, hi) with lo < hi, got {clamp!r}")


def _mean(v: Sequence[float]) -> float:
    return float(sum(v) / len(v)) if v else float("nan")


def _outer_loss(model, model_ref, x, y, delta, clean_pred_ref, loss_fn, lam, unlearn_on):
    """The outer loss L(θ) (module docstring) and the batch's shared / θ0-fooled rates; θ in its current mode."""
    lam_clean, lam_at, lam_shared = lam
    out = model(x)
    with frozen_running_stats(model):       # adversarial batch: batch statistics, running statistics untouched
        out_adv = model(x + delta)
    with torch.no_grad():
        label_ref = model_ref(x + delta).argmax(1)
    fooled, fooled_ref, shared = adversarial_masks(out_adv.argmax(1).detach(), label_ref, y, (y, clean_pred_ref))
    mask = fooled_ref if unlearn_on == "ref_fooled" else shared
    loss = lam_clean * loss_fn(out, y)
    if lam_at:
        loss = loss + lam_at * loss_fn(out_adv, y)
    loss = loss + lam_shared * shared_unlearning_loss(out_adv, label_ref, mask)
    return loss, float(shared.float().mean()), float(fooled_ref.float().mean())


def run_sau(model: nn.Module, clean_loader: Any, steps: int = 300, lr: float = 3e-3, *, eps: float = 0.2,
            alpha: float = 0.2, pgd_steps: int = 5, init: str = "max", clamp: Optional[tuple[float, float]] = None,
            beta_adv: float = 0.01, beta_shared: float = 1.0, lam_clean: float = 1.0, lam_at: float = 0.0,
            lam_shared: float = 1.0, unlearn_on: str = "ref_fooled", optimizer: str = "adam",
            momentum: float = 0.9, weight_decay: float = 0.0, lr_schedule: str = "cosine", batch_size: int = 128,
            seed: int = 0, bn_train: bool = True, augment: Any = None, device: Optional[torch.device] = None,
            loss_fn: Optional[LossFn] = None, progress: bool = True,
            on_step: Optional[StepHook] = None) -> tuple[nn.Module, dict]:
    """Purify ``model`` by Shared Adversarial Unlearning (formulas and sources in the module docstring).

    Args:
        model: purified in place and returned in eval mode; a frozen copy taken here is θ0.
        clean_loader: ``(x, y)`` tensors (sampled with replacement) or an iterable of batches (cycled).
        steps: outer optimizer steps.  lr: Adam's (or SGD's) base learning rate.
        eps, alpha: L∞ radius and PGD step, in input units (defaults for inputs in [0, 1]).
        pgd_steps: PGD iterations per step (≥ 1).  init: PGD start, ``"max"`` / ``"random"`` / ``"zero"``.
        clamp: ``(lo, hi)`` valid range of x + δ, or None (no clamp, as the authors by default).
        beta_adv, beta_shared: weights of the inner CE / JS terms.  lam_clean, lam_at, lam_shared: outer weights.
        unlearn_on: ``"ref_fooled"`` (θ0 fooled, the authors') or ``"shared"`` (only current shared examples).
        optimizer: ``"adam"`` (authors) or ``"sgd"`` (with ``momentum``).  weight_decay: L2, of the optimizer.
        lr_schedule: ``"cosine"`` or ``"constant"``.  batch_size, seed: batch sampling (seed also seeds the
            ``"random"`` PGD start).  bn_train: BatchNorm in train mode for the outer step.
        augment: ``None`` or a :func:`fip_fast.augment.make_augment` spelling, applied to every clean batch.
        loss_fn: ``loss_fn(logits, y)`` → scalar for the clean and AT terms (default cross-entropy).
        on_step: ``on_step(done, loss)`` after every step (:data:`fip_fast.baselines._common.StepHook`);
            :func:`fip_fast.pipeline.purify` evaluates the model there every ``eval_every`` steps.
    Returns:
        ``(model, info)``: the keys of :mod:`fip_fast.baselines._common` plus ``shared_rate`` / ``ref_fooled_rate``
        (mean over steps of the fraction of each batch that is shared adversarial / fools θ0 at the outer step)
        and ``pgd_iterations`` (mean PGD iterations run per step).
    """
    check_common(steps, lr, lr_schedule)
    lam = (lam_clean, lam_at, lam_shared)
    _check_sau(dict(eps=eps, alpha=alpha, beta_adv=beta_adv, beta_shared=beta_shared, lam_clean=lam_clean,
                    lam_at=lam_at, lam_shared=lam_shared, weight_decay=weight_decay, momentum=momentum),
               pgd_steps, init, clamp, unlearn_on, optimizer)
    dev, loss_fn = setup_run(model, device, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    model_ref = copy.deepcopy(model).eval().requires_grad_(False)      # θ0, frozen for the whole run
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam" else
           torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    stream = batch_stream(clean_loader, batch_size, seed, dev, augment=augment)
    gen = torch.Generator().manual_seed(int(seed) + 7919)              # the "random" PGD start only
    lrs = LrSchedule(opt, lr_schedule, steps)
    rates, iters = [], []
    log = RunLog(steps, "SAU", progress, on_step=on_step)
    with training(model, params, bn_train), Timer(dev) as timer:
        for t in range(steps):
            x, y = next(stream)
            lrs.at(t)
            clean_pred_ref = _predict(model_ref, x)
            with module_modes(model, False):      # adversarial examples of the model in eval mode (authors)
                delta, it = shared_pgd(model, model_ref, x, y, eps=eps, alpha=alpha, steps=pgd_steps, init=init,
                                       clamp=clamp, beta_adv=beta_adv, beta_shared=beta_shared, generator=gen,
                                       clean_pred_ref=clean_pred_ref)
            opt.zero_grad(set_to_none=True)
            loss, shared_rate, fooled_rate = _outer_loss(model, model_ref, x, y, delta, clean_pred_ref, loss_fn,
                                                         lam, unlearn_on)
            loss.backward()
            rates.append((shared_rate, fooled_rate))
            iters.append(it)
            if not grads_finite(params):
                log.skip(t)
                continue
            opt.step()
            log.record(t, loss)
    log.close()
    model.eval()
    return model, run_info("sau", steps, timer, params, log, shared_rate=_mean([r[0] for r in rates]),
                           ref_fooled_rate=_mean([r[1] for r in rates]), pgd_iterations=_mean(iters), eps=eps,
                           pgd_steps=pgd_steps)
