"""fip_fast.purify: the purification pipeline on a tiny synthetic backdoor (CPU, a few seconds each)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _resume import uninterrupted_and_resumed  # tests/ is on sys.path
from _synthetic import TinyCNN
from torch import nn

from fip_fast import pipeline as P
from fip_fast import spectral

TARGET = 0


def _images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes of 10×10 images: a bright 3×3 blob in a class-specific place, plus noise."""
    y = torch.randint(4, (n,), generator=g)
    x = 0.15 * torch.rand(n, 1, 10, 10, generator=g)
    pos = [(1, 1), (1, 5), (5, 1), (5, 4)]
    for i in range(n):
        r, c = pos[int(y[i])]
        dr, dc = torch.randint(0, 2, (2,), generator=g).tolist()
        x[i, 0, r + dr:r + dr + 3, c + dc:c + dc + 3] += 0.8
    return x.clamp(0, 1), y


def _trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -2:, -2:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return x


pytestmark = pytest.mark.usefixtures("one_thread")


def backdoored_tiny_cnn():
    """A TinyCNN with a 2×2 corner-patch backdoor (target 0) on [0, 1] images, the defender's clean set and a test
    set (seed 0; tests/test_holding.py purifies the same model)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = _images(600, g)
    xc, yc = _images(160, g)           # the defender's clean set
    xt, yt = _images(300, g)           # test
    xp, yp = x.clone(), y.clone()
    idx = torch.nonzero(y != TARGET).flatten()[:60]
    xp[idx], yp[idx] = _trigger(x[idx]), TARGET
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(10):
        perm = torch.randperm(xp.shape[0], generator=g)
        for i in range(0, xp.shape[0], 50):
            b = perm[i:i + 50]
            opt.zero_grad()
            F.cross_entropy(model(xp[b]), yp[b]).backward()
            opt.step()
    return model.eval(), (xc, yc), (xt, yt)


@pytest.fixture(scope="module")
def task(one_thread):
    model, (xc, yc), (xt, yt) = backdoored_tiny_cnn()
    keep = yt != TARGET
    trig = (_trigger(xt[keep]), yt[keep])
    return model, (xc, yc), (xt, yt), trig


def _metrics(model, test, trig):
    with torch.no_grad():
        model.eval()
        acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
        asr = (model(trig[0]).argmax(1) == TARGET).float().mean().item()
    return {"acc": acc, "asr": asr}


def test_synthetic_backdoor_is_planted(task):
    model, _, test, trig = task
    m = _metrics(model, test, trig)
    assert m["acc"] > 0.95 and m["asr"] > 0.9


@pytest.mark.parametrize("method", ["fip", "fast_fip"])
def test_purify_lowers_asr(task, method):
    model, clean, test, trig = task
    before = _metrics(model, test, trig)
    # Both at their shipped defaults (Fast FIP: clipped SGD on δ + the mixing band, docs/fast_fip_variants.md).
    m, rep = P.purify(copy.deepcopy(model), clean, method=method, steps=120, batch_size=32, progress=False)
    after = _metrics(m, test, trig)
    drop = 0.3
    assert after["asr"] < before["asr"] - drop, (before, after, rep.summary())
    assert after["acc"] > before["acc"] - 0.1, (before, after)


def test_report_fields(task):
    model, clean, test, trig = task
    calls = []

    def ev(m):
        calls.append(1)
        return _metrics(m, test, trig)

    m, rep = P.purify(copy.deepcopy(model), clean, method="fast_fip", steps=20, batch_size=16, eval_every=5,
                      eval_fn=ev, progress=False, val_fraction=0.2)
    d = rep.to_dict()
    for key in ("method", "config", "steps_run", "selected_step", "trainable_params", "total_params", "initial",
                "final", "history", "timings", "skipped_steps"):
        assert key in d
    assert rep.method == "fast_fip" and rep.steps_run == 20
    assert [h["step"] for h in rep.history] == [5, 10, 15, 20]
    assert all("eval" in h and "val_acc" in h and "train_loss" in h for h in rep.history)
    assert "eval" in rep.initial and "eval" in rep.final
    assert len(calls) == 4 + 2                   # every evaluation, θ0 and the returned model
    assert 0 < rep.trainable_params < rep.total_params / 10
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    for k in ("setup", "loop", "eval", "total"):
        assert rep.timings[k] >= 0
    assert rep.config["steps"] == 20 and rep.config["batch_size"] == 16
    assert rep.config["n_clean_train"] + rep.config["n_clean_val"] == clean[0].shape[0]
    import json
    json.dumps(d)                                # JSON-serializable


def test_fast_fip_merges_back(task):
    model, clean, _, _ = task
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    m, rep = P.purify(copy.deepcopy(model), clean, method="fast_fip", steps=10, batch_size=16, progress=False)
    assert not spectral.spectral_layers(m)                      # no δ, no spectral buffers, no hooks left
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    assert set(m.state_dict()) == set(model.state_dict())
    fresh = TinyCNN()
    fresh.load_state_dict(m.state_dict())       # loads into the original architecture
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert not m.training
    # Fast FIP moved the weights (through δ), not only biases.
    assert not torch.equal(m.fc1.weight, model.fc1.weight)


def test_full_fip_trains_all_parameters(task):
    model, clean, _, _ = task
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=5, batch_size=16, progress=False)
    assert rep.trainable_params == rep.total_params


def test_selection_never_uses_eval_fn(task):
    """The returned weights and the selected step do not depend on what eval_fn returns."""
    model, clean, _, _ = task
    kw = dict(method="fip", steps=30, batch_size=16, eval_every=5, progress=False, val_margin=0.0)
    m_ref, rep_ref = P.purify(copy.deepcopy(model), clean, **kw)
    counter = iter(range(10 ** 6))

    def adversarial(m):   # numbers that would look great at arbitrary steps if anything selected on them
        i = next(counter)
        return {"acc": float(i % 3 == 0), "asr": float(i % 2), "val_acc": 1.0 - i, "val_loss": -1e9 * i}

    m_adv, rep_adv = P.purify(copy.deepcopy(model), clean, eval_fn=adversarial, **kw)
    assert rep_adv.selected_step == rep_ref.selected_step
    for (k, a), b in zip(m_ref.state_dict().items(), m_adv.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["val_acc"] for h in rep_adv.history] == [h["val_acc"] for h in rep_ref.history]


def test_selection_rule_on_clean_val(task):
    """Latest acceptable evaluation (clean-val accuracy within the margin); never θ0."""
    model, clean, _, _ = task
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=20, batch_size=16, eval_every=5,
                      progress=False, val_margin=1.0, val_fraction=0.2)          # everything acceptable → the last step
    assert rep.selected_step == 20
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=20, batch_size=16, eval_every=5,
                      progress=False, val_margin=-1.0, patience=100)     # nothing acceptable → best val acc
    accs = {h["step"]: h["val_acc"] for h in rep.history}
    assert rep.selected_step in accs and accs[rep.selected_step] == max(accs.values())
    assert rep.selected_step > 0


@pytest.mark.parametrize("method", ["fip", "fast_fip"])
def test_resume_continues(task, tmp_path, method):
    model, clean, _, _ = task
    kw = dict(method=method, steps=24, batch_size=16, eval_every=4, progress=False, checkpoint_every=8)
    # θ0 + steps 4, 8, 12 → crash at the evaluation of step 16
    (m_full, rep_full), (m_res, rep_res) = uninterrupted_and_resumed(lambda: copy.deepcopy(model), clean, tmp_path,
                                                                     4, **kw)
    assert rep_res.resumed_from == 8
    assert rep_res.steps_run == 24
    assert [h["step"] for h in rep_res.history] == [4, 8, 12, 16, 20, 24]
    assert rep_res.selected_step == rep_full.selected_step
    for (k, a), b in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_without_checkpoint_starts_fresh(task, tmp_path):
    model, clean, _, _ = task
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=4, batch_size=16, progress=False,
                      checkpoint_dir=str(tmp_path), resume=True)
    assert rep.resumed_from == 0 and rep.steps_run == 4
    with pytest.raises(ValueError, match="checkpoint_dir"):
        P.purify(copy.deepcopy(model), clean, method="fip", steps=4, resume=True, progress=False)


def test_lagged_returns_unperturbed_weights(task):
    model, clean, _, _ = task
    m, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=12, batch_size=16, progress=False,
                      trace_estimator="lagged", eval_every=4, val_fraction=0.25)
    # The final clean-val metrics were measured on the returned weights: re-measuring gives the same numbers,
    # and they equal the history record of the selected (here: last) step, which was taken unperturbed.
    assert rep.selected_step == 12 or rep.history[-1]["acceptable"] is False
    if rep.selected_step == 12:
        assert rep.final["val_acc"] == pytest.approx(rep.history[-1]["val_acc"])
        assert rep.final["val_loss"] == pytest.approx(rep.history[-1]["val_loss"], rel=1e-5)


def test_registry_runner_and_loop(task):
    model, clean, _, _ = task
    got = {}

    def run_dummy(model, clean_data, steps=3, *, batch_size=8, seed=0, device=None, loss_fn=None, progress=True,
                  scale=1.0):
        got.update(steps=steps, n=clean_data[0].shape[0], scale=scale, seed=seed)
        return model, {"steps": steps, "trainable_params": 7, "note": "hi"}

    P.register_method("dummy_runner", run_dummy, defaults={"steps": 3}, overwrite=True)
    m, rep = P.purify(copy.deepcopy(model), clean, method="dummy_runner", steps=5, scale=2.0, progress=False,
                      val_fraction=0.2)
    assert got["steps"] == 5 and got["scale"] == 2.0 and got["n"] == rep.config["n_clean_train"]
    assert rep.trainable_params == 7 and rep.extra["note"] == "hi" and "val_acc" in rep.final

    @P.register_method("dummy_sgd", kind="loop", defaults={"steps": 4, "batch_size": 8, "lr": 0.01},
                       overwrite=True)
    def build(model, ctx, lr):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        return P.OptimizerPurifier(model, opt, loss_fn=ctx.loss_fn)

    m, rep = P.purify(copy.deepcopy(model), clean, method="dummy_sgd", progress=False)
    assert rep.steps_run == 4 and "dummy_sgd" in P.available_methods()
    with pytest.raises(ValueError, match="already registered"):
        P.register_method("dummy_sgd", run_dummy)
    with pytest.raises(ValueError, match="unknown purification method"):
        P.purify(copy.deepcopy(model), clean, method="no_such_method", progress=False)
    with pytest.raises(TypeError, match="no_such_option"):
        P.purify(copy.deepcopy(model), clean, method="fip", steps=2, no_such_option=1, progress=False)


def test_accepts_loader_and_dataset(task):
    model, clean, _, _ = task
    ds = torch.utils.data.TensorDataset(*clean)
    loader = torch.utils.data.DataLoader(ds, batch_size=40, shuffle=True)
    for data in (ds, loader):
        _, rep = P.purify(copy.deepcopy(model), data, method="fip", steps=2, batch_size=8, progress=False)
        assert rep.config["n_clean_train"] + rep.config["n_clean_val"] == clean[0].shape[0]


def test_resume_refuses_another_models_checkpoint(task, tmp_path):
    """Issue item 17: a checkpoint dir written for another θ0 / other options / other data is refused."""
    model, clean, _, _ = task
    kw = dict(method="fip", steps=8, batch_size=16, eval_every=4, progress=False, checkpoint_every=4,
              checkpoint_dir=str(tmp_path))
    P.purify(copy.deepcopy(model), clean, **kw)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc2.bias.add_(0.1)
    with pytest.raises(P.ResumeMismatchError, match=r"checkpoint_dir .*another model"):
        P.purify(other, clean, resume=True, **kw)
    with pytest.raises(P.ResumeMismatchError, match=r"options \(eta_F differ\)"):
        P.purify(copy.deepcopy(model), clean, resume=True, eta_F=0.5, **kw)
    with pytest.raises(P.ResumeMismatchError, match="clean data"):
        P.purify(copy.deepcopy(model), (clean[0][:-1], clean[1][:-1]), resume=True, **kw)
    _, rep = P.purify(copy.deepcopy(model), clean, resume=True, **kw)      # the same run resumes
    assert rep.resumed_from == 8


def _nan_in_training(out, y):
    """Cross-entropy, but NaN whenever the loss is back-propagated (train-mode steps): every step is skipped."""
    loss = F.cross_entropy(out, y)
    return loss * float("nan") if torch.is_grad_enabled() and out.requires_grad else loss


def test_skipped_step_keeps_batchnorm_statistics(task):
    """Issue item 15: a skipped step left the BatchNorm running statistics of its (NaN) forward pass."""
    from fip_fast.optim import FIP

    model, clean, _, _ = task
    m = copy.deepcopy(model)
    opt = FIP(m.parameters(), lr=1e-2)
    pur = P.OptimizerPurifier(m, opt)
    x = clean[0][:16].clone()
    x[0, 0, 0, 0] = float("inf")                    # NaN activations, NaN gradients: FIP skips the step
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pur.step(x, clean[1][:16])
    assert opt.skipped_steps == 1
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k          # parameters AND running_mean / running_var / num_batches
    pur.step(clean[0][:16], clean[1][:16])           # a good step still updates the statistics
    assert not torch.equal(m.bn.running_mean, before["bn.running_mean"])


def test_history_train_loss_is_nan_when_every_step_was_skipped(task):
    """Issue item 15: a record over steps that were all non-finite showed train loss 0.0."""
    import math

    model, clean, _, _ = task
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=4, batch_size=16, eval_every=2,
                      progress=False, loss_fn=_nan_in_training)
    assert rep.skipped_steps == 4
    assert all(math.isnan(h["train_loss"]) for h in rep.history), rep.history
    assert rep.to_dict()["history"][0]["train_loss"] is None


def test_report_warns_about_degenerate_clean_sets(task):
    """Issue item 19: single-class clean set, fewer samples than the batch size, an empty validation part."""
    model, clean, _, _ = task
    x, y = clean
    one = y == y[0]
    _, rep = P.purify(copy.deepcopy(model), (x[one], y[one]), method="fip", steps=2, batch_size=16,
                      progress=False)
    assert any("single class" in w for w in rep.warnings), rep.warnings
    _, rep = P.purify(copy.deepcopy(model), (x[:6], y[:6]), method="fip", steps=2, batch_size=16,
                      val_fraction=0.2, progress=False)
    assert any("fewer than the batch size 16" in w for w in rep.warnings), rep.warnings
    _, rep = P.purify(copy.deepcopy(model), (x[:1], y[:1]), method="fip", steps=2, batch_size=1,
                      val_fraction=0.2, progress=False)
    assert any("validation part is empty" in w for w in rep.warnings), rep.warnings
    assert rep.to_dict()["warnings"] == rep.warnings
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=2, batch_size=16, progress=False,
                      val_fraction=0.2)
    assert rep.warnings == []
    # the default "auto" hold-out: 160 samples are too few for a part that resolves the 3-point margin (unaugmented:
    # two steps of the default shifted batches wipe the model with no steps left to rebuild it, docs/holding.md)
    _, rep = P.purify(copy.deepcopy(model), clean, method="fip", steps=2, batch_size=16, progress=False,
                      augment="none")
    assert rep.config["n_clean_val"] == 0 and rep.config["n_clean_train"] == 160
    assert len(rep.warnings) == 1 and "val_fraction='auto'" in rep.warnings[0], rep.warnings


def test_auto_val_fraction_resolves_the_margin():
    """"auto" holds out 20 % exactly when that part is at least two samples of the margin wide."""
    from fip_fast.pipeline.data import resolve_val_fraction

    assert resolve_val_fraction("auto", 334, 0.03) == 0.2 and resolve_val_fraction("auto", 333, 0.03) == 0.0
    assert resolve_val_fraction("auto", 100, 0.1) == 0.2 and resolve_val_fraction("auto", 99, 0.1) == 0.0
    assert resolve_val_fraction("auto", 10, 0.0) == 0.2 and resolve_val_fraction("auto", 10, -0.05) == 0.2
    assert resolve_val_fraction(0.3, 10, 0.03) == 0.3 and resolve_val_fraction(None, 10, 0.03) == 0.0
    with pytest.raises(ValueError, match="'auto'"):
        resolve_val_fraction("half", 10, 0.03)


def test_no_import_cycle():
    """The pipeline does not import the baselines at import time, the baselines never import the pipeline, and
    the lazy registry still finds a baseline by name."""
    import sys
    import textwrap

    from _hang import run

    def fresh(code: str) -> None:
        r = run([sys.executable, "-c", textwrap.dedent(code)])
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr

    fresh("""
        import sys
        import fip_fast.pipeline
        assert "fip_fast.baselines" not in sys.modules, "importing the pipeline imported the baselines"
        print("ok")
    """)
    fresh("""
        import sys
        import fip_fast.baselines
        assert not [m for m in sys.modules if m.startswith("fip_fast.pipeline")], "the baselines imported the pipeline"
        print("ok")
    """)
    fresh("""
        import sys
        import torch
        from fip_fast.pipeline import available_methods, purify
        assert {"fip", "fast_fip", "ft", "ft_sam", "ngf", "salience_ar"} <= set(available_methods())
        assert "fip_fast.baselines" not in sys.modules       # listing the names imports nothing
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        x, y = torch.randn(40, 4), torch.arange(40) % 3
        _, rep = purify(net, (x, y), method="ft", steps=2, batch_size=8, progress=False)
        assert rep.method == "ft" and rep.steps_run == 2, rep
        print("ok")
    """)


def _code_lines(fn_node) -> int:
    """Lines of a function's source (decorators and signature included), its docstring excluded."""
    import ast

    start = min([fn_node.lineno] + [d.lineno for d in fn_node.decorator_list])
    n = fn_node.end_lineno - start + 1
    body = fn_node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        n -= body[0].end_lineno - body[0].lineno + 1
    return n


