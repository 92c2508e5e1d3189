"""Fast FIP in place (fip_fast.spectral_inplace) against the math of docs/method.md written out with autograd.

The reference here is W(δ) = W0 + U·diag(relu(s(δ)) − S)·Vh built differentiably and run through
``torch.func.functional_call`` on an untouched copy of the model: the δ-gradients (batch and per sample), the
in-place weights and the merged model must match it (fp64 ≤ 1e-10, fp32 ≤ 1e-5 relative).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fip_fast import spectral as SI
from fip_fast.spectral import _taps  # where the tap hook looks _weight_side up (the patch target)


class LinearNet(nn.Module):
    def __init__(self, tokens: bool, bias: bool = True):
        super().__init__()
        self.tokens = tokens
        self.fc1 = nn.Linear(6, 8, bias=bias)
        self.fc2 = nn.Linear(8, 8, bias=bias)       # applied twice
        self.head = nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.relu_(self.fc2(h))                # in-place op right after a reparameterized layer
        h = torch.tanh(self.fc2(h))
        if self.tokens:
            h = h.mean(1)
        return self.head(h)


class ConvNet(nn.Module):
    def __init__(self, groups: int = 1, dim: int = 2, padding_mode: str = "zeros"):
        super().__init__()
        Conv = nn.Conv2d if dim == 2 else nn.Conv1d
        self.c1 = Conv(4, 6, 3, padding=1, padding_mode=padding_mode)
        self.c2 = Conv(6, 6, 3, stride=2, groups=groups, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.c1(x), inplace=True)
        h = torch.tanh(self.c2(h))
        return self.head(h.flatten(2).mean(2))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight          # tied

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def _data(kind, dtype, n=5):
    g = torch.Generator().manual_seed(1)
    if kind == "lm":
        idx = torch.randint(0, 11, (n, 7), generator=g)
        idx[0, :2] = 0                                       # padding tokens
        return idx, torch.randint(0, 11, (n, 7), generator=g)
    shape = {"linear": (n, 6), "tokens": (n, 4, 6), "conv2": (n, 4, 9, 9), "conv1": (n, 4, 11)}[kind]
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _close(a, b, tol):
    """Norm-wise relative error ‖a − b‖ ≤ tol·‖b‖ (fp32 sums of products of mixed sign cancel: single small
    entries carry the error of the large ones)."""
    err, ref = float((a - b).double().norm()), float(b.double().norm())
    assert err <= tol * ref + 1e-300, f"relative error {err / max(ref, 1e-300):.3g} > {tol}"


def _loss(out, y):
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")
    return F.cross_entropy(out, y, reduction="sum")


def _build(kind, dtype):
    torch.manual_seed(0)
    m = {"linear": lambda: LinearNet(False), "tokens": lambda: LinearNet(True),
         "nobias": lambda: LinearNet(False, False), "conv2": lambda: ConvNet(), "conv2g": lambda: ConvNet(groups=2),
         "conv2r": lambda: ConvNet(padding_mode="reflect"), "conv1": lambda: ConvNet(dim=1), "lm": TiedLM}[kind]()
    return m.to(dtype)


def _reference_weights(model0, layers, deltas, relative):
    """{qualified weight name: W(δ)} built differentiably from the model's buffers (the spec)."""
    out = {}
    for (name, layer), d in zip(layers, deltas):
        U, S, Vh, W0 = layer.spectral_U, layer.spectral_S, layer.spectral_Vh, layer.spectral_W0
        s = S * (1 + d) if relative else S + d
        W = W0.reshape(W0.shape[0], -1) + (U * (torch.relu(s) - S).to(U.dtype)) @ Vh
        out[f"{name}.weight"] = W.reshape(W0.shape)
    return out


def _fp64_truth(model0, layers, deltas, relative, x, y):
    """The spec's δ-gradient in fp64 from the same (fp32) weights, buffers, δ and data."""
    from types import SimpleNamespace

    m64 = copy.deepcopy(model0).double()
    l64 = [(n, SimpleNamespace(**{k: getattr(lay, k).double() for k in
                                  ("spectral_U", "spectral_S", "spectral_Vh", "spectral_W0")})) for n, lay in layers]
    d64 = [d.detach().double().requires_grad_(True) for d in deltas]
    xx = x.double() if x.is_floating_point() else x
    return torch.autograd.grad(_loss(functional_call(m64, _reference_weights(m64, l64, d64, relative), (xx,)), y), d64)


