"""Metrics (ACC / ASR / RA on hand-made cases) and smoothness estimators against exact values."""
import math

import pytest
import torch
from torch import nn

from fip_fast.evaluation.metrics import accuracy, attack_success_rate, evaluate, predict, robust_accuracy
from fip_fast.evaluation.smoothness import fisher_trace, hessian_max_eigenvalue, hessian_trace, sharpness


class Lookup(nn.Module):
    """Predicts class x[:, 0] (one-hot logits); a BatchNorm to check the eval-mode handling."""

    def __init__(self, k=4):
        super().__init__()
        self.k = k
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x):
        assert not self.training, "metrics must run in eval mode"
        return nn.functional.one_hot(x[:, 0].long(), self.k).float()


def test_acc_asr_ra_hand_made():
    m = Lookup().train()
    # predictions:       0  1  2  3  0  0
    x = torch.tensor([[0.], [1.], [2.], [3.], [0.], [0.]])
    y = torch.tensor([0, 1, 1, 3, 2, 0])
    assert accuracy(m, x, y) == pytest.approx(4 / 6)
    # Triggered set with target 0: the last sample (true class 0) is ignored; the other four have true labels
    # 1, 1, 3, 2 and predictions 1, 2, 3, 0 → ASR 1/4 (one sent to the target), RA 2/4 (two correct).
    x_trig = torch.tensor([[1.], [2.], [3.], [0.], [0.]])
    y_true = torch.tensor([1, 1, 3, 2, 0])
    assert attack_success_rate(m, x_trig, y_true, target=0) == pytest.approx(1 / 4)
    assert robust_accuracy(m, x_trig, y_true, target=0) == pytest.approx(2 / 4)
    r = evaluate(m, (x, y), (x_trig, y_true), target=0)
    assert r == pytest.approx({"acc": 4 / 6, "asr": 1 / 4, "ra": 2 / 4})
    assert m.training and m.bn.training, "each module's mode is restored"


def test_batching_and_empty():
    m = Lookup()
    x = torch.randint(0, 4, (1000, 1)).float()
    assert torch.equal(predict(m, x, batch_size=7), x[:, 0].long())
    assert math.isnan(attack_success_rate(m, x[:0], torch.zeros(0, dtype=torch.long), 0))


