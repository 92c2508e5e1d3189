"""``fisher_cnn`` / ``fisher_tokens``: the per-sample diagonal Fisher against one ``torch.func`` vmap and
BackPACK (:mod:`bench.peers`); the models and the peers' Fisher, which tests/test_peers_parity.py also uses."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import percentile
from ._records import Config, Row, Side, _max_rel, _missing, _version, fill, measure


# ------------------------------------------------------------------------------------------------ Fisher
class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool ×2 → Linear: the conv, norm and Linear layers of a vision model (no in-place ops, so
    that vmap and BackPACK take it as it is)."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.b2(self.c2(x))), 4)
        return self.fc(x.flatten(1))


class TokenModel(nn.Module):
    """Embedding(vocab, d) → Linear(d, vocab): next-token logits ``(N, T, vocab)`` from ids ``(N, T)``."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.emb(ids))


def _seq_nll_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over samples (and tokens) of −log p: the per-sample losses summed, so per-sample gradients are g_n."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def vmap_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Σ_n g_n² for every trainable parameter by one ``torch.func.vmap(grad)`` over the batch (eval mode)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p, xn, yn):
        return _seq_nll_sum(functional_call(model, {**p, **buffers}, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [gs[n].pow(2).sum(0) for n in params]


def backpack_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, how: str) -> list[torch.Tensor]:
    """Σ_n g_n² by BackPACK on an ``extend``-ed model: ``SumGradSquared`` directly, or ``BatchGrad`` squared and
    summed (``how`` = "sum_grad_squared" | "batch_grad")."""
    from backpack import backpack
    from backpack.extensions import BatchGrad, SumGradSquared

    model.zero_grad(set_to_none=True)
    loss = _seq_nll_sum(model(x), y)
    with backpack(SumGradSquared() if how == "sum_grad_squared" else BatchGrad()):
        loss.backward()
    ps = list(model.parameters())
    return [p.sum_grad_squared if how == "sum_grad_squared" else p.grad_batch.pow(2).sum(0) for p in ps]


BACKPACK_LABELS = dict(sum_grad_squared="BackPACK SumGradSquared", batch_grad="BackPACK BatchGrad (squared, summed)")


def _backpack_sides(model_fn: Callable[[], nn.Module], x, y, ref: list[torch.Tensor]
                    ) -> tuple[list[Side], dict[str, Any], str]:
    """BackPACK's two ways to Σ_n g_n² (``SumGradSquared``; ``BatchGrad`` squared and summed) as sides named
    after the extension, the check of each (relative difference to ours, or the error where an extension does not
    cover a layer), and why BackPACK is skipped ("" if it is not)."""
    why = _missing("backpack", "backpack-for-pytorch einops unfoldNd")
    if why:
        return [], {}, why
    from backpack import extend

    sides, checks = [], {}
    for how in BACKPACK_LABELS:
        model = extend(model_fn().eval())
        try:
            got = backpack_fisher(model, x, y, how)
        except Exception as exc:          # a layer this extension does not cover: the other one may
            checks[how] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
            continue
        sides.append(Side(how, (lambda m, h: lambda: backpack_fisher(m, x, y, h))(model, how)))
        checks[how] = dict(max_rel_diff=_max_rel(got, ref))
    return sides, checks, "" if sides else f"BackPACK ran with neither extension: {checks}"


@contextlib.contextmanager
def _without_guard(x_leaf: torch.Tensor):
    """Diagnostic only (a "where the time goes" row, never a result): ``estimate_fisher`` with its guard off — the
    hooked backward asks autograd for the gradient of ``x_leaf`` (the batch, requiring grad) instead of the batch
    gradients of the hooked parameters, and every hooked parameter's squares are taken as they are.  Hooks,
    rules and squares run unchanged; what disappears is autograd's batch weight gradient of every hooked layer and
    the comparison."""
    from fip_fast._fisher_capture import _HookCapture

    grad, flush = torch.autograd.grad, _HookCapture.flush

    def grad_of_input(outputs, inputs, *args, **kwargs):
        grad(outputs, [x_leaf], *args, **kwargs)
        return [None] * len(inputs)

    def flush_unchecked(self, grads, out):
        for k in list(self.records):
            self._process(k)
        for k, sq in self.sq.items():
            out[self.params[k]] += sq
        for d in (self.expected, self.records, self.sq, self.check):
            d.clear()

    torch.autograd.grad, _HookCapture.flush = grad_of_input, flush_unchecked
    try:
        yield
    finally:
        torch.autograd.grad, _HookCapture.flush = grad, flush


def _fisher_group(name: str, work: str, model_fn: Callable[[], nn.Module], x, y, cfg: "Config",
                  goals: tuple[str, str]) -> list[Row]:
    from fip_fast import estimate_fisher

    model_fn = (lambda make: lambda: make().to(cfg.device))(model_fn)
    x, y = x.to(cfg.device), y.to(cfg.device)
    model = model_fn().eval()
    ps = list(model.parameters())

    def ours():
        return estimate_fisher(model, [(x, y)], estimator="per_sample", chunk_size=x.shape[0])

    ref = [f * x.shape[0] for f in (lambda d: [d[p] for p in ps])(ours())]     # estimate_fisher is the mean
    vm = model_fn().eval()
    sides = [Side("ours", ours), Side("vmap", lambda: vmap_fisher(vm, x, y))]
    vmap_check = dict(max_rel_diff=_max_rel(vmap_fisher(vm, x, y), ref))
    if x.is_floating_point():        # the guard's share (the leaf it backpropagates to must be a float batch)
        m2, x_leaf = model_fn().eval(), x.clone().requires_grad_()

        def unguarded():
            with _without_guard(x_leaf):
                return estimate_fisher(m2, [(x_leaf, y)], estimator="per_sample", chunk_size=x.shape[0])
        ps2 = list(m2.parameters())
        unguarded_check = dict(max_rel_diff=_max_rel([f * x.shape[0] for f in map(unguarded().get, ps2)], ref),
                               timed_with=["ours", "unguarded", "vmap"])
    bp_sides, bp_checks, why = _backpack_sides(model_fn, x, y, ref)
    t = measure(sides + bp_sides, cfg, cfg.steps, cfg.warmup)
    ours_label = "fip_fast.estimate_fisher(estimator='per_sample')"
    vmap_label = "torch.func vmap(grad) over all parameters"
    rows = [fill(Row(name, work, ours_label, vmap_label, torch.__version__, "per batch", goals[0], check=vmap_check),
                 t, "ours", "vmap")]
    if x.is_floating_point():
        # the diagnostic in its own rounds, as the optimizer's breakdown: a side's cost depends on what else runs
        # in the rotation (the allocator's and the caches' state), so it does not join the peers' rounds
        t2 = measure(sides + [Side("unguarded", unguarded)], cfg, cfg.steps, cfg.warmup)
        diag = "the same without its guard (diagnostic: no batch weight gradients, no comparison)"
        rows.append(fill(Row(name, work, diag, vmap_label, torch.__version__, "per batch",
                             "none: where the time goes", check=unguarded_check), t2, "unguarded", "vmap"))
        rows.append(fill(Row(name, work, diag, ours_label + " (with its guard, the same rounds)", "n/a",
                             "per batch", "none: the guard's share", check=unguarded_check), t2, "unguarded", "ours"))
    if why:
        print(f"[peers] {name}: BackPACK skipped: {why}")
        rows.append(Row(name, work, ours_label, "BackPACK", _version("backpack-for-pytorch"), "per batch", goals[1],
                        status="skipped", reason=why))
        return rows
    # BackPACK at its best on this model: the faster of its two extensions (both times kept in the check).
    best = min(bp_sides, key=lambda s: percentile(t[s.name]["cpu"], 50)).name
    for s in bp_sides:
        bp_checks[s.name]["cpu_median_s"] = percentile(t[s.name]["cpu"], 50)
    rows.append(fill(Row(name, work, ours_label, BACKPACK_LABELS[best] + " (the faster extension here)",
                         _version("backpack-for-pytorch"), "per batch", goals[1], check=bp_checks), t, "ours", best))
    return rows


def group_fisher_cnn(cfg: "Config") -> list[Row]:
    b, w, hw = (8, 4, 8) if cfg.quick else (64, 16, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 3, hw, hw, generator=g), torch.randint(0, 10, (b,), generator=g)

    def model_fn():
        torch.manual_seed(0)
        m = SmallCNN(w)
        for bn in (m.b1, m.b2):              # non-trivial running statistics, as in a trained model
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return m
    n = sum(p.numel() for p in model_fn().parameters())
    work = f"per-sample Fisher, CNN (2 conv + BatchNorm eval + Linear, {n} params), batch {b}, 3x{hw}x{hw}"
    return _fisher_group("fisher_cnn", work, model_fn, x, y, cfg, ("<= 1.0x", "<= 0.8x"))


def group_fisher_tokens(cfg: "Config") -> list[Row]:
    b, t, vocab, d = (4, 5, 50, 8) if cfg.quick else (32, 32, 512, 64)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)

    def model_fn():
        torch.manual_seed(0)
        return TokenModel(vocab, d)
    work = f"per-sample Fisher, Embedding({vocab}, {d}) + Linear({d}, {vocab}), batch {b} x {t} tokens"
    return _fisher_group("fisher_tokens", work, model_fn, x, y, cfg, ("<= 1.0x", "<= 0.8x"))