def _setup(kind, dtype, rank, relative, seed_delta=0.3):
    model0 = _build(kind, dtype)
    model = copy.deepcopy(model0)
    deltas = SI.reparameterize(model, rank=rank, relative=relative)
    layers = SI.spectral_layers(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        scale = 1.0 if relative else float(layers[0][1].spectral_S.mean())
        for d in deltas:        # non-zero δ, large enough that some s = S(1+δ) / S + δ fall below 0 (relu off)
            d.copy_(seed_delta * torch.randn(d.shape, generator=g) * scale)
            d[0] = -2.0 if relative else -10.0 * float(layers[0][1].spectral_S.max())
    return model0, model, deltas, layers


DATA_OF = {"linear": "linear", "nobias": "linear", "tokens": "tokens", "conv2": "conv2", "conv2g": "conv2",
           "conv2r": "conv2", "conv1": "conv1", "lm": "lm"}
CASES = [("linear", None, True), ("tokens", None, False), ("nobias", 3, True), ("conv2", None, True),
         ("conv2", 2, False), ("conv2g", None, True), ("conv2r", None, False), ("conv1", 2, True), ("lm", None, True),
         ("lm", 3, False)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind,rank,relative", CASES)
def test_delta_gradient_weights_and_per_sample_match_the_spec(kind, rank, relative, dtype, tol):
    model0, model, deltas, layers = _setup(kind, dtype, rank, relative)
    x, y = _data(DATA_OF[kind], dtype)
    # in place
    with SI.collect_per_sample(model) as sink:
        _loss(model(x), y).backward()
    got = [d.grad.clone() for d in deltas]
    # the spec, autograd through W(δ); in fp32 both are compared with the fp64 value of the same computation and the
    # in-place gradient must be as accurate as autograd's (ill-conditioned δ-gradients lose digits in both)
    ref_d = [d.detach().clone().requires_grad_(True) for d in deltas]
    W = _reference_weights(model0, layers, ref_d, relative)
    want = torch.autograd.grad(_loss(functional_call(model0, W, (x,)), y), ref_d)
    truth = _fp64_truth(model0, layers, deltas, relative, x, y) if dtype != torch.float64 else want
    for a, b, t in zip(got, want, truth):
        ref_err = float((b.double() - t).norm()) / max(float(t.norm()), 1e-300)
        _close(a.double(), t, max(tol, 2 * ref_err))
    # the weights the forward used are W(δ) (up to one rounding of the weight dtype)
    for (name, layer), w in zip(layers, W.values()):
        torch.testing.assert_close(layer.weight, w.detach(), rtol=tol, atol=tol)
    # per-sample δ-gradients (summed over the calls of a layer): their sum is the batch gradient, and they equal
    # one backward per sample
    n = x.shape[0]
    for d, calls in sink.items():
        _close(sum(calls).sum(0), d.grad, tol)
    per = [torch.autograd.grad(_loss(functional_call(model0, _reference_weights(model0, layers, ref_d, relative),
                                                     (x[i:i + 1],)), y[i:i + 1]), ref_d) for i in range(n)]
    for j, d in enumerate(deltas):
        want_ps = torch.stack([p[j] for p in per])
        _close(sum(sink[d]), want_ps, tol)


def test_at_delta_zero_the_model_is_theta0_bit_for_bit_and_merge_restores_the_architecture():
    model0 = _build("conv2", torch.float32)
    model = copy.deepcopy(model0)
    keys = list(model0.state_dict())
    deltas = SI.reparameterize(model, relative=True)
    x, y = _data("conv2", torch.float32)
    out = model(x)
    _loss(out, y).backward()
    assert torch.equal(out, model0(x))
    ref = dict(model0.named_parameters())
    for n, p in model.named_parameters():
        if not n.endswith("spectral_delta"):
            assert torch.equal(p, ref[n]), n
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas)
    assert all(not layer.weight.requires_grad for _, layer in SI.spectral_layers(model))
    SI.merge(model)
    assert list(model.state_dict()) == keys and not SI.spectral_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    for (n, p), (_, q) in zip(model.named_parameters(), model0.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_drift_after_many_updates(dtype):
    """After 200 optimizer steps on δ the weight is exactly what one evaluation of W0 + U·diag(relu(s) − S)·Vh
    from the final δ gives (no accumulated rounding), and that is the exact value up to one rounding of the
    weight dtype plus the fp32 error of the rank-k product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    deltas = SI.reparameterize(model, rank=8, relative=True)
    opt = torch.optim.SGD(deltas, lr=0.05)
    x, y = torch.randn(16, 32).to(dtype), torch.randint(0, 4, (16,))
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(x)                                     # the forward syncs the weights to the last δ
    from fip_fast import ops

    for _, layer in SI.spectral_layers(model):
        s = torch.relu(layer.spectral_S * (1 + layer.spectral_delta))
        once = torch.empty_like(layer.weight)
        ops.spectral_update_([once], [layer.spectral_U], [layer.spectral_Vh], [layer.spectral_S], [s],
                             base=[layer.spectral_W0])
        assert torch.equal(layer.weight, once)                      # no drift: bit-identical to one evaluation
        U, Vh, ds = layer.spectral_U.double(), layer.spectral_Vh.double(), (s - layer.spectral_S).double()
        exact = layer.spectral_W0.double() + (U * ds) @ Vh
        bound = (torch.finfo(dtype).eps * exact.abs() + 8 * 8 * torch.finfo(torch.float32).eps
                 * ((U.abs() * ds.abs()) @ Vh.abs()))
        assert ((layer.weight.double() - exact).abs() <= bound + 1e-30).all()


def test_state_dict_sees_the_current_weights_and_fip_trains_delta():
    from fip_fast import FIP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    deltas = SI.reparameterize(model, relative=True)
    opt = FIP(deltas, lr=0.5, momentum=0.0, eta_F=0.05, rho=0.5, trace_every=1, impl="foreach")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    w_before = model[0].weight.detach().clone()
    opt.step(closure)                               # fd: δ perturbed, forward at W(δ + e), restored, updated
    sd = model.state_dict()                         # the state-dict hook syncs W to the updated δ
    assert not torch.equal(sd["0.weight"], w_before)
    layer = model[0]
    s = layer.spectral_S * (1 + layer.spectral_delta)
    want = layer.spectral_W0 + (layer.spectral_U * (torch.relu(s) - layer.spectral_S)) @ layer.spectral_Vh
    torch.testing.assert_close(sd["0.weight"], want, rtol=1e-6, atol=1e-6)


def test_deltas_sync_and_collect_from_a_submodule_or_a_containing_model():
    """``deltas`` lists the δ of a model's layers; ``sync`` writes W(δ) without a forward; ``collect_per_sample``
    works from a model containing the reparameterized one (or a submodule of it)."""
    torch.manual_seed(0)
    inner = LinearNet(False).double()
    outer = nn.Sequential(inner)
    ds = SI.reparameterize(inner)
    assert [id(d) for d in SI.deltas(outer)] == [id(d) for d in ds] == [id(d) for d in SI.deltas(inner)]
    assert [id(d) for d in SI.deltas(inner.fc2)] == [id(inner.fc2.spectral_delta)]
    with torch.no_grad():
        ds[1].add_(0.1)
    fc2 = inner.fc2
    want = fc2.spectral_W0 + (fc2.spectral_U * (torch.relu(fc2.spectral_S + ds[1]) - fc2.spectral_S)) @ fc2.spectral_Vh
    assert not torch.allclose(fc2.weight, want)
    SI.sync(outer)
    torch.testing.assert_close(fc2.weight, want, rtol=0, atol=1e-12)
    x, y = _data("linear", torch.float64)
    for root, expect in ((outer, ds), (inner.fc2, [ds[1]])):
        with SI.collect_per_sample(root) as sink:
            _loss(outer(x), y).backward()
        assert [id(d) for d in sink] == [id(d) for d in expect]
        assert len(sink[ds[1]]) == 2                         # fc2 is applied twice


@pytest.mark.parametrize("impl", ["foreach", "triton"])
def test_weights_follow_delta_written_by_any_optimizer_kernel(impl):
    """Kernels that write δ through raw pointers (Triton, CUDA): the lazy in-place sync (by value) sees every
    step — on the fd suppressor's perturbed pass too (fused torch kernels and .data writes:
    tests/test_spectral_hardening.py)."""
    from fip_fast import FIP, ops

    if not ops.availability(impl, "cpu")[0]:
        pytest.skip(f"{impl} unavailable on CPU")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    deltas = SI.reparameterize(model, relative=True)
    opt = FIP(deltas, lr=0.5, momentum=0.0, eta_F=0.05, rho=0.5, trace_every=1, impl=impl)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        seen.append(model[0].weight.detach().clone())          # the weight this pass ran with
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
    assert not torch.equal(seen[0], seen[1])                    # the fd pass ran at W(δ + e)
    with torch.no_grad():
        model(x)
    layer = model[0]
    want = layer.spectral_W0 + (layer.spectral_U * (torch.relu(SI.spectrum(layer)) - layer.spectral_S)) \
        @ layer.spectral_Vh
    torch.testing.assert_close(layer.weight, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_w0", [True, False])
def test_state_dict_round_trip_into_a_fresh_reparameterized_model(with_w0):
    """A purification saved mid-way (weights = W(δ), U, S, Vh, δ, W0) and loaded into a *fresh* reparameterized copy
    of the architecture continues from the loaded point; a state dict without W0 (saved before W0 was) still loads
    with strict=True, W0 re-derived from the loaded weights."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # noqa: E731
    model = make()
    deltas = SI.reparameterize(model, relative=True, rank=4)
    opt = torch.optim.SGD(deltas, lr=0.5)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    sd = model.state_dict()
    assert sum(k.endswith("spectral_W0") for k in sd) == 2
    if not with_w0:
        sd = {k: v for k, v in sd.items() if not k.endswith("spectral_W0")}
    torch.manual_seed(1)
    fresh = make()                                  # other random weights: its own W0 must not leak in
    SI.reparameterize(fresh, relative=True, rank=4)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():                           # one more δ step on both: still the same model
        for a, b in zip(SI.deltas(model), SI.deltas(fresh)):
            a.add_(0.1)
            b.add_(0.1)
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)
    SI.merge(fresh)
    SI.merge(model)
    for p, q in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
