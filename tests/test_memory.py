"""fip_fast.memory: measured bytes equal the tensors each mode must hold (full FIP, Fast FIP in place and the
module-swapping reference); analytical table is consistent."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import memory, spectral_reference
from fip_fast import spectral as inplace
from fip_fast import spectral_reference as spectral
from fip_fast.optim import FIP


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5)).to(dtype)


def step_fn(model, opt, est):
    x = torch.randn(16, 32, dtype=next(model.parameters()).dtype)
    y = torch.randint(0, 5, (16,))

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    return (lambda: opt.step(closure)) if est == "fd" else (lambda: (closure(), opt.step()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("est", ["fd", "lagged"])
def test_full_fip_state_bytes(dtype, est):
    m = mlp(dtype)
    ps = list(m.parameters())
    n = sum(p.numel() for p in ps)
    b = torch.finfo(dtype).bits // 8
    opt = FIP(ps, trace_every=1, trace_estimator=est, fisher0={p: torch.ones_like(p, dtype=torch.float32) for p in ps})
    rep = memory.measure(m, opt, step_fn(m, opt, est))
    assert rep.params_trainable == n * b and rep.params_frozen == 0 and rep.grads == n * b
    # momentum + Fisher EMA + F0 (fp32) + anchor (param dtype) [+ lagged perturbation (fp32)] + step counters
    expect = n * (4 + 4 + 4 + b + (4 if est == "lagged" else 0)) + 4 * len(ps)
    assert rep.optimizer_state == expect
    assert rep.activations > 0 and "saved_tensors_hooks" in rep.activations_how
    # the analytical per-parameter persistent bytes agree (weights + state)
    bp = memory.bytes_per_param("fip" if est == "fd" else "fip_lagged", b)
    assert bp["persistent"] * n == pytest.approx(rep.params_trainable + rep.optimizer_state, rel=0.01)


@pytest.mark.parametrize("rank", [None, 8])
def test_fast_fip_reference_buffers_and_state(rank):
    m = mlp()
    full = mlp()
    shapes = [(lin.out_features, lin.in_features) for lin in full if isinstance(lin, nn.Linear)]
    deltas = spectral.reparameterize(m, rank=rank, relative=True)
    opt = FIP(deltas, trace_every=1, fisher0={d: torch.ones_like(d) for d in deltas})
    rep = memory.measure(m, opt, step_fn(m, opt, "fd"))
    rs = [min(a, b) if rank is None else min(rank, a, b) for a, b in shapes]
    assert rep.buffers_spectral["U"] == 4 * sum(a * r for (a, b), r in zip(shapes, rs))
    assert rep.buffers_spectral["Vh"] == 4 * sum(b * r for (a, b), r in zip(shapes, rs))
    # S keeps the storage of the whole spectrum when rank-k slices a prefix (a view; a few floats per layer)
    assert 4 * sum(rs) <= rep.buffers_spectral["S"] <= 4 * sum(min(a, b) for a, b in shapes)
    assert rep.buffers_spectral["residual"] == 4 * sum(a * b for (a, b), r in zip(shapes, rs)
                                                        if r < min(a, b))
    assert rep.n_trainable == sum(rs)
    assert rep.optimizer_state == sum(rs) * 4 * 4 + 4 * len(deltas)    # momentum, fisher, F0, anchor (fp32 δ)
    assert rep.n_params_total == sum(p.numel() for p in full.parameters())
    # Fast FIP's optimizer state is orders of magnitude below full FIP's
    assert rep.optimizer_state * 50 < 16 * rep.n_params_total


def test_fast_fip_reference_activations_include_materialized_weights():
    m, m2 = mlp(), mlp()
    ps = list(m.parameters())
    opt = FIP(ps, trace_every=1)
    a_full = memory.measure(m, opt, step_fn(m, opt, "fd")).activations
    deltas = spectral.reparameterize(m2)
    opt2 = FIP(deltas, trace_every=1)
    a_fast = memory.measure(m2, opt2, step_fn(m2, opt2, "fd")).activations
    # W(δ) of each layer whose input needs a gradient is saved for backward (not the first: x has no grad)
    w_bytes = 4 * (64 * 48 + 48 * 5)
    assert a_fast == a_full + w_bytes


@pytest.mark.parametrize("rank", [None, 8])
def test_fast_fip_inplace_buffers_and_state(rank):
    m, full = mlp(), mlp()
    shapes = [(lin.out_features, lin.in_features) for lin in full if isinstance(lin, nn.Linear)]
    deltas = inplace.reparameterize(m, rank=rank, relative=True)
    opt = FIP(deltas, trace_every=1, fisher0={d: torch.ones_like(d) for d in deltas})
    rep = memory.measure(m, opt, step_fn(m, opt, "fd"))
    rs = [min(a, b) if rank is None else min(rank, a, b) for a, b in shapes]
    sb = rep.buffers_spectral
    assert sb["U"] == 4 * sum(a * r for (a, b), r in zip(shapes, rs))
    assert sb["Vh"] == 4 * sum(b * r for (a, b), r in zip(shapes, rs))
    assert 4 * sum(rs) <= sb["S"] <= 4 * sum(min(a, b) for a, b in shapes)
    # the no-drift copy W0 of every weight, at any rank; no residual (the weight itself is kept, frozen)
    assert sb["W0"] == 4 * sum(a * b for a, b in shapes) and sb["residual"] == 0
    weights = 4 * sum(a * b for a, b in shapes)
    biases = 4 * sum(a for a, b in shapes)
    assert rep.params_frozen == weights + biases and rep.grads == 4 * sum(rs)      # no dW: only δ has a grad
    assert rep.n_trainable == sum(rs)
    assert rep.optimizer_state == sum(rs) * 4 * 4 + 4 * len(deltas)
    assert rep.n_params_total == sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("rank", [None, 8])
def test_fast_fip_inplace_activations_tap_not_weights(rank):
    """In place: the tap keeps a = x·Vhᵀ (k per position) for every layer; no W(δ) and, with the weights frozen,
    no layer input kept for a dW — the first layer's input (no gradient needed) is not saved at all."""
    m, m2 = mlp(), mlp()
    ps = list(m.parameters())
    opt = FIP(ps, trace_every=1)
    a_full = memory.measure(m, opt, step_fn(m, opt, "fd")).activations
    deltas = inplace.reparameterize(m2, rank=rank)
    opt2 = FIP(deltas, trace_every=1)
    rep = memory.measure(m2, opt2, step_fn(m2, opt2, "fd"))
    ks = [d.numel() for d in deltas]
    assert rep.activations_tap == 4 * 16 * sum(ks)
    assert rep.activations - rep.activations_tap == a_full - 4 * 16 * 32
    assert "taps" in rep.activations_how
    # the reference at the same rank saves more: W(δ) of the later layers and every layer input
    m3 = mlp()
    d3 = spectral_reference.reparameterize(m3, rank=rank)
    opt3 = FIP(d3, trace_every=1)
    assert memory.measure(m3, opt3, step_fn(m3, opt3, "fd")).activations > rep.activations - rep.activations_tap


