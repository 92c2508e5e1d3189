"""Correctness parity with the peers of ``python -m bench peers`` (docs/peers.md), on the bench's own models.

The speed rows compare like with like only if both sides compute the same thing: the per-sample Fisher equals one
``torch.func`` vmap over all parameters and BackPACK's ``SumGradSquared`` / ``BatchGrad``; Fast FIP in place
computes the outputs and δ-gradients of the authors' layer.  (PyHessian: tests/test_metrics.py; torch's SGD:
tests/test_optim.py.)
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from bench.peers.authors import authors_swap
from bench.peers.fisher import SmallCNN, TokenModel, _seq_nll_sum, backpack_fisher, vmap_fisher
from fip_fast import estimate_fisher, spectral

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN(4)
    for bn in (m.b1, m.b2):                  # running statistics away from (0, 1), as in a trained model
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "cnn", _cnn, (torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g))
    ids, tgt = torch.randint(0, 20, (5, 7), generator=g), torch.randint(0, 20, (5, 7), generator=g)
    yield "tokens", (lambda: (torch.manual_seed(0), TokenModel(20, 6))[1]), (ids, tgt)


def _ours(model, x, y) -> list[torch.Tensor]:
    """Σ_n g_n² (estimate_fisher is the mean over samples) with the bench's loss: per sample, the summed NLL."""
    f = estimate_fisher(model, [(x, y)], estimator="per_sample",
                        loss_fn=lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1),
                                                               reduction="none").reshape(t.shape[0], -1).sum(1))
    return [f[p] * x.shape[0] for p in model.parameters()]


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    scale = max(float(w.abs().max()) for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name, make, batch", list(_cases()), ids=[c[0] for c in _cases()])
def test_per_sample_fisher_equals_one_vmap(name, make, batch):
    model, (x, y) = make(), batch
    _close(_ours(model, x, y), vmap_fisher(make(), x, y))


@pytest.mark.skipif(importlib.util.find_spec("backpack") is None, reason="BackPACK is not installed (peers extra)")
@pytest.mark.parametrize("name, make, batch", list(_cases()), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("how", ["sum_grad_squared", "batch_grad"])
def test_per_sample_fisher_equals_backpack(name, make, batch, how):
    from backpack import extend

    model, (x, y) = make(), batch
    _close(_ours(model, x, y), backpack_fisher(extend(make()), x, y, how))


def test_bench_loss_is_the_per_sample_sum():
    """The peers' loss sums the per-sample losses, so their per-sample gradients are those of ``_ours``'s loss."""
    out, y = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4))
    per = F.cross_entropy(out.reshape(-1, 5), y.reshape(-1), reduction="none").reshape(3, -1).sum(1)
    torch.testing.assert_close(_seq_nll_sum(out, y), per.sum())


def test_fast_fip_in_place_equals_the_authors_layer():
    """At δ ≠ 0 the authors' layer (W = U·diag(relu(S + δ))·Vh rebuilt each forward,
    bench.peers.authors.authors_swap) and Fast FIP in place (additive δ, full rank) give the same outputs and the
    same δ-gradients, layer by layer."""
    torch.manual_seed(0)
    base = _cnn().train()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    theirs = copy.deepcopy(base)
    their_deltas = authors_swap(theirs)
    ours = copy.deepcopy(base)
    our_deltas = spectral.reparameterize(ours, relative=False)
    assert len(our_deltas) == len(their_deltas) == 3
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b in zip(their_deltas, our_deltas):
            step = 0.1 * torch.randn(a.shape, generator=g, dtype=a.dtype)
            a.copy_(step)
            b.copy_(step)
    F.cross_entropy(theirs(x), y).backward()
    F.cross_entropy(ours(x), y).backward()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(their_deltas, our_deltas):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5)
