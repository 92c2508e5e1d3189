"""estimate_fisher against the explicit per-sample loop (fp64)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import estimate_fisher
from fip_fast import reference as R
from fip_fast import spectral as SI
from fip_fast import spectral_reference as spectral
from fip_fast.fisher import normalize_fisher


def _loader(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def _check(model, x, y, bs=5, **kw):
    got = estimate_fisher(model, _loader(x, y, bs), **kw)
    want = R.fisher_per_sample_loop(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    assert set(map(id, got)) == set(map(id, params))
    for p, w in zip(params, want):
        torch.testing.assert_close(got[p].double(), w.double(), rtol=1e-6, atol=1e-12)


def test_linear_fast_path_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    _check(m, torch.randn(13, 5, dtype=torch.float64), torch.randint(0, 3, (13,)))


def test_conv2d_with_batchnorm_restores_train_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.Conv2d(3, 3, 3, groups=3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    m.train()
    # BatchNorm statistics that differ from a fresh module, so eval vs train mode matters
    m[1].running_mean.fill_(0.3)
    m[1].running_var.fill_(2.0)
    x, y = torch.randn(9, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (9,))
    before = m[1].running_mean.clone()
    _check(m, x, y, bs=4, chunk_size=3)
    assert m.training and torch.equal(before, m[1].running_mean)


def test_embedding_and_token_linear():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.proj = nn.Linear(6, 11)

        def forward(self, ids):
            return self.proj(torch.tanh(self.emb(ids)))     # (N, T, V)

    m = LM().double()
    ids = torch.randint(0, 11, (7, 4))
    labels = torch.randint(0, 11, (7, 4))
    got = estimate_fisher(m, [(ids[:3], labels[:3]), (ids[3:], labels[3:])])
    # explicit: per sequence, log-likelihood = Σ_t log p(y_t | ·)
    want = {p: torch.zeros_like(p) for p in m.parameters()}
    for n in range(7):
        out = m(ids[n:n + 1])
        nll = F.cross_entropy(out.flatten(0, 1), labels[n], reduction="sum")
        for p, g in zip(m.parameters(), torch.autograd.grad(nll, list(m.parameters()))):
            want[p] += g.pow(2) / 7
    for p in m.parameters():
        torch.testing.assert_close(got[p].double(), want[p], rtol=1e-6, atol=1e-12)


def test_spectral_delta_fast_path_matches_loop():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    spectral.reparameterize(m, freeze_others=False)
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    _check(m, x, y, bs=3)


def test_params_subset_user_grads_untouched():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    F.cross_entropy(m(x), y).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    got = estimate_fisher(m, _loader(x, y, 4), params=[m[2].weight])
    assert list(got) == [m[2].weight]
    for g, p in zip(grads, m.parameters()):
        assert torch.equal(g, p.grad)


def test_batch_estimator_is_mean_of_squared_batch_gradients():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    got = estimate_fisher(m, _loader(x, y, 4), estimator="batch")
    want = {p: torch.zeros_like(p) for p in m.parameters()}
    for i in range(0, 12, 4):
        gs = torch.autograd.grad(F.cross_entropy(m(x[i:i + 4]), y[i:i + 4]), list(m.parameters()))
        for p, g in zip(m.parameters(), gs):
            want[p] += g.pow(2) / 3
    for p in m.parameters():
        torch.testing.assert_close(got[p].double(), want[p])
    # ... and biased low against the per-sample estimator (documented)
    exact = estimate_fisher(m, _loader(x, y, 4))
    assert sum(v.sum() for v in got.values()) < sum(v.sum() for v in exact.values())


def test_normalize_and_max_batches_and_errors():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    f = estimate_fisher(m, _loader(x, y, 2), normalize="max")
    assert abs(max(v.max().item() for v in f.values()) - 1.0) < 1e-6
    fm = normalize_fisher(estimate_fisher(m, _loader(x, y, 2)), "mean")
    assert abs(sum(v.sum() for v in fm.values()).item() / sum(v.numel() for v in fm.values()) - 1) < 1e-5
    one = estimate_fisher(m, _loader(x, y, 2), max_batches=1)
    first = estimate_fisher(m, _loader(x[:2], y[:2], 2))
    for p in m.parameters():
        torch.testing.assert_close(one[p], first[p])
    with pytest.raises(ValueError, match="estimator"):
        estimate_fisher(m, _loader(x, y, 2), estimator="kfac")
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(m, [])
    with pytest.raises(ValueError, match="not parameters"):
        estimate_fisher(m, _loader(x, y, 2), params=[torch.zeros(2, requires_grad=True)])


# --- layers used more than once in a forward (weight sharing, tied heads, recurrence) --------------------------
# The per-sample gradient of a shared weight is the sum of its calls' contributions; the Fisher squares that sum.

def _seq_nll(out, target):
    """The loop's loss for (N, T, V) outputs: the sequence log-likelihood, as nll_per_sample."""
    from fip_fast.fisher import nll_per_sample
    return nll_per_sample(out, target).sum()


