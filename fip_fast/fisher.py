"""Diagonal empirical Fisher F0 at the current weights (the CDA anchor of FIP).

F_i = (1/N)·Σ_n (∂ log p(y_n | x_n) / ∂θ_i)²  over the N samples of a clean loader.

Estimators:

``"per_sample"`` (exact)
    * ``nn.Linear`` (and Fast FIP's spectral Linear δ): per-sample gradients come from the layer's input x and
      output gradient g_out captured by hooks in one ordinary backward — for one call with 2-d input
      (g_out²)ᵀ·(x²) as BackPACK does, no per-sample gradient formed; otherwise the per-sample gradient
      Σ_t g_t·x_tᵀ is formed (in chunks of samples); for spectral δ the δ-gradients come from
      (x·Vhᵀ) ⊙ (g_out·U) (:func:`fip_fast.ops.spectral_linear_grad`); a bias gets Σ_t g_t.
    * in the same hooked backward (:mod:`fip_fast._fisher_rules`), with per-sample gradients formed in chunks
      of samples: ``nn.Conv1d`` / ``nn.Conv2d`` with zero padding (any stride, dilation, groups, ``"same"``):
      g_out (N, C_out, L) times the im2col columns unfold(x) (N, C_in·K, L) per sample and group, as BackPACK
      and Opacus do, bias Σ_L g_out; ``nn.Embedding`` (no ``max_norm`` / ``scale_grad_by_freq`` / ``sparse``):
      the rows of g_out index-added per (sample, token id) over the pairs present, never (N, V, D), tokens at
      ``padding_idx`` left out; ``nn.BatchNorm*`` with running statistics (the model is in eval mode),
      ``nn.LayerNorm``, ``nn.GroupNorm``: weight Σ_positions g_out ⊙ x̂, bias Σ_positions g_out (x̂ the
      normalized input).  Exact module types only (a subclass may change ``forward``).
    * the δ of Fast FIP's in-place spectral layers (:mod:`fip_fast.spectral`: the modules with a
      ``spectral_delta``): the layers' output taps hand out the per-sample δ-gradients of every call during the
      ordinary backward (:func:`fip_fast.spectral.collect_per_sample`); a δ's calls are summed per sample (a
      layer applied twice, a weight tied between an embedding and an LM head) and squared only then.  A guard
      checks that every call ran on batch-first rows and that the per-sample gradients sum to autograd's batch
      gradient; where not, it warns once and that δ is estimated with one backward per sample from then on
      (``torch.func`` cannot see these δ: the taps act on the module's own parameter).
    * every parameter no rule covers: per-sample gradients with ``torch.func`` (vmap over the batch), in chunks of
      ``chunk_size`` samples to bound memory.  The in-place spectral layers run there as ordinary layers with
      their current weights (their δ does not require grad inside the functional call, so no tap acts).

    Shared and tied layers.  A layer applied several times in one forward (weight sharing, a recurrent block,
    two ``nn.Linear`` holding one weight) has as per-sample gradient the *sum* of its calls' contributions: the
    hooks collect every call of the batch (keyed by parameter), add the contributions per sample and square
    only then, once all its calls have reported or after the batch's backward.  A parameter is left to the hooks
    only if every module that holds it is a hooked layer: a weight tied between an ``nn.Embedding`` and a Linear
    head (as in LMs) goes to ``torch.func``, which sees both uses.  A guard checks, per parameter and batch,
    that the hooks' per-sample gradients sum to the batch gradient autograd computed (for weights on a fixed
    random probe vector; relative tolerance 1e-4 in fp32 / fp64, 16·eps for fp16/bf16 or TF32 matmuls) and that
    every call ran on batch-first input; where not — a weight used outside its layer's forward
    (``F.linear(x, fc.weight)``), a Linear on flattened (N·T, k) tokens — it logs a warning once naming the
    parameter and estimates that parameter with ``torch.func`` from then on, the current batch included.
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

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fip_fast._fisher_capture import _acc_dtype, _guard_rtol, _HookCapture, _hooked_layers
from fip_fast._utils import split_batch

__all__ = ["estimate_fisher", "nll_per_sample", "normalize_fisher"]

logger = logging.getLogger("fip_fast")


def nll_per_sample(output: Tensor, target: Tensor) -> Tensor:
    """−log p(y_n | x_n) per sample, shape (N,).  For (N, T, V) outputs the token losses of a sample are summed
    (the log-likelihood of the sequence); targets equal to −100 are ignored."""
    if output.dim() == 3:
        tok = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100)
        return tok.view(target.shape).sum(1)
    return F.cross_entropy(output, target, reduction="none")


def _train_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


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


def _delta_sq(calls: list[Tensor], g: Tensor | None, delta: Tensor, n: int) -> tuple[Tensor | None, str]:
    """Σ_n (Σ_calls ∂ℓ_n/∂δ)² from the taps' per-call (N, k) per-sample δ-gradients, or ``None`` and why not
    where the guard fails (a call on rows that are not the batch's samples; Σ_n ≠ autograd's batch gradient)."""
    for c in calls:
        if c.dim() != 2 or c.shape[0] != n:
            return None, (f"a layer using it ran on {c.shape[0]} rows per call, not the batch's {n} samples "
                          "(flattened tokens?)")
    dt = _acc_dtype(calls[0]) if calls else torch.float32
    per = torch.zeros(n, delta.numel(), dtype=dt, device=delta.device)
    for c in calls:
        per += c.to(per.device, dt)
    s = per.sum(0)
    g = torch.zeros_like(s) if g is None else g.detach().reshape(-1).to(s.device, dt)
    rtol = _guard_rtol({delta.dtype} | {c.dtype for c in calls})
    diff = (s - g).norm()
    if not bool((diff <= rtol * (g.norm() + per.norm())) | ~torch.isfinite(diff)):
        return None, ("its layers' per-sample δ-gradients do not sum to its batch gradient (is the model a copy "
                      "of the reparameterized one, or a weight used outside its layers' forward?)")
    return per.pow(2).sum(0).reshape(delta.shape), ""


def _per_sample_loop(model: nn.Module, params: list[Tensor], loss_fn: Callable, x: Tensor, y: Tensor
                     ) -> list[Tensor]:
    """Σ_n (∂ℓ_n/∂θ)², one backward per sample (the fallback for in-place δ's that fail the guard)."""
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(x.shape[0]):
        with torch.enable_grad():
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum()
            gs = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(acc)
        for a, g in zip(acc, gs):
            if g is not None:
                a += g.float().pow(2)
    return acc


def normalize_fisher(fisher: dict[Tensor, Tensor], how: bool | str = "max") -> dict[Tensor, Tensor]:
    """Scale all entries by one global number: their maximum (``"max"`` / ``True``) or mean (``"mean"``).

    Raw Fisher magnitudes vary by orders of magnitude between models; after ``"max"`` normalization F0 ∈ [0, 1]
    and η_r ≈ 1 behaves the same across models (docs/method.md "Stability").
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


def _select_params(model: nn.Module, params: Sequence[Tensor] | None) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs to estimate, in ``model.named_parameters()`` order: ``params`` (each must be a
    parameter of ``model``) or every parameter with ``requires_grad``."""
    named = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if params is None else True)]
    if params is not None:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in named if id(p) in ids]
        if len(named) != len(ids):
            raise ValueError("params contains tensors that are not parameters of model")
    if not named:
        raise ValueError("no parameters to estimate the Fisher of")
    return named