def test_frozen_submodule_stays_in_eval():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    m[1].eval()
    accuracy(m, torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    assert m.training and m[0].training and not m[1].training


# --------------------------------------------------------------------------------------------- smoothness
def _quadratic(eigs=(4.0, 2.0, 1.0, 0.5, 0.3, 0.1), seed=0):
    """Linear model + loss ½·mean (w·x)²  ⇒  H = XᵀX / N exactly; X built so that H = Q·diag(eigs)·Qᵀ."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (d ** 0.5) * torch.diag(torch.tensor(eigs, dtype=torch.float64).sqrt()) @ q.T  # N = d samples
    model = nn.Linear(d, 1, bias=False).double()
    loss_fn = lambda out, y: 0.5 * (out.squeeze(1) - y).pow(2).mean()  # noqa: E731
    y = torch.zeros(d, dtype=torch.float64)
    return model, x, y, loss_fn, x.T @ x / d


def test_lambda_max_on_quadratic():
    model, x, y, loss_fn, H = _quadratic()
    assert torch.allclose(torch.linalg.eigvalsh(H).max(), torch.tensor(4.0, dtype=torch.float64))
    lam = hessian_max_eigenvalue(model, x, y, loss_fn=loss_fn, iters=500, tol=1e-12, seed=0)
    assert lam == pytest.approx(4.0, rel=1e-8)
    # Hutchinson's estimate of this dense (non-diagonal) H is unbiased: close to Tr H = 7.9 with many probes.
    assert hessian_trace(model, x, y, loss_fn=loss_fn, samples=4000, seed=0, batch_size=500) == \
        pytest.approx(7.9, rel=0.03)


def test_lambda_max_diagonal_known():
    # Loss ½·Σ a_i w_i² through a custom loss: Hessian diag(a), λ_max = max a.
    a = torch.tensor([0.5, 3.0, 1.0, 2.9], dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    loss_fn = lambda out, y: 0.5 * (a * model.weight[0] ** 2).sum() + 0 * out.sum()  # noqa: E731
    x, y = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2)
    assert hessian_max_eigenvalue(model, x, y, loss_fn=loss_fn, iters=2000, tol=1e-12) == pytest.approx(3.0, rel=1e-4)
    assert hessian_trace(model, x, y, loss_fn=loss_fn, samples=3) == pytest.approx(float(a.sum()))


def _exact_hessian_trace(model, x, y):
    ps = [p for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in ps])
    shapes = [p.shape for p in ps]

    def loss_of(theta):
        chunks, i = {}, 0
        for (n, p), s in zip(model.named_parameters(), shapes):
            chunks[n] = theta[i:i + p.numel()].view(s)
            i += p.numel()
        out = torch.func.functional_call(model, chunks, (x,))
        return nn.functional.cross_entropy(out, y)

    return float(torch.autograd.functional.hessian(loss_of, flat).diagonal().sum())


def test_hutchinson_close_to_exact_trace_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    exact = _exact_hessian_trace(model, x, y)
    est = hessian_trace(model, x, y, samples=3000, seed=1)
    assert est == pytest.approx(exact, rel=0.05)
    assert hessian_trace(model, x, y, samples=50, seed=2) == hessian_trace(model, x, y, samples=50, seed=2)


def test_fisher_trace_func_equals_loop_and_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    model.train()
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 4, (10,))
    tf = fisher_trace(model, x, y, method="func", chunk_size=3)
    tl = fisher_trace(model, x, y, method="loop")
    assert tf == pytest.approx(tl, rel=1e-4)
    model.eval()
    manual = 0.0
    for n in range(10):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1]).backward()
        manual += sum(float(p.grad.pow(2).sum()) for p in model.parameters())
    assert tf == pytest.approx(manual / 10, rel=1e-4)
    model.train()
    assert model.training and model[1].training


def test_sharpness_dict_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = [b.clone() for b in model.buffers()]
    s = sharpness(model, x, y, iters=30, samples=10)
    assert set(s) == {"lambda_max", "trace_h", "trace_f", "loss"}
    assert s["lambda_max"] > 0 and s["trace_f"] > 0
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers())), "BN statistics untouched"



def _tiny_fp64(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,))


def test_hutchinson_probes_do_not_depend_on_batch_size():
    """The probes depend on seed and samples only: one at a time, in blocks of 7 (with a short last block) or all
    at once give the same estimate up to rounding."""
    model, x, y = _tiny_fp64()
    one = hessian_trace(model, x, y, samples=20, seed=3, batch_size=1)
    assert hessian_trace(model, x, y, samples=20, seed=3) == one                       # the default is one
    for b in (7, 20, 64):
        assert hessian_trace(model, x, y, samples=20, seed=3, batch_size=b) == pytest.approx(one, rel=1e-12)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            hessian_trace(model, x, y, samples=2, batch_size=bad)


def test_hutchinson_default_is_one_plain_double_backward_per_probe(monkeypatch):
    """The default path is PyHessian's (one plain double backward per probe, no vmap): the vmapped product was
    ~2× slower per probe on a conv net on the CPU (docs/peers.md)."""
    model, x, y = _tiny_fp64()
    calls = []
    real = torch.autograd.grad

    def spy(*a, **kw):
        calls.append(kw.get("is_grads_batched", False))
        return real(*a, **kw)
    monkeypatch.setattr(torch.autograd, "grad", spy)
    hessian_trace(model, x, y, samples=5)
    assert calls == [False] * 6                 # the gradient with its graph, then one product per probe


def test_hutchinson_matches_pyhessian_probe_for_probe():
    """Parity with PyHessian: on the same Rademacher probes its per-probe vᵀHv (pyhessian.utils) and ours agree to
    fp64 rounding, and its trace estimate is as close to the exact trace as ours."""
    pytest.importorskip("pyhessian")
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import group_product
    from pyhessian.utils import hessian_vector_product as pyh_hvp

    from fip_fast.evaluation.smoothness import _gradients_with_graph, _probe

    model, x, y = _tiny_fp64()
    ps = list(model.parameters())
    grads = _gradients_with_graph(model.eval(), x, y, None, ps)
    g = torch.Generator().manual_seed(11)
    probes = [_probe(ps, g) for _ in range(40)]
    theirs = [float(group_product(pyh_hvp(grads, ps, v), v)) for v in probes]
    assert hessian_trace(model, x, y, samples=40, seed=11) == pytest.approx(sum(theirs) / 40, rel=1e-12)
    exact = _exact_hessian_trace(model, x, y)
    torch.manual_seed(0)
    vhv = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=3000, tol=float("-inf"))
    model.zero_grad(set_to_none=True)
    assert len(vhv) == 3000 and sum(vhv) / 3000 == pytest.approx(exact, rel=0.05)
    assert hessian_trace(model, x, y, samples=3000, seed=1) == pytest.approx(exact, rel=0.05)


# --------------------------------------------------------------------------------------------- models evaluated here
@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)),
                                         ("preact_resnet18", (3, 32, 32)), ("resnet18", (1, 32, 32))])
def test_build_model_shapes(name, shape):
    from fip_fast.evaluation.models import build_model

    torch.manual_seed(0)
    m = build_model(name, num_classes=7, in_channels=shape[0])
    assert m(torch.rand((2,) + shape)).shape == (2, 7)


def test_build_model_import_string_and_errors():
    from fip_fast.evaluation.models import DemoCNN, build_model

    m = build_model("fip_fast.evaluation.models:DemoCNN", num_classes=3, in_channels=1, width=4)
    assert isinstance(m, DemoCNN) and m.classifier[-1].out_features == 3
    assert isinstance(build_model("torch.nn:Identity"), nn.Module)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg99")
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        build_model("fip_fast.evaluation.models:nothing")


def test_train_backdoored_is_deterministic():
    from fip_fast.evaluation.models import build_model
    from fip_fast.evaluation.train import train_backdoored

    x, y = torch.rand(48, 1, 12, 12), torch.arange(48) % 3
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("cnn", num_classes=3, width=4, hidden=8)
        runs.append(train_backdoored(m, x, y, epochs=2, batch_size=16, seed=5, progress=False))
    assert not runs[0].training
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)
