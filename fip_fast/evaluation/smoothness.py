"""Smoothness of the loss surface at a model's weights (docs/method.md, "Measuring purification").

FIP's premise is that a backdoored model sits in a sharper minimum than a benign one; these estimators measure
that, on one fixed clean batch ``(x, y)``, with the model in eval mode (BatchNorm uses its running statistics,
so the loss is a deterministic function of the weights), over the trainable parameters (``requires_grad``):

* :func:`hessian_max_eigenvalue` — λ_max of the Hessian of the mean loss by power iteration on exact
  Hessian-vector products (double backward).
* :func:`hessian_trace` — Tr(H) by Hutchinson's estimator with Rademacher probes.
* :func:`fisher_trace` — Tr(F) of the empirical Fisher, (1/B)·Σ_n ‖∇θ ℓ_n‖², from per-sample gradients.
* :func:`sharpness` — all three in a dict.

Each module's train/eval flag is restored afterwards.  Random probes come from a private ``torch.Generator``
seeded by ``seed`` (the global RNG is not touched), so results are reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast.evaluation.metrics import eval_mode

__all__ = ["hessian_vector_product", "hessian_max_eigenvalue", "hessian_trace", "fisher_trace", "sharpness"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _trainable(model: nn.Module, params: Optional[Sequence[Tensor]]) -> List[Tensor]:
    ps = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not ps:
        raise ValueError("no trainable parameters (requires_grad=True) to measure")
    return ps


def _batch_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Optional[LossFn]) -> Tensor:
    out = model(x)
    return F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, y)


def _rademacher(shape, dtype, device, g: torch.Generator) -> Tensor:
    # Drawn on the CPU generator so that the probes do not depend on the device.
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((ai * bi).sum() for ai, bi in zip(a, b))


def _gradients_with_graph(model, x, y, loss_fn, params) -> List[Tensor]:
    loss = _batch_loss(model, x, y, loss_fn)
    return list(torch.autograd.grad(loss, params, create_graph=True))


def hessian_vector_product(grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> List[Tensor]:
    """``H·v`` by double backward, given ``grads`` = ∇ℓ built with ``create_graph=True``.

    The graph is retained so that one gradient serves many products (power iteration, Hutchinson).
    """
    hv = torch.autograd.grad(grads, params, grad_outputs=list(v), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]


def hessian_max_eigenvalue(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Sequence[Tensor]] = None,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top Hessian eigenvalue λ_max of the mean loss on ``(x, y)`` by power iteration.

    Starts from a Gaussian vector, then repeats ``v ← H·v / ‖H·v‖`` with the Rayleigh quotient ``λ = vᵀ·H·v``
    (‖v‖ = 1) as the estimate, and stops when ``|λ_t − λ_{t−1}| ≤ tol·|λ_t|`` or after ``iters`` products.
    Power iteration converges to the eigenvalue of largest *magnitude*; near a minimum that is the largest
    positive one (negative curvature there is small), which is the quantity the FIP paper reports.

    Args:
        x: a fixed batch ``(B, ...)``.  y: its labels ``(B,)`` (or targets for a custom ``loss_fn``).
        loss_fn: ``(output, y) → scalar``; default mean cross-entropy.
        params: the parameters to differentiate (default: every ``requires_grad`` parameter).
        iters: maximum number of Hessian-vector products.  tol: relative stopping tolerance.
    """
    ps = _trainable(model, params)
    g = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.enable_grad():
        grads = _gradients_with_graph(model, x, y, loss_fn, ps)
        v = [torch.randn(p.shape, generator=g).to(p) for p in ps]
        norm = torch.sqrt(_dot(v, v))
        v = [vi / norm for vi in v]
        lam_prev = None
        lam = torch.zeros(())
        for _ in range(max(1, iters)):
            hv = hessian_vector_product(grads, ps, v)
            lam = _dot(v, hv)
            norm = torch.sqrt(_dot(hv, hv))
            if norm == 0:  # H·v = 0: v lies in the null space, every eigenvalue seen is 0
                return 0.0
            v = [h / norm for h in hv]
            if lam_prev is not None and abs(float(lam) - lam_prev) <= tol * abs(float(lam)):
                break
            lam_prev = float(lam)
    return float(lam)