def test_spectral_update_backends_match_the_reference(dtype, with_base):
    from fip_fast import reference as R
    from fip_fast.backends import foreach

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5, 3), (16, 24, 16), (1, 9, 1)]
    W = [torch.randn(m, n, generator=g).to(dtype) for m, n, _ in shapes]
    U = [torch.randn(m, k, generator=g).to(dtype) for m, _, k in shapes]
    Vh = [torch.randn(k, n, generator=g).to(dtype) for _, n, k in shapes]
    acc = torch.promote_types(dtype, torch.float32)
    so = [torch.rand(k, generator=g).to(acc) for *_, k in shapes]
    sn = [torch.rand(k, generator=g).to(acc) for *_, k in shapes]
    base = [torch.randn(m, n, generator=g).to(dtype) for m, n, _ in shapes] if with_base else None
    a, b = [w.clone() for w in W], [w.clone() for w in W]
    R.spectral_update_(a, U, Vh, so, sn, base)
    foreach.spectral_update_(b, U, Vh, so, sn, base)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("side", ["weight", "activations"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind,rank,relative", CASES)
def test_both_gradient_sides_match_the_spec(kind, rank, relative, dtype, tol, side, monkeypatch):
    """Without per-sample collection each call takes the cheaper side (_taps._weight_side); forced either way, the
    δ-gradient (diag(Uᵀ·dW·Vhᵀ) from the dense weight gradient, or Σ a ⊙ c from the projections) is the spec's."""
    forced = []
    if side == "activations":
        monkeypatch.setattr(_taps, "_weight_side", lambda *a: forced.append(1) or False)
    else:
        orig = _taps._weight_side
        monkeypatch.setattr(_taps, "_weight_side", lambda sp, m, x, out: forced.append(1) is None and (
            SI._adapter_for(m).weight_grad is not None and not isinstance(getattr(m, "padding", 0), str)
            or orig(sp, m, x, out)))
    model0, model, deltas, layers = _setup(kind, dtype, rank, relative)
    x, y = _data(DATA_OF[kind], dtype)
    _loss(model(x), y).backward()
    assert forced                                            # the patch reached the taps: the side was forced
    ref_d = [d.detach().clone().requires_grad_(True) for d in deltas]
    want = torch.autograd.grad(_loss(functional_call(model0, _reference_weights(model0, layers, ref_d, relative),
                                                     (x,)), y), ref_d)
    truth = _fp64_truth(model0, layers, deltas, relative, x, y) if dtype != torch.float64 else want
    for d, b, t in zip(deltas, want, truth):
        ref_err = float((b.double() - t).norm()) / max(float(t.norm()), 1e-300)
        _close(d.grad.double(), t, max(tol, 2 * ref_err))


def test_the_cost_model_picks_the_weight_side_for_a_full_rank_conv_and_activations_for_low_rank():
    picked = []
    orig = _taps._weight_side

    def spy(sp, m, x, out):
        r = orig(sp, m, x, out)
        picked.append((type(m).__name__, r))
        return r
    conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1))
    stack = nn.Sequential(nn.Linear(256, 256))
    SI.reparameterize(conv)
    SI.reparameterize(stack, rank=8)
    import unittest.mock as mock
    with mock.patch.object(_taps, "_weight_side", spy):
        conv(torch.randn(4, 16, 16, 16)).sum().backward()
        stack(torch.randn(64, 256)).sum().backward()
    assert picked == [("Conv2d", True), ("Linear", False)]


