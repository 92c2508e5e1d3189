"""Hooks of :func:`fip_fast.fisher.estimate_fisher`'s exact estimator on ``nn.Linear``, spectral-δ, conv,
embedding and norm layers (the rules of the last three: :mod:`fip_fast._fisher_rules`).

:class:`_HookCapture` computes Σ_n (∂ℓ_n/∂θ)² for the parameters :func:`_hooked_layers` covers from the layer
inputs and output gradients of one ordinary backward, and guards the result against autograd's batch gradient
(see the docstring of :mod:`fip_fast.fisher`, "Shared and tied layers").
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from fip_fast import _fisher_rules as rules
from fip_fast import ops

logger = logging.getLogger("fip_fast")

_CHUNK_ELEMS = 1 << 24   # per-sample weight-gradient elements formed at once by the exact summed form
# On a CPU the per-sample weight gradients of one chunk are formed, projected, squared and summed while they are in
# cache: with 2^18 fp32 elements (1 MiB) per chunk, squared in place, the token model of ``python -m bench peers``
# went from 1.07x to 0.93-0.96x torch.func's vmap; fresh arrays of 2^24 elements paid a page fault per 4 KiB.
_CPU_CHUNK_ELEMS = 1 << 18


def _chunk_elems(device: torch.device) -> int:
    return _CPU_CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS


def _tokens_of(ts: list[Tensor], a: int, step: int) -> Tensor:
    """Samples [a, a + step) of every call's (N, T, ·) tokens, concatenated along T (no copy for one call)."""
    return ts[0][a:a + step] if len(ts) == 1 else torch.cat([t[a:a + step] for t in ts], 1)


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