def _add_batch_estimate(model: nn.Module, plist: list[Tensor], loss_fn: Callable, x: Tensor, y: Tensor,
                        out: dict[Tensor, Tensor]) -> None:
    """The ``"batch"`` estimator: add N·(∂ mean_n ℓ_n / ∂θ)² of one batch of N samples to ``out``."""
    with torch.enable_grad():
        loss = loss_fn(model(x), y).mean()
        gs = torch.autograd.grad(loss, plist, allow_unused=True)
    for p, g in zip(plist, gs):
        if g is not None:
            out[p] += x.shape[0] * g.float().pow(2)


class _ExactEstimator:
    """The ``"per_sample"`` estimator: each parameter goes to one path that forms its per-sample squares.

    * the hooks of Linear / spectral-δ / conv / embedding / norm layers (:class:`_HookCapture`) for the
      parameters :func:`_hooked_layers` covers;
    * the output taps of Fast FIP's in-place spectral layers for their δ, or one backward per sample for a δ
      that failed the taps' guard (:attr:`dfailed`);
    * ``torch.func`` for everything else, and for what failed the hooks' guard (``capture.failed``).

    The hooks stay on the model until :meth:`remove`.
    """

    def __init__(self, model: nn.Module, named: list[tuple[str, Tensor]], loss_fn: Callable, chunk_size: int):
        self.model, self.named, self.loss_fn, self.chunk_size = model, named, loss_fn, chunk_size
        self.plist = [p for _, p in named]
        self.wanted = {id(p) for p in self.plist}
        self.names = {id(p): n for n, p in named}
        # δ of the in-place spectral layers (fip_fast.spectral): per-sample gradients from their output taps
        self.inplace = {id(d) for _, m in model.named_modules()
                        if isinstance(d := getattr(m, "spectral_delta", None), Tensor)}
        self.spectral = None
        if self.inplace:
            from fip_fast import spectral
            self.spectral = spectral
        self.dlist = [p for p in self.plist if id(p) in self.inplace]
        self.dfailed: set[int] = set()       # in-place δ's handed to the one-backward-per-sample loop for good
        layers, self.covered = _hooked_layers(model, self.wanted - self.inplace)
        self.capture = _HookCapture(layers, self.covered, self.names)

    def needs_grad(self, p: Tensor) -> bool:
        """Whether ``p`` must require grad: gradients are needed only where the hooks, the taps or autograd.grad
        look."""
        return id(p) in self.covered or (id(p) in self.inplace and id(p) in self.wanted)

    def add(self, x: Tensor, y: Tensor, out: dict[Tensor, Tensor]) -> None:
        """Add Σ_n (∂ℓ_n/∂θ)² of one batch (N samples) to ``out`` (fp32, keyed by parameter)."""
        if self.spectral is not None:
            self.spectral.sync(self.model)   # weights current before any pass (the functional one included)
        dlive = [d for d in self.dlist if id(d) not in self.dfailed]
        if self.capture.live() or dlive:
            self._hooked_pass(x, y, dlive, out)
        dloop = [d for d in self.dlist if id(d) in self.dfailed]
        if dloop:
            for d, sq in zip(dloop, _per_sample_loop(self.model, dloop, self.loss_fn, x, y)):
                out[d] += sq
        failed = self.capture.failed
        func_names = [n for n, p in self.named
                      if id(p) not in self.inplace and (id(p) not in self.covered or id(p) in failed)]
        if func_names:
            with torch.enable_grad():
                sq = _per_sample_funcs(self.model, func_names, self.loss_fn, x, y, self.chunk_size)
            by_name = dict(self.named)
            for n, s in zip(func_names, sq):
                out[by_name[n]] += s

    def _hooked_pass(self, x: Tensor, y: Tensor, dlive: list[Tensor], out: dict[Tensor, Tensor]) -> None:
        """One ordinary backward of the summed loss, which fires the hooks and the taps; their guards hand what
        fails to torch.func (hooks) or to one backward per sample (taps, :attr:`dfailed`)."""
        capture = self.capture
        capture.active, capture.batch_size = True, x.shape[0]
        grads: dict[int, Tensor | None] = {}
        sinks: dict = {}
        collect = self.spectral.collect_per_sample(self.model) if dlive else contextlib.nullcontext(sinks)
        try:
            with torch.enable_grad(), collect as sinks:
                loss = self.loss_fn(self.model(x), y).sum()
                inputs = [p for p in self.plist if id(p) in self.covered and id(p) not in capture.failed] + dlive
                if loss.requires_grad and inputs:   # fires the hooks and taps; users' .grad untouched
                    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
                    grads = {id(p): g for p, g in zip(inputs, gs)}
        finally:
            capture.active = False
        capture.flush(grads, out)    # squares, and the guard: Σ_n g_n must equal the batch gradient
        for p in self.plist:         # parameters handed to torch.func need no autograd gradient
            if id(p) in capture.failed:
                p.requires_grad_(False)
        for d in dlive:              # in-place δ: Σ_n (Σ_calls per-sample δ-gradient)²
            sq, why = _delta_sq(sinks.get(d, []), grads.get(id(d)), d, x.shape[0])
            if sq is None:
                self.dfailed.add(id(d))
                logger.warning("fip_fast.estimate_fisher: %s: %s; its Fisher is computed with one backward "
                               "per sample instead (this batch included)", self.names[id(d)], why)
            else:
                out[d] += sq.to(out[d].device)

    def remove(self) -> None:
        """Take the hooks off the model."""
        self.capture.remove()


