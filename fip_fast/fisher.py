"""Diagonal empirical Fisher F0 at the current weights (the CDA anchor of FIP).

F_i = (1/N)·Σ_n (∂ log p(y_n | x_n) / ∂θ_i)²  over the N samples of a clean loader.

Estimators:

``"per_sample"`` (exact)
    * ``nn.Linear`` (and Fast FIP's spectral Linear δ): per-sample gradients come from the layer's input x and
      output gradient g_out captured by hooks in one ordinary backward — for one call with 2-d input
      (g_out²)ᵀ·(x²) as BackPACK does, no per-sample gradient formed; otherwise the per-sample gradient
      Σ_t g_t·x_tᵀ is formed (in chunks of samples); for spectral δ the δ-gradients come from
      (x·Vhᵀ) ⊙ (g_out·U) (:func:`fip_fast.ops.spectral_linear_grad`); a bias gets Σ_t g_t.
    * the δ of Fast FIP's in-place spectral layers (:mod:`fip_fast.spectral`: the modules with a
      ``spectral_delta``): the layers' output taps hand out the per-sample δ-gradients of every call during the
      ordinary backward (:func:`fip_fast.spectral.collect_per_sample`); a δ's calls are summed per sample (a
      layer applied twice, a weight tied between an embedding and an LM head) and squared only then.  A guard
      checks that every call ran on batch-first rows and that the per-sample gradients sum to autograd's batch
      gradient; where not, it warns once and that δ is estimated with one backward per sample from then on
      (``torch.func`` cannot see these δ: the taps act on the module's own parameter).
    * every other parameter: per-sample gradients with ``torch.func`` (vmap over the batch), in chunks of
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

from fip_fast import ops
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


_CHUNK_ELEMS = 1 << 24   # per-sample weight-gradient elements formed at once by the exact summed form


def _acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 math, fp64 for fp64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def _guard_rtol(dtypes: set[torch.dtype]) -> float:
    """Relative tolerance of the guard for gradients computed in these dtypes: 1e-4, or 16·eps of the least
    precise (fp16/bf16 weights or activations; TF32 / bf16 fp32-matmuls when the matmul precision allows)."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    if torch.float32 in dtypes and torch.get_float32_matmul_precision() != "highest":
        eps = max(eps, 2.0 ** -10 if torch.get_float32_matmul_precision() == "high" else 2.0 ** -7)
    return max(1e-4, 16 * eps)