def _check_loop(model, x, y, params=None, bs=4, loop_loss=F.cross_entropy, **kw):
    got = estimate_fisher(model, _loader(x, y, bs), params=params, **kw)
    plist = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    want = R.fisher_per_sample_loop(model, x, y, plist, loss_fn=loop_loss)
    assert set(map(id, got)) == set(map(id, plist))
    for p, w in zip(plist, want):
        torch.testing.assert_close(got[p].double(), w.double(), rtol=1e-6, atol=1e-12)
    return got


class _Twice(nn.Module):
    """A square Linear applied twice, then a head; ``tokens``: 3-d inputs, mean over tokens before the head."""

    def __init__(self, d=5, classes=3, tokens=False):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)
        self.tokens = tokens

    def forward(self, x):
        h = self.fc(torch.tanh(self.fc(x)))
        return self.head(h.mean(1) if self.tokens else h)


def test_linear_applied_twice_2d():
    torch.manual_seed(0)
    m = _Twice().double()
    _check_loop(m, torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,)))


def test_linear_applied_twice_tokens():
    torch.manual_seed(0)
    m = _Twice(tokens=True).double()
    _check_loop(m, torch.randn(9, 4, 5, dtype=torch.float64), torch.randint(0, 3, (9,)), chunk_size=2)


@pytest.mark.parametrize("tokens", [False, True])
def test_per_sample_weight_gradients_in_sample_chunks(monkeypatch, caplog, tokens):
    """The exact form of a Linear applied twice forms its per-sample gradients a few samples at a time (on a CPU,
    chunks of ~2^18 elements, in cache): with a chunk of 2 samples (2 · 5 · 5 elements) the squares and the
    guard's projected sums are right — the hooks' result passes the guard (no torch.func fallback)."""
    import fip_fast._fisher_capture as capture
    monkeypatch.setattr(capture, "_CPU_CHUNK_ELEMS", 50)
    torch.manual_seed(0)
    m = _Twice(tokens=tokens).double()
    x = torch.randn(9, 4, 5, dtype=torch.float64) if tokens else torch.randn(9, 5, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="fip_fast"):
        _check_loop(m, x, torch.randint(0, 3, (9,)), bs=9)
    assert "torch.func" not in caplog.text


def test_linear_applied_twice_token_lm_outputs():
    torch.manual_seed(0)

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(6, 6)
            self.head = nn.Linear(6, 7)

        def forward(self, x):                   # (N, T, 6) -> (N, T, 7), the block applied three times
            h = x
            for _ in range(3):
                h = torch.tanh(self.block(h))
            return self.head(h)

    m = Rec().double()
    _check_loop(m, torch.randn(8, 3, 6, dtype=torch.float64), torch.randint(0, 7, (8, 3)), loop_loss=_seq_nll)


def test_tied_embedding_lm_head():
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self, V=11, d=6):
            super().__init__()
            self.emb = nn.Embedding(V, d)
            self.mid = nn.Linear(d, d)
            self.head = nn.Linear(d, V, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))     # (N, T, V)

    m = TiedLM().double()
    ids, labels = torch.randint(0, 11, (7, 4)), torch.randint(0, 11, (7, 4))
    _check_loop(m, ids, labels, bs=3, loop_loss=_seq_nll)
    # ... and with only the tied weight asked for
    _check_loop(m, ids, labels, params=[m.emb.weight], bs=3, loop_loss=_seq_nll)


def test_two_linears_sharing_one_weight():
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
            self.b.weight = self.a.weight          # shared weight, separate biases

        def forward(self, x):
            return self.head(self.b(torch.tanh(self.a(x))))

    m = Shared().double()
    _check_loop(m, torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,)))