def test_purify_is_short_and_no_pipeline_function_is_long():
    """purify() wires the parts (≤ 60 lines of code); no function of fip_fast/pipeline/ exceeds 80 lines."""
    import ast
    import inspect
    import pathlib
    import textwrap

    import fip_fast.pipeline.run as run

    src = textwrap.dedent(inspect.getsource(run.purify))
    fn = ast.parse(src).body[0]
    assert _code_lines(fn) <= 60
    too_long = []
    for path in sorted(pathlib.Path(run.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node)
                if n > 80:
                    too_long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not too_long, too_long


def test_entry_point_plugins_register_lazily(monkeypatch, task):
    """A ``fip_fast.methods`` entry point is called (no arguments) on the first lookup of an unknown name."""
    import importlib.metadata

    from fip_fast.pipeline import registry

    calls = []

    def plugin():
        calls.append(1)
        P.register_method("ep_dummy", lambda model, clean, steps=1, **kw: (model, {"steps": steps}),
                          description="an entry-point plug-in", overwrite=True)

    class EP:
        name, value = "ep_dummy", "tests:plugin"

        def load(self):
            return plugin

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [EP()] if group ==
                        registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    try:
        assert P.get_method("fip").kind == "loop" and not calls      # a known name does not load plug-ins
        spec = P.get_method("EP_DUMMY")
        assert calls == [1] and spec.description == "an entry-point plug-in"
        model, clean, _, _ = task
        _, rep = P.purify(copy.deepcopy(model), clean, method="ep_dummy", steps=3, progress=False)
        assert rep.steps_run == 3 and calls == [1]
    finally:
        registry._METHODS.pop("ep_dummy", None)


def test_selection_policy():
    """Latest acceptable evaluation; the best one while none is acceptable; patience below a0 − 2·margin."""
    from fip_fast.pipeline.selection import Selection

    net = nn.Linear(2, 2)
    s = Selection(a0=0.9, margin=0.03, patience=2, has_val=True)
    assert not s.observe(10, 0.80, net, last=False) and s.step == 10 and s.weights is not None and s.below == 1
    assert not s.observe(20, 0.75, net, last=False) and s.step == 10 and s.should_stop()
    assert s.observe(30, 0.88, net, last=True) and s.step == 30 and s.weights is None and s.below == 0
    assert not s.observe(40, 0.86, net, last=False) and s.step == 30 and s.below == 0   # not below a0 − 2·margin
    t = Selection(a0=0.5, margin=0.03, patience=2, has_val=True)
    t.load_state_dict(s.state_dict(), torch.device("cpu"))
    assert (t.step, t.acceptable, t.acc, t.below) == (30, True, 0.88, 0)


def test_fip_head_reinit_reinitializes_the_head_and_drops_its_anchor():
    """``head="reinit"`` (ours): the last Linear is re-drawn from the seed, its F0 is zero (no anchor toward the
    backdoored head), every other parameter keeps its weights and its F0."""
    from fip_fast.baselines.fst import reinit_head_
    from fip_fast.pipeline.methods import DEFAULTS, build_fip
    from fip_fast.pipeline.purifier import MethodContext

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    ctx = MethodContext(x, y, torch.device("cpu"), F.cross_entropy, 5, False)
    o = {k: v for k, v in DEFAULTS["fip"].items()
         if k not in ("steps", "batch_size", "lr", "rho", "patience", "lr_schedule", "augment")}   # the loop's
    o["eta_r"] = 1.0                                  # an anchor, whatever the shipped default
    pur = build_fip(net, ctx, lr=0.01, rho=0.5, head="reinit", **o)
    expect = copy.deepcopy(ref[2])
    reinit_head_(expect, seed=5)
    assert torch.equal(net[2].weight, expect.weight) and not torch.equal(net[2].weight, ref[2].weight)
    assert torch.equal(net[0].weight, ref[0].weight)
    st = pur.optimizer.state
    assert float(st[net[2].weight]["fisher0"].abs().sum()) == 0.0
    assert float(st[net[0].weight]["fisher0"].abs().sum()) > 0.0
    with pytest.raises(ValueError, match="head"):
        build_fip(copy.deepcopy(ref), ctx, lr=0.01, rho=0.5, head="fresh", **o)


def test_loop_schedules_warm_up_and_cycle():
    """``lr_schedule="onecycle"`` warms up over the first 10 % of the steps (from 1/25) and then decays as the
    cosine; ``"cyclic"`` rises to the peak at each half-cycle; an unknown name is refused before any work."""
    import math

    from fip_fast.pipeline.loop import schedule_factor

    T = 100
    assert schedule_factor("onecycle", 0, T) == pytest.approx(1 / 25)
    assert schedule_factor("onecycle", 9, T) == pytest.approx(1.0)
    assert schedule_factor("onecycle", 10, T) == pytest.approx(1.0)
    assert schedule_factor("onecycle", 55, T) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(schedule_factor("onecycle", t, T) < schedule_factor("onecycle", t + 1, T) for t in range(9))
    assert schedule_factor("cyclic", 25, T) == pytest.approx(1.0) == schedule_factor("cyclic", 75, T)
    assert schedule_factor("cyclic", 0, T) == pytest.approx(0.01)
    assert schedule_factor("cosine", 50, T) == pytest.approx(0.5)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    data = (torch.randn(40, 4), torch.randint(0, 3, (40,)))
    seen = []
    orig = P.loop.PurifyLoop._train_step

    def spy(self, step):
        orig(self, step)
        seen.append(self._groups[0]["lr"])

    P.loop.PurifyLoop._train_step = spy
    try:
        P.purify(net, data, method="fip", steps=10, batch_size=8, lr=0.1, lr_schedule="onecycle", progress=False)
    finally:
        P.loop.PurifyLoop._train_step = orig
    assert seen[0] == pytest.approx(0.1 / 25) and max(seen) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        P.purify(net, data, method="fip", steps=2, lr_schedule="triangle", progress=False)


@pytest.mark.parametrize("method", ["fip", "fast_fip"])
def test_channels_last_model_and_data_train_in_channels_last(method):
    """docs/purify.md's CPU tip: a channels_last model given channels_last clean images trains on channels_last
    batches (the loop indexes the clean tensor, which keeps the layout) and purifies as in NCHW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).to(memory_format=torch.channels_last)
    x = torch.rand(48, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.arange(48) % 4
    layouts = []

    def record(mod, args):
        if mod.training and torch.is_grad_enabled():
            layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)
                           and not args[0].is_contiguous())
    model[0].register_forward_pre_hook(record)
    _, rep = P.purify(model, (x, y), method=method, steps=3, batch_size=16, val_fraction=0, progress=False,
                      augment="none", universal_perturbation=None, distill=None)
    assert rep.steps_run == 3 and layouts and all(layouts)
