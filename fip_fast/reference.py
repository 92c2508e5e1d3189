"""The specification of fip_fast in plain PyTorch: docs/method.md, read as code.

docs/method.md states the method (objective, suppressor estimators, Fast FIP, the optimizer step, the kernel
contracts, the measurements, and the choices made where the method is silent); the functions below are its
formulas, section by section.  Everything faster in this project — the ``foreach`` path, the C++ CPU kernels,
the Triton kernels, the CUDA extension — is tested against the functions in this file.  They are written for
clarity: plain loops over tensors, fp32 (or fp64) math, no fusion, no tricks.

Contents
--------
Objective and suppressors (functional, on a model):
    * :func:`fip_objective`          J(θ) = ℓ + η_F·T + (η_r/2)·Σ F0·(θ−θ0)²
    * :func:`trace_exact`            T = (1/B)·Σ_n ‖∇ℓ_n‖²        (per-sample, ``torch.func``)
    * :func:`trace_batch`            T = ‖∇ℓ‖²                     (batch-mean gradient)
    * :func:`suppressor_grad_fd`     2·H·ḡ ≈ (2‖ḡ‖/ρ)·(∇ℓ(θ+ρ·ḡ/‖ḡ‖) − ḡ)

Fisher (diagonal empirical Fisher, BatchNorm in eval mode):
    * :func:`fisher_per_sample_loop` the explicit per-sample loop — the slowest, most obviously right one.

Kernel-level ops (docs/method.md "Kernel contracts"), on lists of tensors, in place:
    * :func:`fisher_accumulate_`     F ← β·F + α·g²
    * :func:`global_norm`            ‖[g_1 … g_n]‖₂ (one number for the whole list) and the non-finite flag
    * :func:`perturb_`               θ ← θ + scale·g
    * :func:`fip_step_`              the whole optimizer step, one tensor at a time
    * :func:`spectral_weight`        W(δ) = U·diag(relu(S+δ))·Vh (+ frozen residual for rank-k)
    * :func:`spectral_linear_grad`   δ-gradient and per-sample squared δ-gradients of a spectral Linear layer
    * :func:`spectral_update_`       W ← W (or a base W0) + U·diag(s_new − s_old)·Vh, every layer, in place

Scalars that the fast paths keep on the device (``lr``, the mix coefficient ``c``, the restore / perturbation
scales, ``found_inf``, the step count) may be given here as Python numbers or 0-dim tensors.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Scalar = Union[float, int, Tensor]

__all__ = [
    "fip_objective",
    "trace_exact",
    "trace_batch",
    "suppressor_grad_fd",
    "fisher_per_sample_loop",
    "fisher_accumulate_",
    "global_norm",
    "perturb_",
    "fip_step_",
    "mix_coefficient",
    "spectral_weight",
    "spectral_linear_grad",
    "spectral_update_",
]


def _acc(t: Tensor) -> Tensor:
    """The accumulation dtype of the spec: fp32 for fp32/fp16/bf16 tensors; fp64 stays fp64 (for tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _f(x: Scalar) -> float:
    """A Python float from a number or a 0-dim tensor (the reference may sync; it is the slow path)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


# ----------------------------------------------------------------------------------------------------------
# Objective and suppressor estimators
# ----------------------------------------------------------------------------------------------------------

def _params_dict(model: nn.Module, params: Optional[Sequence[Tensor]] = None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        return {k: v for k, v in named.items() if v.requires_grad}
    ids = {id(p) for p in params}
    return {k: v for k, v in named.items() if id(v) in ids}


def trace_exact(model: nn.Module, x: Tensor, y: Tensor, params: Optional[Sequence[Tensor]] = None,
                loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
    """T = (1/B)·Σ_n ‖∇θ ℓ_n‖² with per-sample gradients from ``torch.func``, differentiable in θ.

    Args:
        model: evaluated with :func:`torch.func.functional_call`; BatchNorm in train mode would mix samples, so
            call this with the model in eval mode or without BatchNorm.
        x: inputs, shape (B, ...).  y: integer labels, shape (B,).
        params: which parameters the trace is taken over (default: all with ``requires_grad``).
        loss_fn: per-sample loss ``loss_fn(logits, labels)`` with mean reduction over its (single-sample) batch.
    Returns:
        0-dim tensor; ``.backward()`` through it gives ∇θ T (double backward).  Reference only: O(B·|θ|) memory.
    """
    from torch.func import functional_call, grad, vmap

    p = _params_dict(model, params)
    buffers = dict(model.named_buffers())

    def loss_one(pdict, xi, yi):
        out = functional_call(model, (pdict, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    # vmap over samples with the parameters as differentiable (non-batched) inputs: create_graph is implicit,
    # torch.func keeps the graph to the outer autograd parameters.
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(p, x, y)
    sq = sum(g.pow(2).flatten(1).sum(1) for g in per_sample.values())
    return sq.mean()


def trace_batch(model: nn.Module, x: Tensor, y: Tensor, params: Optional[Sequence[Tensor]] = None,
                loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
    """T = ‖∇θ ℓ‖² of the batch-mean loss, built with ``create_graph=True``; its gradient is 2·H·ḡ."""
    p = list(_params_dict(model, params).values())
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, p, create_graph=True)
    return sum(g.pow(2).sum() for g in grads)


def fip_objective(model: nn.Module, x: Tensor, y: Tensor, *, eta_F: float, eta_r: float,
                  theta0: dict[Tensor, Tensor] | None = None, fisher0: dict[Tensor, Tensor] | None = None,
                  trace: str = "batch", loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
    """J(θ) = ℓ(θ) + η_F·T(θ) + (η_r/2)·Σ_i F0_i·(θ_i − θ0_i)², differentiable (double backward for T).

    ``theta0`` and ``fisher0`` map parameter → tensor of its shape; parameters missing from ``fisher0`` have no
    anchor.  ``trace`` is ``"batch"`` or ``"exact"`` (the ``"fd"`` estimator has no closed-form objective: it is
    a gradient estimator, see :func:`suppressor_grad_fd`).
    """
    loss = loss_fn(model(x), y)
    J = loss
    if eta_F:
        T = {"batch": trace_batch, "exact": trace_exact}[trace](model, x, y, loss_fn=loss_fn)
        J = J + eta_F * T
    if eta_r and fisher0:
        reg = sum((fisher0[p] * (p - theta0[p]).pow(2)).sum() for p in fisher0)
        J = J + 0.5 * eta_r * reg
    return J


def suppressor_grad_fd(model: nn.Module, x: Tensor, y: Tensor, rho: float,
                       params: Optional[Sequence[Tensor]] = None,
                       loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[Tensor]:
    """Finite-difference estimate of ∇T = 2·H·ḡ: (2‖ḡ‖/ρ)·(∇ℓ(θ + ρ·ḡ/‖ḡ‖) − ḡ).

    One extra forward/backward, no double backward.  The parameters are restored exactly afterwards (a copy is
    kept; the optimizer's fused path instead restores as (θ+e)−e).  Returns one tensor per parameter.
    """
    p = list(_params_dict(model, params).values())
    g = torch.autograd.grad(loss_fn(model(x), y), p)
    gnorm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
    saved = [pi.detach().clone() for pi in p]
    with torch.no_grad():
        for pi, gi in zip(p, g):
            pi.add_(gi, alpha=rho / gnorm.item())
    g2 = torch.autograd.grad(loss_fn(model(x), y), p)
    with torch.no_grad():
        for pi, si in zip(p, saved):
            pi.copy_(si)
    return [(2 * gnorm / rho) * (b - a) for a, b in zip(g, g2)]


# ----------------------------------------------------------------------------------------------------------
# Fisher
# ----------------------------------------------------------------------------------------------------------

def fisher_per_sample_loop(model: nn.Module, x: Tensor, y: Tensor, params: Optional[Sequence[Tensor]] = None,
                           loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[Tensor]:
    """F_i = (1/N)·Σ_n (∂ log p(y_n|x_n)/∂θ_i)², one backward per sample, BatchNorm in eval mode.

    ``loss_fn`` is the negative log-likelihood (cross-entropy), whose square equals that of log p.
    """
    p = list(_params_dict(model, params).values())
    was_training = model.training
    model.eval()
    try:
        acc = [torch.zeros_like(pi) for pi in p]
        for n in range(x.shape[0]):
            g = torch.autograd.grad(loss_fn(model(x[n:n + 1]), y[n:n + 1]), p, allow_unused=True)
            for a, gi in zip(acc, g):
                if gi is not None:
                    a.add_(gi.pow(2))
        return [a / x.shape[0] for a in acc]
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Kernel-level ops: the contracts of docs/method.md, one tensor at a time
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], beta: Scalar, alpha: Scalar) -> None:
    """F ← β·F + α·g² for every pair (fp32 math; ``fisher`` is fp32 state, ``grads`` any float dtype)."""
    b, a = _f(beta), _f(alpha)
    for f, g in zip(fisher, grads):
        f.copy_(b * _acc(f) + a * _acc(g).pow(2))


@torch.no_grad()
def global_norm(tensors: Sequence[Optional[Tensor]]) -> tuple[Tensor, Tensor]:
    """(‖concat(tensors)‖₂ as a 0-dim fp32 tensor, found_inf as a 0-dim fp32 tensor (1.0 if any element is
    NaN/±Inf)).  ``None`` entries are skipped.  The norm is accumulated in fp32 as a sum of squares, so a
    gradient whose squared norm overflows fp32 (≳1.8e19) also counts as non-finite — such a step is skipped."""
    dev = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for t in tensors:
        if t is not None:
            sq = sq + _acc(t).pow(2).sum()
    norm = sq.sqrt()
    return norm, (~torch.isfinite(norm)).float()


@torch.no_grad()
def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], scale: Scalar,
             found_inf: Optional[Scalar] = None) -> None:
    """θ ← θ + scale·g for every pair (fp32 math, result cast to the parameter dtype).

    Nothing is written when ``found_inf`` is given and non-zero (a non-finite gradient must not move θ)."""
    if found_inf is not None and _f(found_inf) != 0.0:
        return
    s = _f(scale)
    for p, g in zip(params, grads):
        p.copy_(_acc(p) + s * _acc(g))


def mix_coefficient(eta_F: float, gnorm: Tensor, rho: float, max_mix: float) -> Tensor:
    """c = min(2·η_F·‖g‖/ρ, max_mix) — the weight of (g' − g) in a suppressor step (docs/method.md)."""
    return torch.clamp(2.0 * eta_F * gnorm / rho, max=max_mix)


@torch.no_grad()
def fip_step_(params: Sequence[Tensor], grads: Sequence[Tensor], grads_pert: Optional[Sequence[Tensor]],
              fisher0: Sequence[Optional[Tensor]], anchor: Sequence[Optional[Tensor]], momentum_buf: Sequence[Tensor],
              fisher: Sequence[Tensor], pert: Optional[Sequence[Tensor]], *, lr: Scalar, momentum: float,
              nesterov: bool, weight_decay: float, eta_r: float, beta: float, mix: Optional[Scalar],
              restore_scale: Optional[Scalar], precondition: bool, damping: float, step: Scalar,
              next_pert_scale: Optional[Scalar], found_inf: Optional[Scalar]) -> None:
    """One FIP optimizer step (docs/method.md "One optimizer step", "Closure-free suppressor"), in place.

    Per tensor i and element, in fp32 (``θ`` is read from and written to ``params[i]`` in its own dtype):

    1. restore the perturbation the gradients were taken at::

           lagged estimator:    θ ← θ − pert                      (if pert is not None; e stored as state)
           fd suppressor step:  θ ← θ − restore_scale·g           (else, if restore_scale is not None;
                                                                   e = ρ·g/‖g‖, restore_scale = ρ/‖g‖)

    2. direction::

           d = g + mix·(g' − g)      if grads_pert is given (fd suppressor step; mix = c)
           d = g                     otherwise
           d += η_r·F0·(θ − θ0)      where F0 is given for this tensor
           d += wd·θ

    3. Fisher EMA (every step, on g — the gradient at the unperturbed point for fd; p.grad for lagged)::

           fisher = β·fisher + (1 − β)·g²

    4. optional preconditioning: d = d / (fisher / (1 − β^t_i) + damping)   (1 − β^t_i in fp32; t_i is tensor
       i's own step count, so a parameter that received its first gradient late gets its own correction)
    5. momentum: buf = μ·buf + d;  u = d + μ·buf if nesterov else buf;  θ ← θ − lr·u
    6. lagged estimator (pert is not None): store the next perturbation, do **not** apply it::

           pert = next_pert_scale·g  (0 if next_pert_scale is None)

       The optimizer applies it (``perturb_(params, pert, 1.0)``) lazily, at the first training forward after the
       step, so that between steps the parameters always hold the unperturbed θ.

    If ``found_inf`` is given and non-zero nothing is written at all (parameters and every state tensor keep
    their bits).  ``mix`` is read only when ``grads_pert`` is given.

    Args:
        params: parameters (fp32/fp16/bf16), each of any shape.
        grads: g, same shapes.
        grads_pert: g' (gradient at θ+e) or ``None``.
        fisher0: F0 per tensor, or ``None`` for tensors without a CDA anchor.
        anchor: θ0 per tensor, or ``None`` where ``fisher0`` is ``None``.
        momentum_buf: fp32 momentum state, same shapes.
        fisher: fp32 squared-gradient EMA state, same shapes.
        pert: fp32 lagged-perturbation state, or ``None``.
        step: the step count t ≥ 1 used for the bias correction (already counting this step): one number or
            0-dim tensor for every tensor, or a sequence with one per tensor (``state["step"]`` of each parameter).
    """
    if found_inf is not None and _f(found_inf) != 0.0:
        return
    lr_ = _f(lr)
    steps = [_f(t) for t in step] if isinstance(step, (list, tuple)) else [_f(step)] * len(params)
    mix_ = _f(mix) if grads_pert is not None else 0.0
    rs = None if restore_scale is None else _f(restore_scale)
    nps = 0.0 if next_pert_scale is None else _f(next_pert_scale)
    for i, p in enumerate(params):
        g = _acc(grads[i])
        theta = _restore(_acc(p), g, None if pert is None else pert[i], rs)                               # 1.
        g_pert = None if grads_pert is None else _acc(grads_pert[i])
        d = _direction(g, g_pert, mix_, theta, fisher0[i], anchor[i], eta_r, weight_decay)              # 2.
        _fisher_ema_(fisher[i], g, beta)                                                                  # 3.
        if precondition:                                                                                  # 4.
            d = _precondition(d, fisher[i], beta, steps[i], damping)
        theta = theta - lr_ * _momentum_(momentum_buf[i], d, momentum, nesterov)                          # 5.
        if pert is not None:                                                                              # 6.
            pert[i].copy_(nps * g)      # stored, applied later by the optimizer
        p.copy_(theta)


# The steps of :func:`fip_step_` for one tensor, element-wise, in fp32 (``g``, ``theta`` already ``_acc``-ed).

def _restore(theta: Tensor, g: Tensor, pert: Optional[Tensor], restore_scale: Optional[float]) -> Tensor:
    """Step 1: the unperturbed θ — θ − pert (lagged estimator), else θ − restore_scale·g (fd suppressor step),
    else θ (no perturbation was applied)."""
    if pert is not None:
        return theta - pert
    if restore_scale is not None:
        return theta - restore_scale * g
    return theta


def _direction(g: Tensor, g_pert: Optional[Tensor], mix: float, theta: Tensor, fisher0: Optional[Tensor],
               anchor: Optional[Tensor], eta_r: float, weight_decay: float) -> Tensor:
    """Step 2: d = g + mix·(g' − g) (or g without g'), + η_r·F0·(θ − θ0) where F0 is given, + wd·θ."""
    d = g if g_pert is None else g + mix * (g_pert - g)
    if fisher0 is not None and eta_r != 0.0:
        d = d + eta_r * _acc(fisher0) * (theta - _acc(anchor))
    if weight_decay != 0.0:
        d = d + weight_decay * theta
    return d


def _fisher_ema_(fisher: Tensor, g: Tensor, beta: float) -> None:
    """Step 3, in place: fisher = β·fisher + (1 − β)·g²."""
    fisher.copy_(beta * fisher + (1.0 - beta) * g * g)


def _precondition(d: Tensor, fisher: Tensor, beta: float, step: float, damping: float) -> Tensor:
    """Step 4: d / (fisher / (1 − β^t) + damping); the bias correction 1 − β^t is an fp32 number, as every fast
    path computes it."""
    bc = 1.0 - torch.tensor(beta, dtype=torch.float32) ** torch.tensor(step, dtype=torch.float32)
    return d / (fisher / bc + damping)


def _momentum_(buf: Tensor, d: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """Step 5, ``buf`` in place: buf = μ·buf + d; returns the update u = d + μ·buf (Nesterov) or buf."""
    buf.copy_(momentum * buf + d)
    return d + momentum * buf if nesterov else buf


# ----------------------------------------------------------------------------------------------------------
# Spectral ops (Fast FIP)
# ----------------------------------------------------------------------------------------------------------

def spectral_weight(U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor, residual: Optional[Tensor] = None,
                    relative: bool = False) -> Tensor:
    """W(δ) = U·diag(relu(s))·Vh (+ residual), with s = S + δ, or s = S·(1 + δ) when ``relative``.

    Shapes: U (m, r), S (r,), δ (r,), Vh (r, n), residual (m, n) or None → W (m, n) in U's dtype, math in
    fp32.  The rank-k form of docs/method.md is W − U_k·diag(S_k)·Vh_k + U_k·diag(relu(S_k+δ))·Vh_k; its first two
    terms are the frozen ``residual``.
    """
    s = _acc(S) * (1.0 + _acc(delta)) if relative else _acc(S) + _acc(delta)
    W = (_acc(U) * torch.relu(s)) @ _acc(Vh)
    if residual is not None:
        W = W + _acc(residual)
    return W.to(U.dtype)


def spectral_linear_grad(x: Tensor, grad_out: Tensor, U: Tensor, S: Tensor, delta: Tensor, Vh: Tensor,
                         relative: bool = False) -> tuple[Tensor, Tensor]:
    """δ-gradient of a spectral Linear layer y = x·W(δ)ᵀ (+ b) and the per-sample squared δ-gradients.

    With a = x·Vhᵀ (N, T, r) and b = grad_out·U (N, T, r) — T tokens per sample, T = 1 for 2-d inputs —
    ∂ℓ_n/∂s = Σ_t a ⊙ b, ∂s/∂δ = 1[s > 0] (times S when ``relative``).

    Args:
        x: (N, n) or (N, T, n) layer input.  grad_out: (N, m) or (N, T, m), ∂ℓ/∂y of the summed loss.
    Returns:
        (grad_delta (r,), per_sample_sq (N, r)) in fp32: grad_delta = Σ_n ∂ℓ_n/∂δ, per_sample_sq = (∂ℓ_n/∂δ)².
    """
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    a = _acc(x) @ _acc(Vh).t()
    b = _acc(grad_out) @ _acc(U)
    ds = (a * b).sum(1)                                           # (N, r)
    s = _acc(S) * (1.0 + _acc(delta)) if relative else _acc(S) + _acc(delta)
    jac = (s > 0).float() * (_acc(S) if relative else 1.0)
    per_sample = ds * jac
    return per_sample.sum(0), per_sample.pow(2)


@torch.no_grad()
def spectral_update_(weights: Sequence[Tensor], U: Sequence[Tensor], Vh: Sequence[Tensor], s_old: Sequence[Tensor],
                     s_new: Sequence[Tensor], base: Optional[Sequence[Tensor]] = None) -> None:
    """W ← B + U·diag(s_new − s_old)·Vh for every layer i, in place (docs/method.md "In place"), B = base[i] or W.

    Shapes: ``weights[i]`` (m, n) — the layer's weight as a matrix, possibly a view —, ``U[i]`` (m, k),
    ``Vh[i]`` (k, n), ``s_old[i]``, ``s_new[i]`` (k,); ``base[i]`` like ``weights[i]``.  fp32 math (fp64 stays
    fp64), one rounding to the weight dtype.  Fast FIP passes B = W0, s_old = S, s_new = relu(s(δ)): the weight is
    re-derived from W0 on every update, so it never drifts, whatever the number of steps.
    """
    for i, W in enumerate(weights):
        B = W if base is None else base[i]
        dW = (_acc(U[i]) * (_acc(s_new[i]) - _acc(s_old[i]))) @ _acc(Vh[i])
        W.copy_(_acc(B) + dW)
