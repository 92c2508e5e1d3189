r"""Salience-AR — benign-salience neuron ranking + fine-tuning with an adaptive, magnitude-scaled regularizer.

This is our implementation of the **neuron-level method** that docs/method.md's Background lists as the second
baseline from the FIP line of work ("rank neurons by a *benign salience* — first-order gradient × weight on clean
data — and fine-tune the suspicious ones with an adaptive, magnitude-scaled regularizer").  The spec gives only
that sentence; every precise choice below is ours and is written down so it can be checked and changed.

Neurons
    The output channels of every ``nn.Conv2d`` and the output units of every ``nn.Linear`` of the model,
    **except the output layer** (the last Linear/Conv2d: its "neurons" are the classes, not features).
    ``layers=`` selects others by qualified name.  Neuron j of a layer owns row j of the weight (``W[j]``,
    all of its input connections / its filter) and its bias ``b_j``.

Benign salience (first-order Taylor, on clean data, model in eval mode)
    Removing neuron j's parameters (W[j], b_j → 0) changes the clean loss by ΔL_j ≈ −(⟨∇_{W[j]}ℓ, W[j]⟩ +
    ∂ℓ/∂b_j · b_j): the "gradient × weight" term, summed over the neuron's parameters **before** the absolute value
    (it is the derivative of the loss with respect to a scale on the neuron's pre-activation, so it is invariant to
    how the neuron's weights are laid out).  At a trained minimum the clean-set *mean* gradient is ≈ 0, so the
    term is measured per mini-batch and its absolute value averaged (weighted by batch size; as in Molchanov et
    al.'s Taylor pruning, which accumulates per batch)::

        s_j = Σ_b (B_b / N) · | Σ_{i ∈ neuron j} (∂ℓ_b/∂θ_i) · θ_i |        ℓ_b = mean cross-entropy of clean batch b

    ``s_j`` large ⇒ the clean task relies on neuron j.  BatchNorm is in eval mode (as for FIP's F0), which also keeps
    the score of a conv followed by BN from vanishing (in train mode BN makes the loss invariant to the filter's
    scale, and ⟨∇W[j], W[j]⟩ = 0 identically).

Magnitude
    m_j = ‖W[j]‖₂ (bias excluded) times, when the layer feeds a BatchNorm directly (the next module in
    ``model.modules()`` order is a ``BatchNorm1d/2d`` with ``num_features`` = the layer's outputs — true for
    ``nn.Sequential`` stacks and the usual ResNet definitions), the eval-mode BN gain |γ_j|/sqrt(var_j + eps): the
    norm of the *folded* weight, since BN otherwise cancels the filter's scale.

Suspicion (the sign and normalization)
    "Neurons whose weights matter little for clean loss but are large are suspicious"::

        u_j = log( m_j / mean_k m_k ) − log( s_j / mean_k s_k + ε ),       ε = 0.01

    Both quantities are normalized by their layer mean (units cancel; layers become comparable), the log-ratio is
    **high** for large-but-benignly-irrelevant neurons (a neuron dormant on clean data — the classic backdoor
    neuron of Fine-Pruning — gets the largest score, capped by ε at log(m_j/mean m) + log 100).  The top
    ``ceil(fraction · n_ℓ)`` neurons of each layer ℓ by u are marked **infected** (per-layer selection, so that every
    layer contributes and no layer's scale dominates).

Fine-tuning
    SGD + momentum on the clean cross-entropy plus the adaptive regularizer below.  Infected neurons (W[j], b_j)
    train at ``lr``; every other parameter of the model (other neurons, BatchNorm affine parameters, the output
    layer) is **lightly trained** at ``others_lr_scale · lr`` (default 0.1 — the network can re-route the clean task
    around the neurons being shrunk; ``others_lr_scale=0`` freezes them and then only infected neurons are counted
    as trainable).  Scaling is applied to the gradients, which for SGD + momentum without weight decay is exactly a
    per-parameter learning rate.  BatchNorm statistics stay frozen (eval mode; ``bn_train=True`` to re-estimate).

Adaptive regularizer (infected neurons' weights only; biases are not penalized)
    A magnitude-scaled L2 pull toward 0 whose strength is each weight's *current* magnitude relative to its layer::

        R(θ) = (λ/3) · Σ_ℓ Σ_{i ∈ infected weights of ℓ} |θ_i|³ / a_ℓ,        a_ℓ = mean |θ0| over layer ℓ's weight
        ∂R/∂θ_i = λ · (|θ_i| / a_ℓ) · θ_i

    i.e. weight decay with coefficient λ·|θ_i|/a_ℓ: large weights (the suspicious ones) are pulled hardest, and the
    pull fades as they shrink, so the clean loss can keep the weights it needs.  a_ℓ (fixed at the start) makes λ
    unit-free and comparable across layers.

    The step is **decoupled and semi-implicit**: after the SGD-momentum step on the clean loss, infected weights are
    shrunk by θ_i ← θ_i / (1 + lr_eff·λ·|θ_i|/a_ℓ) with lr_eff = lr_t/(1 − μ) (lr_t the current learning rate;
    1/(1 − μ) is the momentum's steady-state gain, so the pull has the strength it would have inside the momentum
    buffer).  Why not add ∂R/∂θ to the gradient: its own derivative 2·λ·|θ_i|/a_ℓ grows with the weight, so the
    explicit step diverges once lr·2·λ·|θ_i|/a_ℓ exceeds 2(1 + μ) — measured on the MNIST demo at the defaults and
    300 steps: SIG and WaNet went non-finite (≈ 280 of 300 steps skipped, chance accuracy), and capping the
    coefficient at half that bound did not stop it (the clean loss's own curvature adds to it).  The semi-implicit
    shrink is the explicit step up to O(lr²) and never overshoots 0.  On the synthetic backdoor of the tests it
    reproduces the explicit version's results where that one was stable.

Defaults: fraction 0.3, λ 1, lr 0.05 (cosine decay to 0, ``lr_schedule``), others_lr_scale 0.1 — chosen on clean
data only (rule in :mod:`fip_fast.baselines`: the strongest fraction·lr·λ whose clean-val accuracy stays within 0.03
of the start), with the earlier explicit regularizer step, on the synthetic backdoor of the tests (60 steps, batch
32, seeds 0/1/2: every fraction ∈ {0.1, 0.3, 0.5} × lr ∈ {0.01, 0.05, 0.1} × λ ∈ {1, 3, 10} kept 100 % clean-val
accuracy unless the explicit step diverged; ASR fell only with fraction 0.5) and the MNIST demo (badnets, blend;
150 steps).
Re-measured with the semi-implicit step (2026-12-01):

* synthetic backdoor, ACC / ASR on seeds 0/1/2: fraction 0.3 (any λ ≤ 10): 1.00 / 1.00 on every seed; fraction 0.5,
  λ 1 / 3 / 10: ASR 0.65 / 0.32–0.42 / 0.13–0.25 at ACC 1.00 (the explicit step gave 0.04 / 0.47 / 0.28 at λ 1).
* MNIST demo, seed 0, 300 steps, batch 64, clean-val accuracy start → end (test ACC %, test ASR %, recorded, not
  used): badnets 0.988 → 0.975 (92.9, 4.9), blend 1.000 → 0.938 (92.3, 2.1), sig 0.988 → 0.950 (94.2, 95.1),
  wanet 0.988 → 0.912 (93.3, 3.9).  So at the 300-step budget the defaults leave the 0.03 clean-val margin on
  blend, SIG and WaNet (80 clean-val images: one image is 1.25 points); lr 0.02 did not stay inside it either
  (blend 0.950, WaNet 0.950) and purified less (blend ASR 74 %).  We kept the defaults and report the cost.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

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
    count_trainable,
    default_loss,
    find_layer,
    fixed_batches,
    grads_finite,
    model_device,
    setup_run,
    training,
)

__all__ = ["neuron_layers", "benign_salience", "neuron_magnitude", "suspicion_scores", "select_infected",
           "adaptive_reg", "adaptive_reg_grad", "adaptive_reg_step_", "run_salience_ar"]

EPS = 0.01


def neuron_layers(model: nn.Module, layers: Optional[Sequence[Union[str, nn.Module]]] = None
                  ) -> list[tuple[str, nn.Module]]:
    """The ranked layers: ``layers`` (names or modules) or every Linear/Conv2d except the output layer."""
    if layers is not None:
        return [find_layer(model, layer) for layer in layers]
    out_name, _ = find_layer(model, None)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != out_name]


def _neuron_params(m: nn.Module) -> list[Tensor]:
    return [p for p in (m.weight, m.bias) if p is not None]


def benign_salience(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                    layers: Sequence[tuple[str, nn.Module]], loss_fn: Optional[LossFn] = None,
                    device: Optional[torch.device] = None) -> dict[str, Tensor]:
    """``{layer name: s}`` with s_j = Σ_b (B_b/N)·|Σ_{i∈j} ∂ℓ_b/∂θ_i · θ_i| (module docstring), fp32, eval mode."""
    loss_fn = default_loss(loss_fn)
    dev = device or model_device(model)
    acc = {n: torch.zeros(m.weight.shape[0], dtype=torch.float32, device=dev) for n, m in layers}
    plist = [p for _, m in layers for p in _neuron_params(m)]
    N = 0
    with training(model, plist, False), torch.enable_grad():
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            B = x.shape[0]
            N += B
            grads = torch.autograd.grad(loss_fn(model(x), y), plist)
            gi = iter(grads)
            for n, m in layers:
                gw = next(gi)
                t = (gw.float() * m.weight.detach().float()).reshape(gw.shape[0], -1).sum(1)
                if m.bias is not None:
                    t = t + next(gi).float() * m.bias.detach().float()
                acc[n] += B * t.abs()
    if N == 0:
        raise ValueError("no clean batches")
    return {n: a / N for n, a in acc.items()}


def _following_bn(model: nn.Module, layer: nn.Module) -> Optional[nn.Module]:
    mods = list(model.modules())
    for i, m in enumerate(mods):
        if m is layer and i + 1 < len(mods):
            nxt = mods[i + 1]
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and nxt.num_features == layer.weight.shape[0]:
                return nxt
    return None


@torch.no_grad()
def neuron_magnitude(model: nn.Module, layer: nn.Module) -> Tensor:
    """m_j = ‖W[j]‖₂, times |γ_j|/sqrt(var_j + eps) of a directly following BatchNorm (the folded weight's norm)."""
    m = layer.weight.detach().float().reshape(layer.weight.shape[0], -1).norm(dim=1)
    bn = _following_bn(model, layer)
    if bn is not None and bn.running_var is not None:
        gain = torch.ones_like(m) if bn.weight is None else bn.weight.detach().float().abs()
        m = m * gain / torch.sqrt(bn.running_var.float() + bn.eps)
    return m


def suspicion_scores(model: nn.Module, salience: dict[str, Tensor], layers: Sequence[tuple[str, nn.Module]],
                     eps: float = EPS) -> dict[str, Tensor]:
    """u_j = log(m_j/mean m) − log(s_j/mean s + ε) per layer (higher = more suspicious)."""
    out = {}
    for n, m in layers:
        mag = neuron_magnitude(model, m)
        s = salience[n]
        mag_n = mag / mag.mean().clamp_min(1e-30)
        s_n = s / s.mean().clamp_min(1e-30)
        out[n] = torch.log(mag_n.clamp_min(1e-30)) - torch.log(s_n + eps)
    return out


def select_infected(scores: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Boolean masks: the top ``ceil(fraction·n)`` scores of each layer (ties broken by index)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    masks = {}
    for n, u in scores.items():
        k = int(math.ceil(fraction * u.numel()))
        mask = torch.zeros_like(u, dtype=torch.bool)
        if k:
            mask[torch.topk(u, k).indices] = True
        masks[n] = mask
    return masks


def _row_mask(mask: Tensor, w: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (w.dim() - 1))).to(w.device)


def adaptive_reg(w: Tensor, mask: Tensor, scale: float, lam: float) -> Tensor:
    """R = (λ/3)·Σ_{rows j in mask} Σ_i |w_ji|³ / scale (differentiable)."""
    return lam / 3.0 * (w.abs().pow(3) * _row_mask(mask, w)).sum() / scale


def adaptive_reg_grad(w: Tensor, mask: Tensor, scale: float, lam: float) -> Tensor:
    """∂R/∂w = λ·(|w|/scale)·w on the masked rows, 0 elsewhere."""
    return lam * (w.abs() / scale) * w * _row_mask(mask, w)


def adaptive_reg_step_(w: Tensor, mask: Tensor, scale: float, lam: float, lr: float) -> Tensor:
    """The regularizer's semi-implicit step, in place: w ← w / (1 + lr·λ·|w|/scale) on the masked rows.

    = w − lr·∂R/∂w / (1 + lr·λ·|w|/scale): the explicit step up to O(lr²), but it only ever shrinks w toward 0, for
    any lr·λ (see the module docstring for why the explicit step is not used)."""
    c = w.abs().mul_(lr * lam / scale).mul_(_row_mask(mask, w)).add_(1)    # one temporary per call (every step)
    return w.div_(c)


def _multipliers_and_reg(ranked: list[tuple[str, nn.Module]], masks: dict[str, Tensor], others_lr_scale: float
                         ) -> tuple[dict[Tensor, Tensor], list[tuple[Tensor, Tensor, float]]]:
    """The gradient multipliers of the ranked layers' parameters (1 on infected rows, ``others_lr_scale``
    elsewhere) and, per ranked layer, the regularizer's ``(weight, infected-row mask, mean |weight|)``."""
    mult: dict[Tensor, Tensor] = {}
    reg: list[tuple[Tensor, Tensor, float]] = []
    for n, m in ranked:
        rm = masks[n]
        for p in _neuron_params(m):
            r = _row_mask(rm, p).to(p.dtype)
            mult[p] = r + (1 - r) * others_lr_scale
        reg.append((m.weight, rm, float(m.weight.detach().abs().mean().clamp_min(1e-12))))
    return mult, reg

def run_salience_ar(model: nn.Module, clean_loader: Any, steps: int = 300, lr: float = 0.05, *,
                    fraction: float = 0.3, lam: float = 1.0, others_lr_scale: float = 0.1, momentum: float = 0.9,
                    layers: Optional[Sequence[Union[str, nn.Module]]] = None, eps: float = EPS,
                    salience_batches: Optional[int] = None, bn_train: bool = False, lr_schedule: str = "cosine",
                    batch_size: int = 128,
                    seed: int = 0, device: Optional[torch.device] = None, loss_fn: Optional[LossFn] = None,
                    progress: bool = True, augment: Any = None,
                    on_step: Optional[StepHook] = None) -> tuple[nn.Module, dict]:
    """Rank neurons by benign salience, then fine-tune with the adaptive regularizer (module docstring).

    Args:
        model: purified in place and returned in eval mode.
        clean_loader: ``(x, y)`` tensors or an iterable of batches; the salience uses one pass over it
            (at most ``salience_batches`` batches), the fine-tuning samples it like the other baselines.
        fraction: share of each ranked layer's neurons marked infected.
        lam: λ of the adaptive regularizer.  others_lr_scale: learning-rate factor of all other parameters.
        layers: ranked layers (names/modules); default every Linear/Conv2d but the output layer.
        eps: ε of the suspicion score.  bn_train: BatchNorm mode during fine-tuning.
        augment: augmentation of the fine-tuning batches (:func:`fip_fast.augment.make_augment`; None: none) —
            the salience is measured on the unaugmented clean data.
        on_step: ``on_step(done, loss)`` after every step (:data:`fip_fast.baselines._common.StepHook`);
            :func:`fip_fast.pipeline.purify` evaluates the model there every ``eval_every`` steps.
    Returns:
        ``(model, info)``; ``info["infected"]`` = ``{layer: [neuron indices]}``.
    """
    check_common(steps, lr, lr_schedule)
    if others_lr_scale < 0:
        raise ValueError(f"others_lr_scale must be ≥ 0, got {others_lr_scale}")
    dev, loss_fn = setup_run(model, device, loss_fn)
    ranked = neuron_layers(model, layers)
    if not ranked:
        raise ValueError("no layers to rank (the model needs a Linear/Conv2d besides its output layer)")
    with Timer(dev) as timer:
        batches = fixed_batches(clean_loader, batch_size, salience_batches)
        sal = benign_salience(model, batches, ranked, loss_fn, dev)
        scores = suspicion_scores(model, sal, ranked, eps)
        masks = select_infected(scores, fraction)
        ranked_params = {id(p) for _, m in ranked for p in _neuron_params(m)}
        if others_lr_scale > 0:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = [p for _, m in ranked for p in _neuron_params(m) if p.requires_grad]
        mult, reg = _multipliers_and_reg(ranked, masks, others_lr_scale)
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
        stream = batch_stream(clean_loader, batch_size, seed, dev, augment=augment)
        lrs = LrSchedule(opt, lr_schedule, steps)
        log = RunLog(steps, "Salience-AR", progress, on_step=on_step)
        with training(model, params, bn_train):
            for t in range(steps):
                x, y = next(stream)
                lrs.at(t)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                with torch.no_grad():
                    if not grads_finite(params):
                        log.skip(t)
                        continue
                    for p in params:
                        if p.grad is None:
                            continue
                        if p in mult:
                            p.grad.mul_(mult[p])
                        elif id(p) not in ranked_params:
                            p.grad.mul_(others_lr_scale)
                opt.step()
                if lam > 0:     # decoupled, semi-implicit regularizer step (module docstring)
                    with torch.no_grad():
                        lr_eff = opt.param_groups[0]["lr"] / (1 - momentum)
                        for w, rm, a in reg:
                            adaptive_reg_step_(w, rm, a, lam, lr_eff)
                log.record(t, loss)
        log.close()
    model.eval()
    n_infected_params = sum(int(_row_mask(masks[n], p).expand_as(p).sum()) for n, m in ranked
                            for p in _neuron_params(m))
    trainable = count_trainable(params) if others_lr_scale > 0 else n_infected_params
    return model, {"method": "salience_ar", "steps": steps, "wall_time_s": timer.seconds,
                   "trainable_params": trainable, "infected_params": n_infected_params,
                   "infected": {n: torch.nonzero(mk).flatten().tolist() for n, mk in masks.items()},
                   "loss_history": log.loss_history, "skipped_steps": log.skipped, "fraction": fraction, "lam": lam,
                   "others_lr_scale": others_lr_scale}