@pytest.mark.parametrize("tokens", [False, True])
def test_spectral_layer_applied_twice(tokens):
    torch.manual_seed(0)
    m = _Twice(tokens=tokens).double()
    deltas = spectral.reparameterize(m, relative=True)
    with torch.no_grad():                       # small non-zero shifts; one singular value clipped by the relu
        for d in deltas:
            d.uniform_(-0.2, 0.2)
        deltas[0][-1] = -1.5
    x = torch.randn(9, 4, 5, dtype=torch.float64) if tokens else torch.randn(9, 5, dtype=torch.float64)
    got = _check_loop(m, x, torch.randint(0, 3, (9,)), params=deltas)
    assert got[deltas[0]][-1] == 0


def test_guard_weight_used_outside_its_module(caplog):
    torch.manual_seed(0)

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):                   # fc.weight also used without fc's forward (the hooks miss it)
            return self.head(torch.tanh(self.fc(x) + 0.5 * F.linear(x.flip(1), self.fc.weight)))

    m = Direct().double()
    with caplog.at_level("WARNING", logger="fip_fast"):
        _check_loop(m, torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,)), bs=4)
    warned = [r for r in caplog.records if "fc.weight" in r.getMessage()]
    assert len(warned) == 1                     # once, although three batches
    assert not any("fc.bias" in r.getMessage() or "head" in r.getMessage() for r in caplog.records)


def test_linear_on_flattened_tokens_falls_back_to_exact(caplog):
    torch.manual_seed(0)

    class Flat(nn.Module):                      # rows of the Linear's input are tokens, not samples
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            n, t, k = x.shape
            return self.head(torch.tanh(self.fc(x.reshape(n * t, k))).view(n, t, k).mean(1))

    m = Flat().double()
    with caplog.at_level("WARNING", logger="fip_fast"):
        _check_loop(m, torch.randn(8, 3, 4, dtype=torch.float64), torch.randint(0, 3, (8,)), bs=3)
    assert sorted(n for n in ("fc.weight", "fc.bias") if any(n in r.getMessage() for r in caplog.records)) == \
        ["fc.bias", "fc.weight"]