def _as_tokens(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


class _LinearCapture:
    """Hooks on Linear-like layers that compute per-sample squared gradients during an ordinary backward.

    A forward hook stores the layer input and hangs a tensor hook on the output to receive ∂ℓ/∂y.  (Module
    *backward* hooks would wrap the inputs in an autograd.Function that ``torch.func`` can't transform; these
    hooks fire only while :attr:`active`, so the vmap pass of the other parameters sees a plain model.)

    Everything is keyed by *parameter*, not by module: the forward hooks count the calls that use each covered
    parameter in this batch, the backward hooks collect every call's (x, g_out), and a parameter's per-sample
    gradients — the sum of its calls' contributions — are squared only once all its calls have reported (or at
    :meth:`flush`, after the batch's backward).  One call with 2-d input keeps the BackPACK form
    (g_out²)ᵀ·(x²), no per-sample gradient materialized.  The squares and Σ_n g_n (for weights projected on a
    probe vector) are kept per batch; :meth:`flush` adds the squares to the Fisher only where Σ_n g_n equals the
    gradient autograd computed, and otherwise hands the parameter to the exact ``torch.func`` path
    (:attr:`failed`).
    """

    def __init__(self, layers: list[tuple[nn.Module, str]], covered: dict[int, tuple[Tensor, str]],
                 names: dict[int, str]):
        self.kind = dict(layers)
        self.roles = {k: role for k, (_, role) in covered.items()}   # "weight" | "bias" | "delta"
        self.params = {k: p for k, (p, _) in covered.items()}
        self.names = names
        self.failed: set[int] = set()       # covered parameters handed to torch.func for good
        self.active = False
        self.batch_size: int | None = None
        self.expected: dict[int, int] = {}  # this batch: calls (in forward) that use the parameter
        self.records: dict[int, list[tuple[nn.Module, Tensor, Tensor]]] = {}
        self.sq: dict[int, Tensor] = {}     # this batch: Σ_n (∂ℓ_n/∂θ)²
        self.check: dict[int, tuple] = {}   # this batch, for the guard: (Σ_n ∂ℓ_n/∂θ, Σ_n ‖∂ℓ_n/∂θ‖², probe, rtol)
        self._probes: dict[tuple, Tensor] = {}
        self.handles = [layer.register_forward_hook(self._fwd) for layer, _ in layers]

    def live(self) -> bool:
        return any(k not in self.failed for k in self.roles)

    def _slots(self, module: nn.Module) -> list[Tensor]:
        if self.kind[module] == "linear":
            cand = (module.weight, module.bias)
        else:
            cand = (module.delta, getattr(module.base, "bias", None))
        return [p for p in cand if p is not None and id(p) in self.roles and id(p) not in self.failed]

    def fail(self, k: int, reason: str) -> None:
        """Hand parameter ``id`` k to the exact torch.func path, from this batch on (warns once)."""
        if k in self.failed:
            return
        self.failed.add(k)
        self.records.pop(k, None)
        self.sq.pop(k, None)
        self.check.pop(k, None)
        logger.warning("fip_fast.estimate_fisher: %s: %s; its Fisher is computed with the exact torch.func "
                       "per-sample path instead (this batch included)", self.names.get(k, "a parameter"), reason)

    def _fwd(self, module, inp, out):
        if not self.active or not isinstance(out, Tensor) or not out.requires_grad:
            return
        slots = self._slots(module)
        if not slots:
            return
        x = inp[0].detach()
        if x.dim() < 2 or x.shape[0] != self.batch_size or out.shape[0] != self.batch_size:
            for p in slots:
                self.fail(id(p), f"its layer ran on an input of shape {tuple(x.shape)} whose first dimension is not "
                             f"the batch ({self.batch_size} samples)")
            return
        x = x.flatten(1, -2) if x.dim() > 3 else x
        for p in slots:
            self.expected[id(p)] = self.expected.get(id(p), 0) + 1
        out.register_hook(lambda g, m=module, x=x, slots=slots: self._bwd(m, x, g, slots))

    def _bwd(self, module: nn.Module, x: Tensor, g: Tensor, slots: list[Tensor]) -> None:
        g = g.detach()
        g = g.flatten(1, -2) if g.dim() > 3 else g
        for p in slots:
            k = id(p)
            if k in self.failed:
                continue
            recs = self.records.setdefault(k, [])
            recs.append((module, x, g))
            if len(recs) >= self.expected.get(k, 0):   # every call of this batch has reported: square now
                self._process(k)

    def _process(self, k: int) -> None:
        recs = self.records.pop(k, None)
        if not recs:
            return
        role = self.roles[k]
        with torch.no_grad():
            if role == "weight":
                sq, check = self._weight(recs)
            else:
                sq, s = self._bias(recs) if role == "bias" else self._delta(recs)
                check = (s, sq.sum(), None)
        dtypes = {self.params[k].dtype} | {t.dtype for _, x, g in recs for t in (x, g)}
        if role == "delta":                   # autograd's δ-gradient goes through dW in the weight dtype
            dtypes |= {mod.U.dtype for mod, _, _ in recs}
        check = (*check, _guard_rtol(dtypes))
        if k in self.sq:   # more calls reported after it was squared (e.g. recomputed by checkpointing)
            self.fail(k, "its layer's calls reported after its per-sample gradients were squared")
            return
        self.sq[k], self.check[k] = sq, check

    def _probe(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A fixed random vector (its own generator: the user's RNG stream is not touched)."""
        key = (n, device, dtype)
        if key not in self._probes:
            gen = torch.Generator().manual_seed(n)
            self._probes[key] = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype)
        return self._probes[key]

    def _weight(self, recs) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Σ_n (∂ℓ_n/∂W)² and, for the guard, the per-sample gradients projected on a probe r: (Σ_n G_n·r,
        Σ_n ‖G_n·r‖², r) — O(N·(m+k)) instead of a second m×k batch gradient (Freivalds' check)."""
        dt = _acc_dtype(recs[0][1])
        r = self._probe(recs[0][1].shape[-1], recs[0][1].device, dt)
        if len(recs) == 1 and recs[0][1].dim() == 2:
            # (g_out²)ᵀ·(x²): Σ_n (g_n x_nᵀ)² without forming per-sample gradients
            _, x, g = recs[0]
            x, g = x.to(dt), g.to(dt)
            gr = g * (x @ r).unsqueeze(1)                            # (N, m): G_n·r
            return g.pow(2).t() @ x.pow(2), (gr.sum(0), gr.pow(2).sum(), r)
        # exact: per sample Σ_calls Σ_t g_t x_tᵀ — one bmm over the calls' tokens concatenated — squared after
        xs = [_as_tokens(x) for _, x, _ in recs]
        gs = [_as_tokens(g) for _, _, g in recs]
        n, m, k = xs[0].shape[0], gs[0].shape[-1], xs[0].shape[-1]
        sq = torch.zeros(m, k, dtype=dt, device=xs[0].device)
        s = torch.zeros(m, dtype=dt, device=xs[0].device)
        scale2 = torch.zeros((), dtype=dt, device=xs[0].device)
        step = max(1, _CHUNK_ELEMS // max(1, m * k))
        for a in range(0, n, step):
            xc = torch.cat([x[a:a + step] for x in xs], 1).to(dt)
            gc = torch.cat([g[a:a + step] for g in gs], 1).to(dt)
            G = gc.transpose(1, 2) @ xc                              # (chunk, m, k) per-sample gradients
            sq += G.pow(2).sum(0)
            Gr = G @ r
            s += Gr.sum(0)
            scale2 += Gr.pow(2).sum()
        return sq, (s, scale2, r)

    @staticmethod
    def _bias(recs) -> tuple[Tensor, Tensor]:
        dt = _acc_dtype(recs[0][2])
        gb = sum(_as_tokens(g).to(dt).sum(1) for _, _, g in recs)    # (N, m): Σ_calls Σ_t g_t
        return gb.pow(2).sum(0), gb.sum(0)

    @staticmethod
    def _delta(recs) -> tuple[Tensor, Tensor]:
        if len(recs) == 1:   # (x·Vhᵀ) ⊙ (g_out·U) summed over tokens, through the kernel dispatcher
            mod, x, g = recs[0]
            s, sq = ops.spectral_linear_grad(x, g, mod.U, mod.S, mod.delta, mod.Vh, mod.relative, impl=mod.impl)
            return sq.sum(0), s
        ds = None
        for mod, x, g in recs:     # per sample Σ_calls Σ_t (x_t·Vhᵀ) ⊙ (g_t·U), times ∂s/∂δ, squared after
            dt = _acc_dtype(x)
            a = _as_tokens(x).to(dt) @ mod.Vh.to(dt).t()
            b = _as_tokens(g).to(dt) @ mod.U.to(dt)
            S, delta = mod.S.to(dt), mod.delta.detach().to(dt)
            sv = S * (1.0 + delta) if mod.relative else S + delta
            jac = (sv > 0).to(dt) * (S if mod.relative else 1.0)
            d = (a * b).sum(1) * jac
            ds = d if ds is None else ds + d
        return ds.pow(2).sum(0), ds.sum(0)

    def flush(self, grads: dict[int, Tensor | None], out: dict[Tensor, Tensor]) -> None:
        """After the batch's backward: square what is left, check Σ_n g_n against autograd's batch gradient
        (``grads``: id → gradient of the summed loss), add the squares of the parameters that pass to ``out``
        and hand the others to torch.func (:attr:`failed`)."""
        for k in list(self.records):
            self._process(k)
        keys = [k for k in self.roles if k not in self.failed]
        checks = []
        for k in keys:
            p, g = self.params[k], grads.get(k)
            if k in self.check:
                s, scale2, r, rtol = self.check[k]
                g = torch.zeros_like(p, dtype=s.dtype) if g is None else g.to(s.device, s.dtype)
                g = g if r is None else g @ r
            else:                         # no call reported (layer unused): autograd must agree
                s = scale2 = torch.zeros((), dtype=torch.float32, device=p.device)
                g = s if g is None else g.float()
                rtol = _guard_rtol({p.dtype})
            diff = (s - g).norm()
            # rounding scale: the batch gradient and the per-sample gradients' magnitude (they may cancel)
            tol = rtol * (g.norm() + scale2.sqrt())
            checks.append(((diff <= tol) | ~torch.isfinite(diff)).reshape(()))
        ok = torch.stack(checks).tolist() if checks else []
        for k, good in zip(keys, ok):
            if good:
                if k in self.sq:
                    f = out[self.params[k]]
                    f += self.sq[k].to(f.device, f.dtype)
            else:
                self.fail(k, "the per-sample gradients of its layer's hooks do not sum to its batch gradient "
                             "(is it used outside its layer's forward, e.g. with F.linear?)")
        self.expected.clear()
        self.records.clear()
        self.sq.clear()
        self.check.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def _linear_layers(model: nn.Module, wanted: set[int]
                   ) -> tuple[list[tuple[nn.Module, str]], dict[int, tuple[Tensor, str]]]:
    """Layers whose per-sample squared gradients the hooks compute, and the parameters they cover.

    A wanted parameter is covered — ``{id: (parameter, role)}`` — only if *every* module that holds it is a
    hooked layer (or the base of a hooked spectral layer, for its bias) and it plays one role in all of them: a
    weight tied to an ``nn.Embedding`` (a tied LM head) is not, and goes to torch.func.
    """
    from fip_fast.spectral_reference import SpectralLayer

    layers, roles, hooked = [], {}, set()
    for m in model.modules():
        if type(m) is nn.Linear and isinstance(getattr(m, "weight", None), Tensor):   # a spectral base has none
            slots = [(m.weight, "weight"), (m.bias, "bias")]
        elif isinstance(m, SpectralLayer) and m.adapter.linear_like:
            slots = [(m.delta, "delta"), (getattr(m.base, "bias", None), "bias")]
            hooked.add(id(m.base))
        else:
            continue
        slots = [(p, r) for p, r in slots if p is not None and id(p) in wanted]
        if not slots:
            continue
        layers.append((m, "linear" if type(m) is nn.Linear else "spectral"))
        hooked.add(id(m))
        for p, r in slots:
            roles.setdefault(id(p), (p, set()))[1].add(r)
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), set()).add(id(m))
    covered = {k: (p, next(iter(r))) for k, (p, r) in roles.items()
               if len(r) == 1 and owners.get(k, set()) <= hooked}
    return layers, covered


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
    # δ of the in-place spectral layers (fip_fast.spectral): per-sample gradients from their output taps
    inplace = {id(d) for _, m in model.named_modules() if isinstance(d := getattr(m, "spectral_delta", None), Tensor)}
    spectral = None
    if inplace:
        from fip_fast import spectral
    dlist = [p for p in plist if id(p) in inplace]
    dfailed: set[int] = set()       # in-place δ's handed to the one-backward-per-sample loop for good
    try:
        wanted = {id(p) for p in plist}
        names = {id(p): n for n, p in named}
        if estimator == "per_sample":
            layers, covered = _linear_layers(model, wanted - inplace)
            capture = _LinearCapture(layers, covered, names)
            # Gradients are needed only where the hooks, the taps or autograd.grad look.
            for p, _ in req:
                p.requires_grad_(id(p) in covered or (id(p) in inplace and id(p) in wanted))
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
            if spectral is not None:
                spectral.sync(model)         # weights current before any pass (the functional one included)
            dlive = [d for d in dlist if id(d) not in dfailed]
            if capture.live() or dlive:
                capture.active, capture.batch_size = True, x.shape[0]
                grads: dict[int, Tensor | None] = {}
                sinks: dict = {}
                collect = spectral.collect_per_sample(model) if dlive else contextlib.nullcontext(sinks)
                try:
                    with torch.enable_grad(), collect as sinks:
                        loss = loss_fn(model(x), y).sum()
                        inputs = [p for p in plist if id(p) in covered and id(p) not in capture.failed] + dlive
                        if loss.requires_grad and inputs:   # fires the hooks and taps; users' .grad untouched
                            gs = torch.autograd.grad(loss, inputs, allow_unused=True)
                            grads = {id(p): g for p, g in zip(inputs, gs)}
                finally:
                    capture.active = False
                capture.flush(grads, out)    # squares, and the guard: Σ_n g_n must equal the batch gradient
                for p in plist:              # parameters handed to torch.func need no autograd gradient
                    if id(p) in capture.failed:
                        p.requires_grad_(False)
                for d in dlive:              # in-place δ: Σ_n (Σ_calls per-sample δ-gradient)²
                    sq, why = _delta_sq(sinks.get(d, []), grads.get(id(d)), d, x.shape[0])
                    if sq is None:
                        dfailed.add(id(d))
                        logger.warning("fip_fast.estimate_fisher: %s: %s; its Fisher is computed with one backward "
                                       "per sample instead (this batch included)", names[id(d)], why)
                    else:
                        out[d] += sq.to(out[d].device)
            dloop = [d for d in dlist if id(d) in dfailed]
            if dloop:
                for d, sq in zip(dloop, _per_sample_loop(model, dloop, loss_fn, x, y)):
                    out[d] += sq
            func_names = [n for n, p in named
                          if id(p) not in inplace and (id(p) not in covered or id(p) in capture.failed)]
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
