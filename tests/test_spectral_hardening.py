"""Fast FIP in place (fip_fast.spectral) in the situations users create every day, each against a reference we
trust: the module-swapping :mod:`fip_fast.spectral_reference` (W(δ) rebuilt by autograd) or plain autograd — fp32
≤ 1e-5 relative — or a clear one-line error where a case is refused.

Fused optimizers and ``.data`` writes, channels_last convolutions, partial (δ-only) loads, deep copies and EMA
copies, double backward, ``nn.MultiheadAttention``, merging from a containing model, unbatched and keyword calls,
bf16 resumes, and the reference's own fp64 backward and shared adapter registry.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import spectral as SI
from fip_fast import spectral_reference as SR

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, tol=1e-5):
    """Norm-wise relative error ‖a − b‖ ≤ tol·‖b‖."""
    err, ref = float((a - b).double().norm()), float(b.double().norm())
    assert err <= tol * ref + 1e-30, f"relative error {err / max(ref, 1e-300):.3g} > {tol}"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.head(h.mean((2, 3)))


def _cnn():
    torch.manual_seed(0)
    return _CNN()


def _pair(make, **kw):
    """(in-place model, its δ, reference model, its δ) from the same θ0."""
    a, b = make(), make()
    return a, SI.reparameterize(a, **kw), b, SR.reparameterize(b, **kw)


def _train(model, deltas, x, y, opt, steps=5):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _reference_weights(model):
    """{qualified name of a reference SpectralLayer: W(δ) in the weight's shape}."""
    with torch.no_grad():
        return {n: m.weight().detach() for n, m in SR.spectral_layers(model)}


# ------------------------------------------------------------------------------ 1. fused optimizers, .data writes
class _DataSGD(torch.optim.Optimizer):
    """An optimizer writing through ``.data`` (no version bump)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-g["lr"])


OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=3e-2, fused=True),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.3, fused=True),
    "data_writes": lambda ps: _DataSGD(ps, lr=0.3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_optimizers_and_data_writes_move_the_weights(name):
    a, da, b, db = _pair(_mlp)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    _train(a, da, x, y, OPTIMIZERS[name](da))
    _train(b, db, x, y, OPTIMIZERS[name](db))
    assert max(float(d.abs().max()) for d in da) > 1e-3          # δ moved
    with torch.no_grad():
        _close(a(x), b(x))
    want = _reference_weights(b)
    SI.merge(a)
    for n, w in want.items():
        _close(a.get_submodule(n).weight, w)


def test_a_delta_written_through_data_between_forwards_reaches_the_weight():
    a, da, b, db = _pair(_mlp)
    x = torch.randn(8, 6)
    with torch.no_grad():
        a(x)
        for p, q in zip(da, db):
            p.data.fill_(0.05)
            q.data.fill_(0.05)
        _close(a(x), b(x))


# ------------------------------------------------------------------------------ 2. channels_last
@pytest.mark.parametrize("when", ["before", "after"])
def test_channels_last_convolutions_are_updated(when):
    a, b = _cnn(), _cnn()
    if when == "before":
        a = a.to(memory_format=torch.channels_last)
    da, db = SI.reparameterize(a), SR.reparameterize(b)
    if when == "after":
        a = a.to(memory_format=torch.channels_last)
    assert a.c1.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    _train(a, da, x, y, torch.optim.SGD(da, lr=0.5))
    _train(b, db, x, y, torch.optim.SGD(db, lr=0.5))
    with torch.no_grad():
        _close(a(x), b(x))
    want = _reference_weights(b)
    for n in ("c1", "c2"):
        _close(a.get_submodule(n).weight, want[n])
    SI.merge(a)
    for n in ("c1", "c2"):
        _close(a.get_submodule(n).weight, want[n])


def test_channels_last_with_the_mixing_band_writes_the_real_weight():
    a = _cnn().to(memory_format=torch.channels_last)
    SI.reparameterize(a)
    mixes = SI.add_mixing(a, 2)
    with torch.no_grad():
        for o in mixes:
            o.fill_(0.01)
        a(torch.randn(1, 3, 8, 8))
    for _, m in SI.spectral_layers(a):
        W0, U, Vh = m.spectral_W0.reshape(m.weight.shape[0], -1), m.spectral_U, m.spectral_Vh
        want = W0 + U @ ((m.spectral_mix * m.spectral_mix_mask)) @ Vh
        _close(m.weight.reshape(m.weight.shape[0], -1), want)


def test_purify_fast_fip_moves_the_weights_of_a_channels_last_cnn():
    from fip_fast import pipeline as P

    model = _cnn().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.randint(3, (64,), generator=g)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, _ = P.purify(copy.deepcopy(model), (x, y), method="fast_fip", steps=4, batch_size=16, progress=False)
    for n in ("c1.weight", "c2.weight"):
        assert float((dict(out.named_parameters())[n] - theta0[n]).abs().max()) > 1e-6, n


# ------------------------------------------------------------------------------ 4. δ-only loads
def test_loading_only_delta_with_strict_false_matches_the_trained_model():
    a = _mlp()
    da = SI.reparameterize(a)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    _train(a, da, x, y, torch.optim.SGD(da, lr=0.5))
    only_delta = {k: v for k, v in a.state_dict().items() if k.endswith("spectral_delta")}
    fresh = _mlp()                                   # θ0 again, reparameterized afresh
    SI.reparameterize(fresh)
    res = fresh.load_state_dict(only_delta, strict=False)
    assert res.missing_keys                          # the weights were not loaded
    with torch.no_grad():
        _close(fresh(x), a(x))
    want = {n: m.weight.detach().clone() for n, m in SI.spectral_layers(a)}
    SI.merge(fresh)
    for n, w in want.items():
        _close(fresh.get_submodule(n).weight, w)


# ------------------------------------------------------------------------------ 5. deep copies, EMA
def test_a_deep_copy_trains_and_merges_on_its_own():
    a = _mlp()
    da = SI.reparameterize(a)
    c = copy.deepcopy(a)
    dc = SI.deltas(c)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    _train(c, dc, x, y, torch.optim.SGD(dc, lr=0.5))
    assert all(d.grad is None for d in da)           # the original took no part
    assert all(d.grad is not None and float(d.grad.abs().max()) > 0 for d in dc)
    b = _mlp()
    db = SR.reparameterize(b)
    with torch.no_grad():
        for p, q in zip(db, dc):
            p.copy_(q)
        _close(c(x), b(x))
        assert torch.equal(a(x), _mlp()(x))          # the original is still θ0
    want = _reference_weights(b)
    SI.merge(c)
    assert not SI.spectral_layers(c) and SI.spectral_layers(a)
    for n, w in want.items():
        _close(c.get_submodule(n).weight, w)
        assert c.get_submodule(n).weight.requires_grad


def test_an_ema_copy_follows_its_own_averaged_delta():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    a = _mlp()
    da = SI.reparameterize(a)
    ema = AveragedModel(a, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(da, lr=0.5)
    for _ in range(4):
        _train(a, da, x, y, opt, steps=1)
        ema.update_parameters(a)
    b = _mlp()
    db = SR.reparameterize(b)
    with torch.no_grad():
        for p, q in zip(db, SI.deltas(ema.module)):
            p.copy_(q)
        assert not torch.equal(SI.deltas(ema.module)[0], da[0])
        _close(ema(x), b(x))


def test_a_pickled_model_loads_trains_like_the_original_and_merges():
    """torch.save of the whole reparameterized model (hooks, their state on the layers, the adapters): the loaded
    copy computes what the original computes, takes the same δ-gradients, trains and merges on its own."""
    import io
    a = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    SI.reparameterize(a, rank=4)
    SI.add_mixing(a, 1)
    x, y = torch.randint(0, 10, (16,)), torch.randint(0, 3, (16,))
    with torch.no_grad():
        for d in SI.deltas(a):
            d.add_(0.05)
    buf = io.BytesIO()
    torch.save(a, buf)
    b = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert torch.equal(b(x), a(x))
    for m in (a, b):
        F.cross_entropy(m(x), y).backward()
    for p, q in zip(SI.deltas(a), SI.deltas(b)):
        assert torch.equal(p.grad, q.grad)
    _train(b, SI.deltas(b), x, y, torch.optim.SGD(SI.deltas(b), lr=0.5))
    want = b(x).detach()
    SI.merge(b)
    assert not SI.spectral_layers(b) and SI.spectral_layers(a)
    _close(b(x), want)


#: what a pickle of a reparameterized model names in ``fip_fast.spectral`` (the single-module form of it)
_PICKLED_NAMES = ("Adapter", "_Group", "_Spectral", "_pre_hook", "_tap_hook", "_load_pre_hook", "_load_hook",
                  "_state_dict_hook", "_flat", "_unflat", "_linear_project", "_linear_project_grad",
                  "_linear_weight_grad", "_linear_forward", "_conv_project", "_conv_project_grad", "_conv_weight_grad",
                  "_conv_forward", "_embedding_project", "_embedding_project_grad", "_embedding_forward")


def test_pickles_naming_the_single_module_still_resolve():
    """A model pickled when fip_fast.spectral was one module names its hooks, state classes and adapter functions
    as ``fip_fast.spectral.<name>``: each resolves, to the very object a pickle of such a model names now."""
    import io
    import pickle
    m = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4), nn.Unflatten(1, (4, 1)), nn.Conv1d(4, 4, 1))
    SI.reparameterize(m)
    now = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            obj = super().find_class(module, name)
            now.add(id(obj))
            return obj

    Recording(io.BytesIO(pickle.dumps(m))).load()
    for name in _PICKLED_NAMES:
        got = pickle.loads(b"cfip_fast.spectral\n" + name.encode() + b"\n.")    # protocol 0 GLOBAL opcode
        assert id(got) in now, name


# ------------------------------------------------------------------------------ 6. double backward
def test_double_backward_through_the_taps_is_refused():
    a = _mlp()
    da = SI.reparameterize(a)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(a(x), y)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, da, create_graph=True)


def test_fip_batch_trace_estimator_on_in_place_delta_is_refused():
    from fip_fast import FIP

    a = _mlp()
    da = SI.reparameterize(a)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = FIP(da, lr=0.1, trace_estimator="batch", trace_every=1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a(x), y)
        loss.backward(create_graph=True)
        return loss
    with pytest.raises(RuntimeError, match="double backward"):
        opt.step(closure)


# ------------------------------------------------------------------------------ 7. nn.MultiheadAttention
def test_multihead_attention_out_proj_is_not_selected_and_every_delta_trains():
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    ds = SI.reparameterize(enc)
    names = [n for n, _ in SI.spectral_layers(enc)]
    assert "self_attn.out_proj" not in names and names == ["linear1", "linear2"]
    enc(torch.randn(3, 5, 8)).square().sum().backward()
    assert all(d.grad is not None and float(d.grad.abs().max()) > 0 for d in ds)


# ------------------------------------------------------------------------------ 8. merge from a containing model
def test_merge_of_a_containing_model_merges_a_reparameterized_submodule():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.body = _mlp()
    model.tail = nn.Linear(3, 2)
    ds = SI.reparameterize(model.body)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    torch.optim.SGD(ds, lr=0.5).step()
    want = {n: m.spectral_W0 + ((m.spectral_U * (torch.relu(SI.spectrum(m)) - m.spectral_S)) @ m.spectral_Vh)
            for n, m in SI.spectral_layers(model.body)}
    SI.merge(model)
    assert not SI.spectral_layers(model)
    for n, w in want.items():
        lay = model.body.get_submodule(n)
        _close(lay.weight, w.detach())
        assert lay.weight.requires_grad
        assert not lay._forward_hooks and not lay._forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------ 10. unbatched and keyword calls
@pytest.mark.parametrize("conv,shape", [(nn.Conv1d, (4, 9)), (nn.Conv2d, (4, 7, 7))])
def test_unbatched_convolution_inputs_match_the_reference(conv, shape):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(conv(4, 5, 3), nn.Tanh(), conv(5, 5, 3, padding=1))
    a, da, b, db = _pair(make, relative=True)
    x = torch.randn(*shape)
    for m, ds in ((a, da), (b, db)):
        with torch.no_grad():
            for d in ds:
                d.fill_(0.1)
        m(x).square().sum().backward()
    for p, q in zip(da, db):
        _close(p.grad, q.grad)


def test_keyword_calls_get_their_delta_gradient():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(input=torch.tanh(self.fc1(input=x)))

    def make():
        torch.manual_seed(0)
        return KW()
    a, da, b, db = _pair(make)
    x = torch.randn(5, 6)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for p, q in zip(da, db):
        assert p.grad is not None
        _close(p.grad, q.grad)


# ------------------------------------------------------------------------------ 11. bf16 resumes
def test_bf16_weights_do_not_drift_across_resumes():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).to(torch.bfloat16)

    steady = make()
    ds = SI.reparameterize(steady)
    model = make()
    SI.reparameterize(model)
    theta0 = [m.weight.detach().clone() for m in make() if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        step = [0.01 * torch.randn(d.shape, generator=g) for d in ds]
        with torch.no_grad():
            for d, s in zip(ds, step):
                d.add_(s)
            for d, s in zip(SI.deltas(model), step):
                d.add_(s)
        sd = model.state_dict()                        # save …
        torch.manual_seed(7)                           # … and resume into a fresh model (other random init)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)).to(torch.bfloat16)
        SI.reparameterize(model)
        model.load_state_dict(sd)
    with torch.no_grad():
        model(torch.randn(1, 64, dtype=torch.bfloat16))
        steady(torch.randn(1, 64, dtype=torch.bfloat16))
    for (_, m), (_, s), w0 in zip(SI.spectral_layers(model), SI.spectral_layers(steady), theta0):
        assert torch.equal(m.spectral_W0, w0)
        assert torch.equal(m.weight, s.weight)


# ------------------------------------------------------------------------------ the reference
def test_reference_backward_keeps_fp64():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4)).double()
    W = m[0].weight.detach().clone()
    (d,) = SR.reparameterize(m)
    assert d.dtype == torch.float64
    with torch.no_grad():
        d.copy_(torch.linspace(-0.3, 0.2, d.numel(), dtype=torch.float64))
    x = torch.randn(3, 5, dtype=torch.float64)
    m(x).sin().sum().backward()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    d2 = d.detach().clone().requires_grad_(True)
    F.linear(x, (U * torch.relu(S + d2)) @ Vh, m[0].base.bias).sin().sum().backward()
    _close(d.grad, d2.grad, 1e-10)


def test_one_adapter_registry_serves_both_forms():
    class MyLinear(nn.Linear):
        pass

    assert SR.register_adapter is SI.register_adapter and SR.Adapter is SI.Adapter
    SI.register_adapter(MyLinear, SI.LINEAR_ADAPTER)
    try:
        torch.manual_seed(0)
        m = nn.Sequential(MyLinear(4, 3))
        SR.reparameterize(m)
        assert SR.spectral_layers(m)
    finally:
        SI._ADAPTERS.pop(MyLinear)


def test_merge_of_part_of_one_reparameterization_is_refused():
    a = _mlp()
    SI.reparameterize(a)
    with pytest.raises(ValueError, match="outside the model given"):
        SI.merge(a[0])
    assert len(SI.spectral_layers(a)) == 3                 # nothing half-merged


def test_a_layer_called_without_its_input_is_refused():
    class Odd(nn.Linear):
        def forward(self, input=None, *, other=None):
            return super().forward(other)

    torch.manual_seed(0)
    m = nn.Sequential(Odd(3, 2))
    SI.reparameterize(m)
    with pytest.raises(TypeError, match="without its input"):
        m[0](other=torch.randn(1, 3))