def test_the_weight_side_refuses_an_input_modified_in_place():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    SI.reparameterize(net)
    x = torch.randn(2, 4, 6, 6)
    out = net(x)
    x.mul_(2.0)                       # after the forward: the kept input is no longer the one used
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        out.sum().backward()


@pytest.mark.parametrize("relative", [False, True, "exp"])
def test_the_multi_tensor_spectra_equal_the_per_layer_ones_bit_for_bit(relative):
    g = torch.Generator().manual_seed(0)
    S = [torch.rand(k, generator=g) for k in (3, 1, 8)]
    d = [torch.randn(k, generator=g) * 2 for k in (3, 1, 8)]
    want = [torch.relu(SI._spectrum(s, x, relative)) for s, x in zip(S, d)]
    assert all(torch.equal(a, b) for a, b in zip(SI._relu_spectra(S, d, [relative] * 3), want))
    mixed = [relative, not relative if not isinstance(relative, str) else False, relative]      # per-layer path
    want = [torch.relu(SI._spectrum(s, x, r)) for s, x, r in zip(S, d, mixed)]
    assert all(torch.equal(a, b) for a, b in zip(SI._relu_spectra(S, d, mixed), want))


def test_shard_without_a_process_group_keeps_every_row_and_the_same_weights():
    """spectral.shard on plain (unsharded) weights: all rows are local, and the root-hook update writes the same
    weights the per-layer hooks would (the distributed behaviour is tests/test_distributed.py)."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    b = copy.deepcopy(a)
    da, db = SI.reparameterize(a, relative=True), SI.reparameterize(b, relative=True)
    SI.shard(b)
    with torch.no_grad():
        for x, y in zip(da, db):
            x.add_(0.3)
            y.add_(0.3)
    x = torch.randn(2, 5)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)     # b's root hook wrote what a's layer hooks wrote
    for ma, mb in ((a[0], b[0]), (a[2], b[2])):
        assert torch.equal(ma.weight, mb.weight) and not torch.equal(mb.weight, mb.spectral_W0)


def test_shard_finds_a_reparameterized_submodule_and_merge_removes_its_hook():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    SI.reparameterize(net[0])                     # a submodule, as for model.transformer
    SI.shard(net)                                 # sharded from the root
    with torch.no_grad():
        net[0][0].spectral_delta.add_(0.5)
    net(torch.randn(1, 4))                        # the root's hook wrote the weight
    assert not torch.equal(net[0][0].weight, net[0][0].spectral_W0)
    SI.merge(net[0])
    assert not net._forward_pre_hooks and not hasattr(net[0][0], "spectral_delta")
    with pytest.raises(ValueError, match="no layer reparameterized"):
        SI.shard(nn.Linear(2, 2))


def test_shard_with_the_mixing_band_writes_the_same_weights():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    b = copy.deepcopy(a)
    for net in (a, b):
        SI.reparameterize(net, relative=True)
        SI.add_mixing(net, band=1)
    SI.shard(b)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            if pa.requires_grad:
                pa.add_(0.1)
                pb.add_(0.1)
    x = torch.randn(2, 5)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-6)
    for ma, mb in ((a[0], b[0]), (a[2], b[2])):
        torch.testing.assert_close(mb.weight, ma.weight, rtol=0, atol=1e-6)


def test_in_place_layers_work_under_torch_compile():
    """The model stays an ordinary model with hooks: torch.compile runs it (breaking the graph at the taps) and
    gives the eager δ-gradients and weights."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    comp = copy.deepcopy(eager)
    de, dc = SI.reparameterize(eager, relative=True), SI.reparameterize(comp, relative=True)
    with torch.no_grad():
        for a, b in zip(de, dc):
            a.add_(0.1)
            b.add_(0.1)
    x = torch.randn(2, 3, 8, 8)
    eager(x).square().sum().backward()
    torch.compile(comp)(x).square().sum().backward()
    for a, b in zip(de, dc):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(SI.spectral_layers(eager), SI.spectral_layers(comp)):
        torch.testing.assert_close(b[1].weight, a[1].weight, rtol=0, atol=0)