def test_guard_silent_on_ordinary_fp32_model(caplog):
    """A trained fp32 MLP (batch gradients ≪ per-sample ones): the guard must not hand anything to torch.func."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 6)
    y = x[:, :3].argmax(1)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    with caplog.at_level("WARNING", logger="fip_fast"):
        got = estimate_fisher(m, _loader(x, y, 32))
    assert not caplog.records
    want = R.fisher_per_sample_loop(m, x, y)
    for p, w in zip(m.parameters(), want):
        torch.testing.assert_close(got[p], w, rtol=1e-4, atol=1e-10)


# --- Fast FIP in place (fip_fast.spectral): δ-Fisher from the layers' output taps ------------------------------
# Every model below uses some δ in two calls per sample (a layer applied twice, an embedding tied to the LM head),
# so squaring per call instead of per sample (Σ_calls g_call² instead of (Σ_calls g_call)²) fails these tests.


def _inplace(model, rank=None, relative=False, seed=1):
    deltas = SI.reparameterize(model, rank=rank, relative=relative)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for _, m in SI.spectral_layers(model):
            d, S = m.spectral_delta, m.spectral_S
            d.copy_(0.3 * torch.rand(d.shape, generator=gen, dtype=d.dtype) - 0.15)
            d[::3] = -1.5 if relative else -1.5 * S[::3]       # s(δ) < 0: those relus inactive
    return deltas


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def _check_inplace(model, x, y, params, bs=4, loop_loss=F.cross_entropy, **kw):
    """estimate_fisher against one backward per sample (through the taps), fp64; returns the max relative error."""
    model.train()
    got = estimate_fisher(model, _loader(x, y, bs), params=params, **kw)
    assert model.training
    plist = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    want = R.fisher_per_sample_loop(model, x, y, plist, loss_fn=loop_loss)
    assert set(map(id, got)) == set(map(id, plist))
    err = 0.0
    for p, w in zip(plist, want):
        assert w.abs().max() > 0 or p.numel() == 0
        torch.testing.assert_close(got[p].double(), w.double(), rtol=1e-6, atol=1e-12)   # F is fp32
        err = max(err, _rel_err(got[p], w))
    return got, err


class _InplaceMLP(nn.Module):
    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(torch.relu(self.fc2(h))))     # fc2 (one δ) applied twice
        return self.head(h.mean(1) if self.tokens else h)


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("tokens", [False, True])
def test_inplace_delta_linear(tokens, rank, relative):
    torch.manual_seed(0)
    m = _InplaceMLP(tokens).double()
    deltas = _inplace(m, rank, relative)
    x = torch.randn(11, 3, 6, dtype=torch.float64) if tokens else torch.randn(11, 6, dtype=torch.float64)
    got, err = _check_inplace(m, x, torch.randint(0, 3, (11,)), deltas)
    for d in deltas:                                           # clipped singular values: no Fisher
        assert torch.all(got[d][::3] == 0) and got[d].sum() > 0
    assert err < 1e-6


class _InplaceConv(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = torch.tanh(self.c2(self.bn(torch.tanh(self.c2(h)))))   # c2 applied twice
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("groups", [1, 2])
def test_inplace_delta_conv2d(groups):
    torch.manual_seed(0)
    m = _InplaceConv(groups).double()
    m.bn.running_mean.fill_(0.2)
    m.bn.running_var.fill_(1.7)
    deltas = _inplace(m, relative=groups == 2)
    _, err = _check_inplace(m, torch.randn(9, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (9,)), deltas,
                            chunk_size=2)
    assert err < 1e-6


class _InplaceTiedLM(nn.Module):
    def __init__(self, V=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.emb.weight                     # one weight, one δ, two modules

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


@pytest.mark.parametrize("rank", [None, 4])
def test_inplace_delta_tied_embedding_lm_head_with_padding(rank):
    torch.manual_seed(0)
    m = _InplaceTiedLM().double()
    deltas = _inplace(m, rank)
    assert len(deltas) == 2                                    # emb/head share one δ
    ids = torch.randint(0, 11, (7, 5))
    ids[:, -2:] = 0                                            # padding tokens
    _, err = _check_inplace(m, ids, torch.randint(1, 11, (7, 5)), deltas, bs=3, loop_loss=_seq_nll)
    assert err < 1e-6


def test_inplace_params_none_deltas_and_extras():
    """All trainable parameters as Fast FIP sets them up: δ's (relative) plus biases and BatchNorm affine
    parameters (its "extras", through the Linear hooks and torch.func); the other weights frozen; users'
    ``.grad`` and the requires_grad / train flags left as they were."""
    torch.manual_seed(0)
    m = _InplaceConv(2).double()
    m.bn.running_mean.fill_(-0.1)
    m.bn.running_var.fill_(0.6)
    deltas = _inplace(m, rank=3, relative=True)
    for n, p in m.named_parameters():
        if n.endswith("bias") or n.startswith("bn."):
            p.requires_grad_(True)
    x, y = torch.randn(10, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    F.cross_entropy(m(x), y).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    got, err = _check_inplace(m, x, y, None, bs=4, chunk_size=3)
    assert {id(d) for d in deltas} < set(map(id, got)) and m.head.bias in got and m.bn.weight in got
    assert not any(w in got for w in (m.c1.weight, m.c2.weight, m.head.weight))
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    for n, p in m.named_parameters():
        assert (p.grad is None) == (n not in grads) and (p.grad is None or torch.equal(p.grad, grads[n]))
    assert err < 1e-6


def test_inplace_delta_of_a_submodule_and_flattened_tokens_fallback(caplog):
    """δ's of a reparameterized submodule are found from the whole model; a layer on flattened (N·T, d) tokens
    fails the guard (its rows are not the samples): one warning, that δ by one backward per sample."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _InplaceMLP(tokens=True)
            self.flat = nn.Linear(6, 6)

        def forward(self, x):
            n, t, k = x.shape
            return self.body(self.flat(x.reshape(n * t, k)).view(n, t, k))

    m = Net().double()
    body = _inplace(m.body)
    flat = SI.reparameterize(m, include=lambda name, _: name == "flat", freeze_others=False)
    with torch.no_grad():
        flat[0].uniform_(-0.2, 0.2)
    with caplog.at_level("WARNING", logger="fip_fast"):
        _, err = _check_inplace(m, torch.randn(9, 3, 6, dtype=torch.float64), torch.randint(0, 3, (9,)),
                                body + flat, bs=4)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "flat.spectral_delta" in warned[0]
    assert err < 1e-6