def _mean_over_samples(out: dict[Tensor, Tensor], n_seen: Tensor) -> dict[Tensor, Tensor]:
    """Σ_n / N: under an initialized ``torch.distributed`` process group the sums and the sample counts are
    all-reduced first, so every rank gets the Fisher of the union of their data."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        for f in out.values():
            dist.all_reduce(f)
        dist.all_reduce(n_seen)
    if n_seen.item() == 0:
        raise ValueError("the loader yielded no samples")
    return {p: f / n_seen.to(torch.float32) for p, f in out.items()}


def estimate_fisher(model: nn.Module, loader: Iterable, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                    params: Sequence[Tensor] | None = None, estimator: str = "per_sample",
                    max_batches: int | None = None, normalize: bool | str = False, *,
                    chunk_size: int = 64, device: torch.device | None = None,
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
    named = _select_params(model, params)
    plist = [p for _, p in named]
    device = device or plist[0].device
    out = {p: torch.zeros_like(p, dtype=torch.float32) for p in plist}
    flags = _train_flags(model)
    req = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    n_seen = torch.zeros((), dtype=torch.float64, device=device)
    exact = None
    try:
        if estimator == "per_sample":
            exact = _ExactEstimator(model, named, loss_fn, chunk_size)
            for p, _ in req:
                p.requires_grad_(exact.needs_grad(p))
        it = loader if not progress else tqdm(loader, desc=f"Fisher ({estimator})", leave=False)
        for b, batch in enumerate(it):
            if max_batches is not None and b >= max_batches:
                break
            x, y = split_batch(batch)
            x, y = x.to(device), y.to(device)
            n_seen += x.shape[0]
            if exact is None:
                _add_batch_estimate(model, plist, loss_fn, x, y, out)
            else:
                exact.add(x, y, out)
    finally:
        if exact is not None:
            exact.remove()
        for p, r in req:
            p.requires_grad_(r)
        for m, t in flags:
            m.train(t)
    return normalize_fisher(_mean_over_samples(out, n_seen), normalize)