class _HookCapture:
    """Hooks on Linear-like, conv, embedding and norm layers that compute per-sample squared gradients during an
    ordinary backward.

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
        if self.kind[module] == "spectral":
            cand = (module.delta, getattr(module.base, "bias", None))
        else:
            cand = (module.weight, getattr(module, "bias", None))
        return [p for p in cand if p is not None and id(p) in self.roles and id(p) not in self.failed]

    def fail(self, k: int, reason: str, quiet: bool = False) -> None:
        """Hand parameter ``id`` k to the exact torch.func path, from this batch on (warns once; ``quiet``: logs
        at INFO level, for layers that torch.func covered before the hooks did, e.g. a position embedding fed
        one (1, T) row of ids for the whole batch)."""
        if k in self.failed:
            return
        self.failed.add(k)
        self.records.pop(k, None)
        self.sq.pop(k, None)
        self.check.pop(k, None)
        (logger.info if quiet else logger.warning)(
            "fip_fast.estimate_fisher: %s: %s; its Fisher is computed with the exact torch.func per-sample path "
            "instead (this batch included)", self.names.get(k, "a parameter"), reason)

    def _fwd(self, module, inp, out):
        if not self.active or not isinstance(out, Tensor) or not out.requires_grad:
            return
        slots = self._slots(module)
        if not slots:
            return
        x, kind = inp[0].detach(), self.kind[module]
        linear = kind in ("linear", "spectral")
        if linear:
            why = "" if x.dim() >= 2 and x.shape[0] == self.batch_size else (
                f"its layer ran on an input of shape {tuple(x.shape)} whose first dimension is not the batch "
                f"({self.batch_size} samples)")
        else:
            why = rules.input_ok(kind, module, x, self.batch_size)
        if not why and out.shape[0] != self.batch_size:
            why = f"its layer's output of shape {tuple(out.shape)} is not batch-first ({self.batch_size} samples)"
        if why:
            for p in slots:
                self.fail(id(p), why, quiet=not linear)
            return
        x = x.flatten(1, -2) if linear and x.dim() > 3 else x
        for p in slots:
            self.expected[id(p)] = self.expected.get(id(p), 0) + 1
        out.register_hook(lambda g, m=module, x=x, slots=slots, lin=linear: self._bwd(m, x, g, slots, lin))

    def _bwd(self, module: nn.Module, x: Tensor, g: Tensor, slots: list[Tensor], linear: bool) -> None:
        g = g.detach()
        g = g.flatten(1, -2) if linear and g.dim() > 3 else g
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
            if "." in role:                   # conv / embedding / norm rules (fip_fast._fisher_rules)
                sq, check = self._rule(role, recs)
            elif role == "weight":
                sq, check = self._weight(recs)
            else:
                sq, s = self._bias(recs) if role == "bias" else self._delta(recs)
                check = (s, sq.sum(), None)
        dtypes = {self.params[k].dtype} | {t.dtype for _, x, g in recs for t in (x, g) if t.is_floating_point()}
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
        dev = xs[0].device
        sq = torch.zeros(m, k, dtype=dt, device=dev)
        s = torch.zeros(m, dtype=dt, device=dev)
        scale2 = torch.zeros((), dtype=dt, device=dev)
        step = max(1, _chunk_elems(dev) // max(1, m * k))
        for a in range(0, n, step):
            xc = _tokens_of(xs, a, step).to(dt)
            gc = _tokens_of(gs, a, step).to(dt)
            G = gc.transpose(1, 2) @ xc                              # (chunk, m, k) per-sample gradients
            Gr = G @ r
            s += Gr.sum(0)
            scale2 += Gr.pow(2).sum()
            sq += G.square_().sum(0)                                 # in place: no second chunk-sized array
        return sq, (s, scale2, r)

    def _rule(self, role: str, recs) -> tuple[Tensor, tuple[Tensor, Tensor, None]]:
        """Σ_n (∂ℓ_n/∂θ)² and, for the guard, (Σ_n ∂ℓ_n/∂θ, Σ_n ‖∂ℓ_n/∂θ‖², no probe) of a parameter covered by a
        rule of :mod:`fip_fast._fisher_rules`: per sample the sum of its calls' gradients, squared after; in
        chunks of samples so that at most ~``_CHUNK_ELEMS`` elements are formed at once."""
        kind, part = role.split(".")
        p = self.params[id(getattr(recs[0][0], part))]
        dt = _acc_dtype(p)
        n = recs[0][2].shape[0]
        if kind == "embedding":
            sq, s, scale2 = rules.embedding_sq(recs, n, p, dt)
            return sq, (s, scale2, None)
        # a weight's rule forms per-sample columns (im2col, g ⊙ x̂); a bias's only sums g
        cols = sum(rules.cols_per_sample(kind, m, x) for m, x, _ in recs) if part == "weight" else 0
        per_elems = p.numel() + cols
        step = max(1, _chunk_elems(p.device) // max(1, per_elems))
        sq = torch.zeros(p.shape, dtype=dt, device=p.device)
        s = torch.zeros(p.shape, dtype=dt, device=p.device)
        # squared in place where the per-sample gradients are a fresh array (a rule may return a view of g)
        fresh = len(recs) > 1 or (kind == "conv" and part == "weight")
        for a in range(0, n, step):
            calls = [rules.per_sample(kind, part, m, x[a:a + step], g[a:a + step], dt) for m, x, g in recs]
            per = calls[0] if len(calls) == 1 else torch.stack(calls).sum(0)
            s += per.sum(0)
            sq += (per.square_() if fresh else per.square()).sum(0)
        return sq, (s, sq.sum(), None)      # Σ_n ‖∂ℓ_n/∂θ‖² is the sum of the squares

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


def _hooked_layers(model: nn.Module, wanted: set[int]
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
            kind = "linear"
        elif isinstance(m, SpectralLayer) and m.adapter.linear_like:
            slots = [(m.delta, "delta"), (getattr(m.base, "bias", None), "bias")]
            hooked.add(id(m.base))
            kind = "spectral"
        elif (kind := rules.layer_kind(m)) is not None:
            slots = [(getattr(m, "weight", None), f"{kind}.weight"), (getattr(m, "bias", None), f"{kind}.bias")]
        else:
            continue
        slots = [(p, r) for p, r in slots if isinstance(p, Tensor) and id(p) in wanted]
        if not slots:
            continue
        layers.append((m, kind))
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
