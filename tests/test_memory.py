"""fip_fast.memory: measured bytes equal the tensors each mode must hold; analytical table is consistent."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import memory
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
def test_fast_fip_buffers_and_state(rank):
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


def test_fast_fip_activations_include_materialized_weights():
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


def test_analytical_table_and_fit():
    bf = {m: memory.bytes_per_param(m, 2, m=4096, n=4096, k=64)["total"] for m in memory.MODES}
    assert bf["inference"] == 2 and bf["fip"] == 20 and bf["fip_lagged"] == 22
    assert bf["fast_fip"] == pytest.approx(6.0) and bf["fast_fip_rank_k"] == pytest.approx(4.0625)
    assert memory.max_params(80e9, "fip", 2) == pytest.approx(4e9)
    # FSDP divides parameters/state, not Fast FIP's buffers (unless they were parameters)
    assert memory.max_params(80e9, "fip", 2, shards=8) == pytest.approx(32e9)
    assert memory.max_params(80e9, "fast_fip", 2, shards=8) == memory.max_params(80e9, "fast_fip", 2)
    assert (memory.max_params(80e9, "fast_fip", 2, shards=8, shard_buffers=True)
            > 2 * memory.max_params(80e9, "fast_fip", 2))
    with pytest.raises(ValueError):
        memory.bytes_per_param("nope")


def test_tensor_bytes_dedups_views():
    t = torch.zeros(10, 10)
    assert memory.tensor_bytes([t, t[0], t.t(), None]) == 400