@pytest.mark.parametrize("relative", [False, True])
def test_inplace_delta_fisher_matches_autograd_through_w_delta(relative):
    """Independent of the taps: the per-sample δ-gradients of W(δ) = W0 + U·diag(relu(s(δ)) − S)·Vh built with
    autograd on an untouched copy of the model (a tied LM: one δ for embedding and head, padding tokens)."""
    import copy

    from torch.func import functional_call

    torch.manual_seed(0)
    m0 = _InplaceTiedLM().double()
    m = copy.deepcopy(m0)
    deltas = _inplace(m, rank=4, relative=relative)
    layers = SI.spectral_layers(m)
    ids = torch.randint(0, 11, (6, 5))
    ids[:, :2] = 0
    labels = torch.randint(1, 11, (6, 5))
    got = estimate_fisher(m, _loader(ids, labels, 4), params=deltas)
    want = [torch.zeros_like(d) for d in deltas]
    for n in range(ids.shape[0]):
        ds = [d.detach().clone().requires_grad_(True) for d in deltas]
        ws = {}
        for (name, lay), d in zip(layers, ds):
            U, S, Vh, W0 = lay.spectral_U, lay.spectral_S, lay.spectral_Vh, lay.spectral_W0
            s = S * (1 + d) if relative else S + d
            ws[f"{name}.weight"] = (W0.reshape(W0.shape[0], -1) + (U * (torch.relu(s) - S)) @ Vh).reshape(W0.shape)
        out = functional_call(m0, ws, (ids[n:n + 1],))
        for w, g in zip(want, torch.autograd.grad(_seq_nll(out, labels[n:n + 1]), ds)):
            w += g.pow(2) / ids.shape[0]
    for d, w in zip(deltas, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(got[d].double(), w, rtol=1e-6, atol=1e-12)


# ---- per-sample rules of the hook pass beyond nn.Linear (conv, embedding, norm layers), fp64 vs torch.func ----

def _func_sq(model, x, y, loss_fn):
    """Σ_n (∂ℓ_n/∂θ)² of every parameter by torch.func at the model's dtype (the reference of the rules)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(d, xi, yi):
        return loss_fn(functional_call(model, (d, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    gs = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {n: g.pow(2).sum(0) for n, g in gs.items()}


def _hook_sq(model, x, y, loss_fn):
    """The hook pass alone (no torch.func), squares kept at fp64; asserts every parameter is covered and passes
    the guard."""
    from fip_fast._fisher_capture import _HookCapture, _hooked_layers

    named = list(model.named_parameters())
    layers, covered = _hooked_layers(model, {id(p) for _, p in named})
    assert set(covered) == {id(p) for _, p in named}, "a parameter is not covered by a hook rule"
    cap = _HookCapture(layers, covered, {id(p): n for n, p in named})
    cap.active, cap.batch_size = True, x.shape[0]
    try:
        loss = loss_fn(model(x), y).sum()
        gs = torch.autograd.grad(loss, [p for _, p in named])
    finally:
        cap.active = False
    out = {p: torch.zeros_like(p) for _, p in named}
    cap.flush({id(p): g for (_, p), g in zip(named, gs)}, out)
    cap.remove()
    assert not cap.failed
    return {n: out[p] for n, p in named}


def _check_rules(model, x, y, loss_fn=None):
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t, reduction="none"))
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    want, got = _func_sq(model, x, y, loss_fn), _hook_sq(model, x, y, loss_fn)
    for n, w in want.items():
        assert w.abs().max() > 0, n
        rel = ((got[n] - w).abs().max() / w.abs().max()).item()
        assert rel <= 1e-10, f"{n}: relative error {rel:.3g}"


class _ConvNet(nn.Module):
    def __init__(self, conv, n_out, twice=False):
        super().__init__()
        self.conv, self.twice = conv, twice
        self.head = nn.LazyLinear(3)
        self.n_out = n_out

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        if self.twice:                       # the same layer applied again (needs C_in == C_out)
            h = torch.tanh(self.conv(h))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 9, 8)),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)), (4, 7, 9)),
    (lambda: nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4, bias=False), (4, 8, 7)),
    (lambda: nn.Conv2d(4, 6, 4, padding="same"), (4, 7, 6)),           # even kernel: asymmetric padding
    (lambda: nn.Conv2d(4, 6, 3, padding="valid", stride=3), (4, 10, 10)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (4, 11)),
    (lambda: nn.Conv1d(4, 6, 4, padding="same"), (4, 9)),
])
def test_rule_conv(make, shape):
    torch.manual_seed(0)
    m = _ConvNet(make(), None)
    x = torch.randn(6, *shape)
    m(x)   # materialize the lazy head
    _check_rules(m, x, torch.randint(0, 3, (6,)))


class _TokenModel(nn.Module):
    def __init__(self, padding_idx=None, twice=False):
        super().__init__()
        self.emb = nn.Embedding(9, 5, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(5)
        self.proj = nn.Linear(5, 9)
        self.twice = twice

    def forward(self, ids):
        h = self.emb(ids)
        if self.twice:                       # embedding and LayerNorm each applied twice
            h = self.norm(h + self.emb(ids.flip(1)))
        return self.proj(torch.tanh(self.norm(h)))      # (N, T, V)


def _seq_loss(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


@pytest.mark.parametrize("padding_idx, twice", [(None, False), (0, False), (2, True)])
def test_rule_embedding_repeated_indices_padding_and_layernorm(padding_idx, twice):
    torch.manual_seed(0)
    m = _TokenModel(padding_idx, twice)
    with torch.no_grad():
        m.norm.weight.normal_()
        m.norm.bias.normal_()
    ids = torch.randint(0, 9, (5, 7))
    ids[:, 1] = ids[:, 3] = ids[:, 4]        # repeated indices within each sample
    ids[0, :2] = 0
    ids[1, 5:] = 2                           # padding tokens (for padding_idx 0 / 2)
    _check_rules(m, ids, torch.randint(0, 9, (5, 7)), _seq_loss)


def test_rule_batchnorm_eval_groupnorm_and_conv_applied_twice():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.GroupNorm(2, 4),
                      nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    for bn in (m[1], m[6]):                  # running statistics and affine parameters far from a fresh module
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    with torch.no_grad():
        m[3].weight.normal_()
    x = torch.randn(7, 3, 5, 5)
    _check_rules(m, x, torch.randint(0, 3, (7,)))
    twice = _ConvNet(nn.Conv2d(3, 3, 3, padding=1, groups=3), None, twice=True)
    twice(x)
    _check_rules(twice, x, torch.randint(0, 3, (7,)))


def test_cnn_and_token_model_need_no_torch_func_pass(monkeypatch):
    """Conv + BatchNorm(eval) + Linear and Embedding + LayerNorm + Linear: one hook pass covers every parameter
    (torch.func is not called) and estimate_fisher equals the explicit per-sample loop."""
    import fip_fast.fisher as fisher_mod

    def no_func(*a, **k):
        raise AssertionError("torch.func pass called")

    monkeypatch.setattr(fisher_mod, "_per_sample_funcs", no_func)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(3 * 3 * 3, 4)).double()
    m[1].running_var.fill_(1.7)
    _check(m, torch.randn(9, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (9,)), bs=4)
    lm = _TokenModel(padding_idx=1).double()
    ids, tgt = torch.randint(0, 9, (6, 5)), torch.randint(0, 9, (6, 5))
    got = estimate_fisher(lm, _loader(ids, tgt, 4), loss_fn=_seq_loss)
    want = _func_sq(lm.eval(), ids, tgt, _seq_loss)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(got[p].double(), want[n] / 6, rtol=1e-6, atol=1e-12)


def test_position_embedding_on_one_row_of_ids_goes_to_torch_func_quietly(caplog):
    """A position embedding fed one (1, T) row of ids for the whole batch is not batch-first: it is handed to
    torch.func without a warning (it was never the hooks' to cover), and the Fisher stays exact."""
    torch.manual_seed(0)

    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.proj = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 9)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1]).unsqueeze(0)           # (1, T), broadcast over the batch
            return self.proj(torch.tanh(self.tok(ids) + self.pos(pos)))

    m = Pos().double()
    ids, tgt = torch.randint(0, 9, (5, 6)), torch.randint(0, 9, (5, 6))
    with caplog.at_level("WARNING", logger="fip_fast"):
        got = estimate_fisher(m, _loader(ids, tgt, 5), loss_fn=_seq_loss)
    assert not caplog.records
    want = _func_sq(m.eval(), ids, tgt, _seq_loss)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[p].double(), want[n] / 5, rtol=1e-6, atol=1e-12)