def _probe(params: Sequence[Tensor], g: torch.Generator) -> List[Tensor]:
    """One Rademacher probe: a ±1 tensor of each parameter's shape, drawn parameter after parameter from ``g``."""
    return [_rademacher(tuple(p.shape), p.dtype, p.device, g) for p in params]


def _quadratic_form(grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``vᵀ·H·v`` (a 0-d tensor on the parameters' device) by one plain double backward — PyHessian's product."""
    hv = torch.autograd.grad(grads, params, grad_outputs=list(v), retain_graph=True, allow_unused=True)
    q = torch.zeros((), dtype=v[0].dtype, device=v[0].device)
    for vi, h in zip(v, hv):
        if h is not None:              # a parameter the gradient does not depend on: a zero row of H
            q = q + (vi * h).sum()
    return q.detach()


def _batched_quadratic_forms(grads: Sequence[Tensor], params: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``v_kᵀ·H·v_k`` for a block of probes ``v[i]`` of shape ``(b, *params[i].shape)`` → ``(b,)``.

    One vmapped double backward (``is_grads_batched``) for the whole block; models that ``vmap`` cannot trace
    fall back to one product per probe (same probes, same result up to rounding).
    """
    b = v[0].shape[0]
    try:
        hv = torch.autograd.grad(grads, params, grad_outputs=list(v), retain_graph=True, allow_unused=True,
                                 is_grads_batched=True)
        hv = [torch.zeros_like(vi) if h is None else h for h, vi in zip(hv, v)]
        return sum((vi * h).flatten(1).sum(1) for vi, h in zip(v, hv)).detach()
    except RuntimeError:
        return torch.stack([_quadratic_form(grads, params, [vi[k] for vi in v]) for k in range(b)])


def hessian_trace(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Sequence[Tensor]] = None,
    samples: int = 100,
    seed: int = 0,
    batch_size: int = 1,
) -> float:
    """Tr(H) of the mean loss on ``(x, y)`` by Hutchinson's estimator, ``mean_k v_kᵀ·H·v_k``, Rademacher ``v_k``.

    Unbiased; its standard error falls as 1/√samples (for a diagonal H the estimate is exact with any number of
    samples, since v_i² = 1).  ``samples`` is the number of Hessian-vector products, each a double backward through
    one gradient graph built once (PyHessian's algorithm; the same cost per probe).  The probes depend only on
    ``seed`` and ``samples``: ``batch_size`` changes the result by rounding only.

    ``batch_size > 1`` computes that many products at a time with one vmapped double backward (memory:
    ``batch_size`` copies of the parameters and of the activations' tangents).  That pays where a product is a
    few small ops (a tiny MLP: ~5× faster per probe on one CPU thread) but not where it is compute-bound: on a
    conv net on the CPU the vmapped convolution double backward runs one convolution per probe anyway, plus a
    concatenation, and the batched elementwise ops leave the cache — 1.5× *slower* per probe at 16 (see
    ``docs/peers.md``).  Hence the default of 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ps = _trainable(model, params)
    g = torch.Generator().manual_seed(seed)
    samples = max(1, samples)
    total = torch.zeros((), dtype=torch.float64, device=ps[0].device)   # summed on the device: no sync per probe
    with eval_mode(model), torch.enable_grad():
        grads = _gradients_with_graph(model, x, y, loss_fn, ps)
        for start in range(0, samples, batch_size):
            probes = [_probe(ps, g) for _ in range(min(batch_size, samples - start))]
            if len(probes) == 1:
                total += _quadratic_form(grads, ps, probes[0]).double()
            else:
                v = [torch.stack(vs) for vs in zip(*probes)]
                total += _batched_quadratic_forms(grads, ps, v).double().sum()
    return float(total) / samples


def _per_sample_sq_norms_func(model, x, y, loss_fn, ps, chunk_size) -> Tensor:
    """‖∇θ ℓ_n‖² for every sample, with ``torch.func.vmap(grad(...))`` in chunks of ``chunk_size`` samples."""
    from torch.func import functional_call, grad, vmap

    by_id = {id(p) for p in ps}
    names = [n for n, p in model.named_parameters() if id(p) in by_id]
    if len(names) != len(ps):
        raise ValueError("params must be parameters registered in the model")
    trained = {n: p.detach() for n, p in model.named_parameters() if id(p) in by_id}
    frozen = {n: p.detach() for n, p in model.named_parameters() if id(p) not in by_id}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(tp, xn, yn):
        out = functional_call(model, {**tp, **frozen}, (xn.unsqueeze(0),))
        yb = yn.unsqueeze(0)
        return F.cross_entropy(out, yb) if loss_fn is None else loss_fn(out, yb)

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    out = []
    for i in range(0, x.shape[0], chunk_size):
        gs = per_sample(trained, x[i:i + chunk_size], y[i:i + chunk_size])
        out.append(sum(gi.flatten(1).pow(2).sum(1) for gi in gs.values()))
    return torch.cat(out)


def _per_sample_sq_norms_loop(model, x, y, loss_fn, ps) -> Tensor:
    """The same by one backward pass per sample — slow, but works for any model."""
    out = []
    for n in range(x.shape[0]):
        loss = _batch_loss(model, x[n:n + 1], y[n:n + 1], loss_fn)
        gs = torch.autograd.grad(loss, ps, allow_unused=True)
        out.append(sum(gi.pow(2).sum() for gi in gs if gi is not None).detach())
    return torch.stack(out)


def fisher_trace(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Sequence[Tensor]] = None,
    chunk_size: int = 64,
    method: str = "auto",
) -> float:
    """Tr(F) of the empirical Fisher on ``(x, y)``: ``(1/B)·Σ_n ‖∇θ ℓ_n‖²`` with ``ℓ_n = −log p(y_n | x_n)``.

    Uses the labels ``y`` (empirical, not true, Fisher) — the same quantity as the ``exact`` suppressor T(θ).

    Args:
        method: ``"func"`` (``torch.func`` per-sample gradients, chunks of ``chunk_size``), ``"loop"`` (one
            backward per sample) or ``"auto"`` (``func``, falling back to ``loop`` for models ``vmap`` cannot
            trace).
    """
    if method not in ("auto", "func", "loop"):
        raise ValueError(f"method must be 'auto', 'func' or 'loop', got {method!r}")
    ps = _trainable(model, params)
    with eval_mode(model), torch.enable_grad():
        sq = None
        if method in ("auto", "func"):
            try:
                sq = _per_sample_sq_norms_func(model, x, y, loss_fn, ps, chunk_size)
            except Exception:
                if method == "func":
                    raise
        if sq is None:
            sq = _per_sample_sq_norms_loop(model, x, y, loss_fn, ps)
    return float(sq.mean())


def sharpness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Optional[LossFn] = None,
    params: Optional[Sequence[Tensor]] = None,
    iters: int = 100,
    tol: float = 1e-4,
    samples: int = 100,
    seed: int = 0,
) -> Dict[str, float]:
    """``{"lambda_max", "trace_h", "trace_f", "loss"}`` on the batch ``(x, y)`` (see the functions above)."""
    with eval_mode(model), torch.no_grad():
        loss = float(_batch_loss(model, x, y, loss_fn))
    return {
        "lambda_max": hessian_max_eigenvalue(model, x, y, loss_fn=loss_fn, params=params, iters=iters, tol=tol,
                                             seed=seed),
        "trace_h": hessian_trace(model, x, y, loss_fn=loss_fn, params=params, samples=samples, seed=seed),
        "trace_f": fisher_trace(model, x, y, loss_fn=loss_fn, params=params),
        "loss": loss if math.isfinite(loss) else float("nan"),
    }