def test_linear_stack_bytes_per_param_match_arithmetic():
    """Measured persistent bytes per weight parameter of a Linear stack = the table (up to the O(k) terms)."""
    for dtype, b in ((torch.float32, 4), (torch.bfloat16, 2)):
        for rank, mode in ((None, "fast_fip"), (8, "fast_fip_rank_k")):
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(3)]).to(dtype)
            inplace.reparameterize(model, rank=rank)
            rep = memory.model_memory(model)
            n = 3 * 64 * 64
            measured = (rep.params_frozen + rep.buffers_spectral["W0"] + rep.buffers_spectral["U"]
                        + rep.buffers_spectral["Vh"]) / n
            assert measured == pytest.approx(memory.bytes_per_param(mode, b, m=64, n=64, k=8)["persistent"])


def test_analytical_table_and_fit():
    bf = {m: memory.bytes_per_param(m, 2, m=4096, n=4096, k=64)["total"] for m in memory.MODES}
    assert bf["inference"] == 2 and bf["fip"] == 20 and bf["fip_lagged"] == 22
    # in place: weight + W0 + U, Vh (full rank 2b; rank 64 b/32), nothing per step
    assert bf["fast_fip"] == pytest.approx(8.0) and bf["fast_fip_rank_k"] == pytest.approx(4.0625)
    # reference: U, Vh (+ residual at rank k) + W(δ) per step
    assert bf["fast_fip_reference"] == pytest.approx(6.0)
    assert bf["fast_fip_reference_rank_k"] == pytest.approx(4.0625)
    assert memory.bytes_per_param("fast_fip", 2, m=4096, n=4096)["step_transient"] == 0
    # full rank of a non-square layer: U, Vh = b·(1 + r/max(m, n))
    assert memory.bytes_per_param("fast_fip", 2, m=1024, n=4096)["persistent"] == pytest.approx(2 + 2 + 2.5)
    assert memory.max_params(80e9, "fip", 2) == pytest.approx(4e9)
    # FSDP divides parameters/state, not Fast FIP's buffers (unless they were parameters)
    assert memory.max_params(80e9, "fip", 2, shards=8) == pytest.approx(32e9)
    ref = memory.max_params(80e9, "fast_fip_reference", 2)
    assert memory.max_params(80e9, "fast_fip_reference", 2, shards=8) == ref
    assert memory.max_params(80e9, "fast_fip_reference", 2, shards=8, shard_buffers=True) > 2 * ref
    # in place the frozen weight is a parameter and W0 keeps the local rows (spectral.shard): both sharded; U / Vh
    # are buffers
    assert memory.max_params(80e9, "fast_fip", 2, shards=8) == pytest.approx(80e9 / (2 / 8 + 2 / 8 + 4))
    assert memory.max_params(80e9, "fast_fip", 2, shards=8, shard_buffers=True) == pytest.approx(80e9 / 1.0)
    with pytest.raises(ValueError):
        memory.bytes_per_param("nope")


def test_tensor_bytes_dedups_views():
    t = torch.zeros(10, 10)
    assert memory.tensor_bytes([t, t[0], t.t(), None]) == 400


def test_weight_side_taps_count_the_layer_input():
    """A full-rank convolution takes the weight-gradient side (fip_fast.spectral._weight_side): its tap keeps the
    layer input instead of a, and the memory report counts it (the first conv's input is saved by nothing else)."""
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                      nn.LazyLinear(5))
    x = torch.randn(4, 8, 16, 16)
    m(x)                                                # materialize the lazy head
    deltas = inplace.reparameterize(m, layer_types=(nn.Conv2d,))
    opt = FIP(deltas, trace_every=1)
    y = torch.randint(0, 5, (4,))

    def step():
        def closure():
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    rep = memory.measure(m, opt, step)
    assert rep.activations_tap >= x.numel() * 4
