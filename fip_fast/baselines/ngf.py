r"""NGF — Natural Gradient Fine-tuning (Karim et al., "Efficient Backdoor Removal Through Natural Gradient
Fine-tuning"; docs/method.md Background): fine-tune **one layer** (by default the classifier, i.e. the last
``nn.Linear``/``nn.Conv2d`` of the model; any layer by qualified name) with a natural-gradient optimizer whose
curvature is the Fisher, plus the Fisher anchor (CDA) of FIP: (η_r/2)·Σ F0·(θ − θ0)².

Two curvature models (``curvature=``):

``"kfac"`` (default) — Kronecker-factored approximate curvature (Martens & Grosse 2015; convolutions as in KFC,
    Grosse & Martens 2016).  For a layer with input activations a (a bias column 1 appended when the layer has a
    bias: ā = [a, 1]) and pre-activation output s, with g = ∂ℓ_n/∂s the **per-sample** output gradient
    (= B·∂ℓ/∂s for a batch-mean loss ℓ over B samples — the empirical Fisher, i.e. the observed labels, like
    FIP's F0):

        Linear:  Â = (1/B)·Σ_n ā_n ā_nᵀ,                 Ĝ = (1/B)·Σ_n g_n g_nᵀ
        Conv2d:  Â = (1/(B·L))·Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ,  Ĝ = (1/B)·Σ_n Σ_t g_{n,t} g_{n,t}ᵀ

    where for a convolution ā_{n,t} is the unfolded input patch at output location t (``F.unfold``, column order
    matching ``weight.view(out, -1)``) and L the number of output locations (KFC's spatially-uncorrelated
    approximation: F ≈ Σ_t E[ā āᵀ] ⊗ E[g gᵀ] = Â ⊗ Ĝ with the L inside Ĝ).  Extra leading dimensions of a Linear
    input (tokens) are treated like convolution locations.  The factors are exponential moving averages,
    A ← ε·A + (1 − ε)·Â (the first batch initializes A = Â), updated every step; the damped inverses

        (A + π·λ·I)⁻¹,  (G + (λ/π)·I)⁻¹,   π = 1, or with ``pi_split=True`` π = sqrt((tr A / dim A)/(tr G / dim G))

    are recomputed every ``inv_every`` steps (Tikhonov damping; π-split as in Martens & Grosse §6.3, which keeps
    the product damping λ² while balancing the two factors).  The natural-gradient direction of the layer's
    gradient matrix ∇W̃ = [∇W, ∇b] (out × (in[+1])) is V = (G + λ_G I)⁻¹ · ∇W̃ · (A + λ_A I)⁻¹.

``"diag"`` — the diagonal empirical Fisher built on the project's squared-gradient op
    (:func:`fip_fast.ops.fisher_accumulate_`: F ← β·F + (1 − β)·g² every step) and
    V = g / (F/(1 − β^t) + λ) — FIP's ``precondition="fisher"`` rule.

Step, per parameter (after the gradient g of the clean loss is in ``p.grad``):

    V   = natural-gradient direction of g (above)
    ν   = min(1, sqrt(kl_clip / (lr² · Σ⟨V, g⟩)))        (K-FAC's KL clipping of the step; kl_clip=None: ν = 1)
    d   = ν·V + η_r·F0·(θ − θ0) + wd·θ
    buf = μ·buf + d;   θ ← θ − lr·buf

The anchor is added **after** preconditioning.  Why: F0 is max-normalized (``estimate_fisher(normalize="max")``,
the project's convention, so η_r ≈ 1 means the same thing for FIP and NGF) while the running curvature is raw;
preconditioning the anchor would divide a [0, 1] quantity by a curvature of arbitrary scale and make the anchor's
strength (and the stability bound lr·η_r·max F0 < 2(1 + μ) that FIP documents) model-dependent.

The rest of the model is frozen and kept in eval mode (BatchNorm statistics fixed): only the chosen layer learns.

Defaults (chosen on clean data only)
    lr 0.01, momentum 0.9, 300 steps, ε = β = 0.95, inverses every 10 steps, kl_clip 1e-3, η_r = 1 (max-normalized
    F0, as FIP).  The damping matters most: near a fitted minimum the *empirical* Fisher of the classifier is tiny
    (G ≈ E[(p − y)(p − y)ᵀ] → 0), so a small λ gives huge natural-gradient steps.  On the demo CNN (MNIST-5k, BadNets,
    seed 0) we fine-tuned on one half of the clean set for 100 steps and measured the clean loss on the other
    half: K-FAC with π-split at λ = 1e-3 / 1e-2 / 0.1 / 0.3 / 1 gave held-out loss 18.3 / 0.88 / 0.11 / 0.091 /
    0.082 (before: 0.074; without π-split λ = 1e-2 / 0.1: 15.6 / 0.16); the diagonal version at λ = 1e-2 / 0.1 gave
    0.26 / 0.11.  We took the smallest held-out clean loss: K-FAC λ = 1 with π-split, diagonal λ = 0.1.
    No triggered data was looked at for this choice.  The learning rate decays by a cosine to 0 (``lr_schedule``).
    Weight decay (which purifies FT, see :mod:`.ft`) stays 0: on the synthetic backdoor of the tests (60 steps,
    batch 32, seeds 0/1/2) every lr ∈ {0.01, 0.05, 0.1, 0.3} × wd ∈ {0, 0.01, 0.03, 0.1, 0.3} kept clean-val
    accuracy at 100 % but no setting took seed 0's ASR below 0.75 (K-FAC 0.85, diag 0.75; seed 1 fell to 0.16–0.4,
    seed 2 stayed 1.00); on the MNIST demo (badnets, 150 steps) K-FAC lr 0.05 with wd 0.03 / 0.1 / 0.3 left ASR at
    97.6–98.2 % (recorded, not used).  Plausibly the trigger is carried by the features and clean data give the
    classifier alone no signal to move off them (not verified by an ablation).  At the defaults (lr 0.01, wd 0)
    ASR stays 1.00 on all three seeds.  What does purify is a small damping: K-FAC at λ = 1e-3 without KL clipping
    took the synthetic ASR to 0.32 / 0.00 / 0.35 (the natural-gradient step is large along features that clean data
    rarely activate; ``tests/test_baselines.py::test_baseline_mechanism_lowers_asr_at_higher_pressure``), but on the
    MNIST demo the same λ drops clean test accuracy to 17–36 % (clean-val 12–41 %), so the clean-data rule rejects
    it; λ = 1e-2 kept 87 % and left ASR at 79 %.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from fip_fast import ops
from fip_fast.baselines._common import (
    LossFn,
    LrSchedule,
    RunLog,
    StepHook,
    Timer,
    batch_stream,
    check_common,
    find_layer,
    fixed_batches,
    only_trainable,
    run_info,
    setup_run,
    training,
)
from fip_fast.baselines._kfac import KFAC, kfac_factors_explicit

__all__ = ["KFAC", "NaturalGradient", "kfac_factors_explicit", "run_ngf", "DEFAULT_DAMPING"]

DEFAULT_DAMPING = {"kfac": 1.0, "diag": 0.1}


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient SGD with momentum and the Fisher anchor (see the module docstring for the step).

    Args:
        params: the parameters to train.
        lr, momentum, weight_decay: as in SGD (heavy-ball momentum: buf = μ·buf + d).
        curvature: ``"diag"`` (running squared-gradient Fisher through :func:`fip_fast.ops.fisher_accumulate_`)
            or ``"kfac"`` (then ``kfac`` must cover every parameter).
        kfac: a :class:`KFAC` whose hooks see the backward passes preceding each :meth:`step`.
        beta: EMA factor β of the diagonal Fisher.  damping: λ of the diagonal preconditioner.
        kl_clip: bound on lr²·Σ⟨V, g⟩ per step (``None`` disables).
        eta_r: anchor weight.  fisher0: ``{param: F0}`` (fp32, parameter shape); anchor θ0 = the values at
            construction.
        impl: implementation of ``fisher_accumulate_`` (see :mod:`fip_fast.ops`).

    A step whose gradients are non-finite changes nothing (K-FAC factors included, if :meth:`step` is what calls
    ``kfac.update()``) and is counted in :attr:`skipped_steps`.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 curvature: str = "diag", kfac: Optional[KFAC] = None, beta: float = 0.95, damping: float = 1e-3,
                 kl_clip: Optional[float] = 1e-3, eta_r: float = 0.0,
                 fisher0: Optional[dict[Tensor, Tensor]] = None, impl: str = "auto"):
        if curvature not in ("diag", "kfac"):
            raise ValueError(f"curvature must be 'diag' or 'kfac', got {curvature!r}")
        if curvature == "kfac" and kfac is None:
            raise ValueError("curvature='kfac' needs a KFAC instance")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta=beta,
                                      damping=damping, eta_r=eta_r))
        self.curvature, self.kfac, self.kl_clip, self.impl = curvature, kfac, kl_clip, impl
        self.skipped_steps = 0
        if kfac is not None and curvature == "kfac":
            covered = {id(p) for p in kfac.params()}
            for g in self.param_groups:
                for p in g["params"]:
                    if id(p) not in covered:
                        raise ValueError("curvature='kfac': every parameter must belong to a KFAC module")
        known = {id(p) for g in self.param_groups for p in g["params"]}
        for p, f0 in (fisher0 or {}).items():
            if id(p) not in known:
                raise ValueError("fisher0 has an entry for a tensor that is not among the optimizer's parameters")
            if f0.shape != p.shape:
                raise ValueError(f"fisher0 entry of shape {tuple(f0.shape)} does not match {tuple(p.shape)}")
            st = self.state[p]
            st["anchor"] = p.detach().clone()
            st["fisher0"] = f0.detach().to(device=p.device, dtype=torch.float32).clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not ps:
            return loss
        if not bool(torch.stack([torch.isfinite(p.grad).all() for p in ps]).all()):
            self.skipped_steps += 1
            if self.kfac is not None:
                self.kfac._a.clear()
                self.kfac._g.clear()
            return loss
        if self.curvature == "kfac":
            self.kfac.update()
            V = self.kfac.precondition()
        else:
            V = {}
            for group in self.param_groups:
                gps = [p for p in group["params"] if p.grad is not None]
                for p in gps:
                    st = self.state[p]
                    if "fisher" not in st:
                        st["fisher"] = torch.zeros_like(p, dtype=torch.float32)
                        st["step"] = 0
                    st["step"] += 1
                if not gps:
                    continue
                # The project's squared-gradient Fisher op: F ← β·F + (1 − β)·g², one launch for the group.
                ops.fisher_accumulate_([self.state[p]["fisher"] for p in gps], [p.grad for p in gps],
                                       group["beta"], 1.0 - group["beta"], impl=self.impl)
                for p in gps:
                    st = self.state[p]
                    bc = 1.0 - group["beta"] ** st["step"]
                    V[p] = p.grad.float() / (st["fisher"] / bc + group["damping"])
        nu = 1.0
        if self.kl_clip is not None:
            lr = self.param_groups[0]["lr"]
            vg = float(sum((V[p] * p.grad.float()).sum() for p in ps))
            if vg > 0 and lr > 0:
                nu = min(1.0, math.sqrt(self.kl_clip / (lr * lr * vg)))
        self.last_nu = nu
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                d = V[p] * nu
                if "anchor" in st and group["eta_r"] > 0:
                    d = d + group["eta_r"] * st["fisher0"] * (p.float() - st["anchor"].float())
                if group["weight_decay"] > 0:
                    d = d + group["weight_decay"] * p.float()
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = d.clone()
                else:
                    st["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_((-group["lr"] * st["momentum_buffer"]).to(p.dtype))
        return loss


# ------------------------------------------------------------------------------------------------ the defense
def run_ngf(model: nn.Module, clean_loader: Any, steps: int = 300, lr: float = 0.01, *,
            layer: Optional[Union[str, nn.Module]] = None, curvature: str = "kfac", momentum: float = 0.9,
            weight_decay: float = 0.0, damping: Optional[float] = None, pi_split: bool = True, ema: float = 0.95,
            inv_every: int = 10, beta: float = 0.95, kl_clip: Optional[float] = 1e-3, eta_r: float = 1.0,
            fisher0: Optional[dict[Tensor, Tensor]] = None, fisher_batches: Optional[int] = None,
            lr_schedule: str = "cosine", batch_size: int = 128, seed: int = 0, device: Optional[torch.device] = None,
            loss_fn: Optional[LossFn] = None, impl: str = "auto", progress: bool = True,
            augment: Any = None, on_step: Optional[StepHook] = None) -> tuple[nn.Module, dict]:
    """Natural Gradient Fine-tuning of one layer with the Fisher anchor.

    Args:
        model: purified in place and returned in eval mode; only ``layer`` changes.
        clean_loader: ``(x, y)`` tensors (sampled with replacement) or an iterable of batches (cycled).
        steps, lr, momentum, weight_decay: of the natural-gradient SGD.
        layer: qualified name (``"classifier.3"``) or module; default the last Linear/Conv2d (the classifier).
        curvature: ``"kfac"`` or ``"diag"``.
        damping, pi_split, ema, inv_every: K-FAC (``damping`` is also λ of the diagonal version); default
            damping: 1.0 for ``"kfac"`` (with the π-split), 0.1 for ``"diag"`` (see "Defaults" in the module doc).
        beta: EMA of the diagonal Fisher.  kl_clip: step clipping (``None`` disables).
        eta_r: anchor weight (0 disables).  fisher0: precomputed ``{param: F0}`` for the layer's parameters;
            default ``estimate_fisher(model, clean batches, params=layer, normalize="max")`` (per-sample, eval mode).
        fisher_batches: cap on the clean batches used for F0.
        augment: augmentation of the fine-tuning batches (:func:`fip_fast.augment.make_augment`; None: none) —
            F0 is estimated on the unaugmented clean data.
        on_step: ``on_step(done, loss)`` after every step (:data:`fip_fast.baselines._common.StepHook`);
            :func:`fip_fast.pipeline.purify` evaluates the model there every ``eval_every`` steps.
    """
    from fip_fast.fisher import estimate_fisher

    check_common(steps, lr, lr_schedule)
    dev, loss_fn = setup_run(model, device, loss_fn)
    name, mod = find_layer(model, layer)
    if not isinstance(mod, (nn.Linear, nn.Conv2d)) and curvature == "kfac":
        raise NotImplementedError(f"K-FAC needs a Linear or Conv2d layer, {name!r} is {type(mod).__name__}")
    params = [p for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)) if p is not None]
    if not params:
        raise ValueError(f"layer {name!r} has no parameters")
    if damping is None:
        damping = DEFAULT_DAMPING[curvature]
    info: dict[str, Any] = {"method": "ngf", "layer": name, "curvature": curvature, "damping": damping}
    with Timer(dev) as timer:
        if eta_r > 0 and fisher0 is None:
            with only_trainable(model, params):
                batches = fixed_batches(clean_loader, batch_size, fisher_batches)
                fisher0 = estimate_fisher(model, batches, params=params, normalize="max", device=dev)
        kfac = KFAC([mod], ema=ema, damping=damping, pi_split=pi_split, inv_every=inv_every) \
            if curvature == "kfac" else None
        opt = NaturalGradient(params, lr=lr, momentum=momentum, weight_decay=weight_decay, curvature=curvature,
                              kfac=kfac, beta=beta, damping=damping, kl_clip=kl_clip, eta_r=eta_r,
                              fisher0=fisher0 if eta_r > 0 else None, impl=impl)
        stream = batch_stream(clean_loader, batch_size, seed, dev, augment=augment)
        lrs = LrSchedule(opt, lr_schedule, steps)
        nus, log = [], RunLog(steps, f"NGF-{curvature}", progress, on_step=on_step)
        try:
            with training(model, params, False):
                for t in range(steps):
                    x, y = next(stream)
                    lrs.at(t)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    opt.step()
                    nus.append(getattr(opt, "last_nu", 1.0))
                    log.record(t, loss)
        finally:
            log.close()
            if kfac is not None:
                kfac.remove()
    model.eval()
    info.update(run_info("ngf", steps, timer, params, log, opt.skipped_steps,
                         mean_kl_scale=float(sum(nus) / len(nus)) if nus else 1.0))
    return model, info
