"""Diagonal empirical Fisher F0 at the current weights (the CDA anchor of FIP).

F_i = (1/N)·Σ_n (∂ log p(y_n | x_n) / ∂θ_i)²  over the N samples of a clean loader.

Estimators:

``"per_sample"`` (exact)
    * ``nn.Linear`` (and Fast FIP's spectral Linear δ): per-sample gradients come from the layer's input x and
      output gradient g_out captured by hooks in one ordinary backward — for 2-d inputs (g_out²)ᵀ·(x²) as
      BackPACK does; with a token dimension the per-sample gradient Σ_t g_t·x_tᵀ is formed first; for spectral
      δ the squared δ-gradients come from (x·Vhᵀ) ⊙ (g_out·U) (:func:`fip_fast.ops.spectral_linear_grad`).
    * every other parameter: per-sample gradients with ``torch.func`` (vmap over the batch), in chunks of
      ``chunk_size`` samples to bound memory.
``"batch"``
    Mean over mini-batches of the squared *mini-batch-mean* gradient.  Cheaper (one backward per batch, no
    per-sample work) but biased low: the square of a mean of B gradients is about 1/B of the mean of their
    squares where per-sample gradients are uncorrelated.  Use it only as a relative weighting (normalized).

The model is put in eval mode during estimation (BatchNorm uses its running statistics, dropout is off — the
Fisher of the deployed model), and its train/eval flags are restored afterwards.  Under an initialized
``torch.distributed`` process group the sums and sample counts are all-reduced, so every rank returns the Fisher
of the union of their data.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from ._utils import split_batch

__all__ = ["estimate_fisher", "normalize_fisher", "nll_per_sample"]


def nll_per_sample(output: Tensor, target: Tensor) -> Tensor:
    """−log p(y_n | x_n) per sample, shape (N,).  For (N, T, V) outputs the token losses of a sample are summed
    (the log-likelihood of the sequence); targets equal to −100 are ignored."""
    if output.dim() == 3:
        tok = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100)
        return tok.view(target.shape).sum(1)
    return F.cross_entropy(output, target, reduction="none")


def _train_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


class _LinearCapture:
    """Hooks on Linear-like layers that accumulate per-sample squared gradients during an ordinary backward.

    A forward hook stores the layer input and hangs a tensor hook on the output to receive ∂ℓ/∂y.  (Module
    *backward* hooks would wrap the inputs in an autograd.Function that ``torch.func`` can't transform; these
    hooks fire only while :attr:`active`, so the vmap pass of the other parameters sees a plain model.)
    """

    def __init__(self, layers: list[tuple[nn.Module, str]], out: dict[Tensor, Tensor]):
        self.out = out
        self.active = False
        self.kind = dict(layers)
        self.handles = [layer.register_forward_hook(self._fwd) for layer, _ in layers]

    def _fwd(self, module, inp, out):
        if self.active and out.requires_grad:
            x = inp[0].detach()
            out.register_hook(lambda g, m=module, x=x: self._accumulate(m, x, g.detach()))

    def _accumulate(self, module: nn.Module, x: Tensor, g: Tensor) -> None:
        kind = self.kind[module]
        if x.dim() > 3:
            x, g = x.flatten(1, -2), g.flatten(1, -2)
        bias = module.bias if kind == "linear" else module.base.bias
        if bias is not None and bias in self.out:
            gb = g if g.dim() == 2 else g.sum(1)
            self.out[bias] += gb.float().pow(2).sum(0)
        if kind == "linear":
            w = module.weight
            if w not in self.out:
                return
            if x.dim() == 2:          # (g_out²)ᵀ·(x²): Σ_n (g_n x_nᵀ)² without forming per-sample gradients
                self.out[w] += g.float().pow(2).t() @ x.float().pow(2)
            else:                     # tokens: the per-sample gradient is Σ_t g_t x_tᵀ, square after summing
                self.out[w] += torch.einsum("ntm,ntk->nmk", g.float(), x.float()).pow(2).sum(0)
        elif module.delta in self.out:  # spectral Linear: (x·Vhᵀ) ⊙ (g_out·U) summed over tokens
            _, sq = ops.spectral_linear_grad(x, g, module.U, module.S, module.delta, module.Vh,
                                             module.relative, impl=module.impl)
            self.out[module.delta] += sq.sum(0)

    def remove(self):
        for h in self.handles:
            h.remove()


def _linear_layers(model: nn.Module, wanted: set[int]) -> tuple[list[tuple[nn.Module, str]], set[int]]:
    """Layers whose per-sample squared gradients the hooks compute, and the ids of the parameters covered."""
    from .spectral import SpectralLayer

    layers, covered = [], set()
    for m in model.modules():
        if type(m) is nn.Linear and id(getattr(m, "weight", None)) in wanted:   # a spectral base has none
            layers.append((m, "linear"))
            covered.add(id(m.weight))
            if m.bias is not None:
                covered.add(id(m.bias))
        elif isinstance(m, SpectralLayer) and m.adapter.linear_like and id(m.delta) in wanted:
            layers.append((m, "spectral"))
            covered.add(id(m.delta))
            if getattr(m.base, "bias", None) is not None:
                covered.add(id(m.base.bias))
    # A bias is covered only if its layer is hooked *and* the bias itself is wanted.
    return layers, covered & wanted


def _per_sample_funcs(model: nn.Module, names: list[str], loss_fn: Callable, x: Tensor, y: Tensor,
                      chunk_size: int) -> list[Tensor]:
    """Σ_n (∂ℓ_n/∂θ)² for the named parameters with torch.func, ``chunk_size`` samples at a time."""
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    diff = {n: params[n].detach() for n in names}
    const = {n: p.detach() for n, p in params.items() if n not in diff}
    buffers = dict(model.named_buffers())

    def loss_one(d, xi, yi):
        out = functional_call(model, ({**d, **const}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    g_fn = vmap(grad(loss_one), in_dims=(None, 0, 0))
    acc = [torch.zeros_like(diff[n], dtype=torch.float32) for n in names]
    for s in range(0, x.shape[0], chunk_size):
        gs = g_fn(diff, x[s:s + chunk_size], y[s:s + chunk_size])
        for a, n in zip(acc, names):
            a += gs[n].float().pow(2).sum(0)
    return acc


def normalize_fisher(fisher: dict[Tensor, Tensor], how: Union[bool, str] = "max") -> dict[Tensor, Tensor]:
    """Scale all entries by one global number: their maximum (``"max"`` / ``True``) or mean (``"mean"``).

    Raw Fisher magnitudes vary by orders of magnitude between models; after ``"max"`` normalization F0 ∈ [0, 1]
    and η_r ≈ 1 behaves the same across models (METHOD.md "Stability").
    """
    if how is False or how is None:
        return fisher
    how = "max" if how is True else how
    vals = [f for f in fisher.values() if f.numel()]
    if not vals:
        return fisher
    if how == "max":
        scale = torch.stack([f.max() for f in vals]).max()
    elif how == "mean":
        scale = sum(f.sum() for f in vals) / sum(f.numel() for f in vals)
    else:
        raise ValueError(f"normalize must be False, True, 'max' or 'mean', got {how!r}")
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    return {p: f / scale for p, f in fisher.items()}


def estimate_fisher(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                    params: Optional[Sequence[Tensor]] = None, estimator: str = "per_sample",
                    max_batches: Optional[int] = None, normalize: Union[bool, str] = False, *,
                    chunk_size: int = 64, device: Optional[torch.device] = None,
                    progress: bool = False) -> dict[Tensor, Tensor]:
    """Diagonal empirical Fisher at the current weights.

    Args:
        model: the model (its train/eval flags are restored afterwards).
        loader: iterable of ``(x, y)`` batches (tuples/lists, or dicts with ``input_ids``/``labels``).
        loss_fn: per-sample negative log-likelihood ``loss_fn(output, target) -> (N,)``; default
            :func:`nll_per_sample` (cross-entropy; token losses summed per sequence).
        params: parameters to estimate (default: all with ``requires_grad``).
        estimator: ``"per_sample"`` (exact) or ``"batch"`` (biased low, see module docstring).
        max_batches: stop after this many batches.
        normalize: ``False``, ``"max"`` (``True``) or ``"mean"`` — see :func:`normalize_fisher`.
        chunk_size: samples per ``torch.func`` vmap chunk (memory bound of the generic per-sample path).
        device: move batches here (default: the device of the first parameter).
        progress: show a progress bar.
    Returns:
        ``{parameter: F}`` with F fp32 of the parameter's shape.
    """
    if estimator not in ("per_sample", "batch"):
        raise ValueError(f"estimator must be 'per_sample' or 'batch', got {estimator!r}")
    loss_fn = loss_fn or nll_per_sample
    named = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if params is None else True)]
    if params is not None:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in named if id(p) in ids]
        if len(named) != len(ids):
            raise ValueError("params contains tensors that are not parameters of model")
    if not named:
        raise ValueError("no parameters to estimate the Fisher of")
    plist = [p for _, p in named]
    device = device or plist[0].device
    out = {p: torch.zeros_like(p, dtype=torch.float32) for p in plist}
    flags = _train_flags(model)
    req = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    n_seen = torch.zeros((), dtype=torch.float64, device=device)
    capture = None
    try:
        wanted = {id(p) for p in plist}
        if estimator == "per_sample":
            layers, covered = _linear_layers(model, wanted)
            capture = _LinearCapture(layers, out)
            func_names = [n for n, p in named if id(p) not in covered]
            # Gradients are needed only where the hooks or autograd.grad look.
            for p, _ in req:
                p.requires_grad_(id(p) in covered)
        it = loader if not progress else tqdm(loader, desc=f"Fisher ({estimator})", leave=False)
        for b, batch in enumerate(it):
            if max_batches is not None and b >= max_batches:
                break
            x, y = split_batch(batch)
            x, y = x.to(device), y.to(device)
            n_seen += x.shape[0]
            if estimator == "batch":
                with torch.enable_grad():
                    loss = loss_fn(model(x), y).mean()
                    gs = torch.autograd.grad(loss, plist, allow_unused=True)
                for p, g in zip(plist, gs):
                    if g is not None:
                        out[p] += x.shape[0] * g.float().pow(2)
                continue
            if capture.handles:
                capture.active = True
                try:
                    with torch.enable_grad():
                        loss = loss_fn(model(x), y).sum()
                        if loss.requires_grad:   # fires the hooks; autograd.grad leaves users' .grad untouched
                            torch.autograd.grad(loss, [p for p in plist if id(p) in covered])
                finally:
                    capture.active = False
            if func_names:
                with torch.enable_grad():
                    sq = _per_sample_funcs(model, func_names, loss_fn, x, y, chunk_size)
                for n, s in zip(func_names, sq):
                    out[dict(named)[n]] += s
    finally:
        if capture is not None:
            capture.remove()
        for p, r in req:
            p.requires_grad_(r)
        for m, t in flags:
            m.train(t)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        for f in out.values():
            dist.all_reduce(f)
        dist.all_reduce(n_seen)
    if n_seen.item() == 0:
        raise ValueError("the loader yielded no samples")
    fisher = {p: f / n_seen.to(torch.float32) for p, f in out.items()}
    return normalize_fisher(fisher, normalize)
