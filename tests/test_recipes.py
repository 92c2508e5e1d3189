"""fip_fast.recipes: one source of truth for the FIP settings that purify — the pipeline's defaults, the plain loop
of examples/optimizer_loop.py, and what happens with the optimizer's constructor defaults in that same loop."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from _synthetic import make_task  # tests/ is on sys.path
from torch import nn

import fip_fast
from fip_fast import estimate_fisher
from fip_fast import pipeline as P
from fip_fast.recipes import PURIFY, FIPRecipe

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "optimizer_loop.py"

#: The pipeline's defaults as they were written out in fip_fast/pipeline/methods.py before they were read from
#: the recipe: reading them from PURIFY must not change a single value.
FIP_DEFAULTS_BEFORE = dict(
    steps=300, batch_size=64, lr=0.05, momentum=0.9, eta_F=0.005, eta_r=0.0, rho=0.5, max_mix=1.0,
    trace_every=1, trace_estimator="fd", weight_decay=0.03, patience=0, lr_schedule="onecycle",
)
FAST_FIP_DEFAULTS_BEFORE = dict(
    steps=150, batch_size=64, lr=0.1, momentum=0.9, eta_F=0.005, eta_r=0.0, rho=0.5, max_mix=1.0,
    trace_every=1, trace_estimator="fd", weight_decay=0.01, patience=0,
    lr_delta=0.5, rho_delta=2.0, relative=True, rank=None, fast_fip_extra="bias_bn",
    delta_optimizer="sgd", clip_norm=0.3, mix_band=8,
)
#: The pipeline-only options of both (docs/holding.md).
HOLD = dict(universal_perturbation="auto", distill="auto", augment="auto")
#: FIP's in the pipeline: the patch beside δ, and the weight decay chosen with it (docs/holding.md).
FIP_PIPELINE = dict(HOLD, universal_perturbation={"inputs": "auto", "patch": 0.02}, weight_decay=0.02)


def _example():
    spec = importlib.util.spec_from_file_location("optimizer_loop", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def task(one_thread):
    t = make_task(seed=0)
    assert t.asr() > 0.9 and t.acc() > 0.95, "the synthetic backdoor was not planted"
    return t


def test_pipeline_defaults_are_the_recipe():
    """The pipeline's FIP defaults are read from PURIFY (identical values to the ones written out before), and
    Fast FIP shares PURIFY's suppressor, momentum and batch size."""
    from fip_fast.pipeline.methods import DEFAULTS

    # the universal perturbation, the distillation and the augmentation (options of the pipeline, not of the
    # optimizer) joined both on 2026-12-07; then FIP's perturbation took the patch, with less weight decay
    assert DEFAULTS["fip"] == dict(FIP_DEFAULTS_BEFORE, **FIP_PIPELINE)
    # ... and the protocol's rule re-chose Fast FIP's lr_delta with them (0.5 → 1.0, protocol_dev.md)
    # (Fast FIP's perturbation: the "auto" rule with the share constant through the rebuild)
    assert DEFAULTS["fast_fip"] == dict(FAST_FIP_DEFAULTS_BEFORE, **dict(
        HOLD, universal_perturbation={"inputs": "auto", "schedule": "constant"}), lr_delta=1.0)
    assert {k: DEFAULTS["fip"][k] for k in PURIFY.pipeline_options()} == dict(PURIFY.pipeline_options(),
                                                                             weight_decay=0.02)
    for k in ("momentum", "eta_F", "eta_r", "rho", "max_mix", "trace_every", "trace_estimator", "batch_size"):
        assert DEFAULTS["fast_fip"][k] == getattr(PURIFY, k), k
    assert fip_fast.recipes.PURIFY is PURIFY and "recipes" in fip_fast.__all__


def test_pipeline_follows_a_changed_recipe(monkeypatch):
    """One source of truth, not two equal copies: methods.py builds DEFAULTS from the recipe object."""
    import importlib

    import fip_fast.pipeline.methods as methods
    import fip_fast.recipes as recipes

    monkeypatch.setattr(recipes, "PURIFY", PURIFY.replace(eta_F=0.004, lr=0.07))
    try:
        fresh = importlib.reload(methods)
        assert fresh.DEFAULTS["fip"]["eta_F"] == 0.004 and fresh.DEFAULTS["fip"]["lr"] == 0.07
        assert fresh.DEFAULTS["fast_fip"]["eta_F"] == 0.004
    finally:
        monkeypatch.undo()
        importlib.reload(methods)
    assert methods.DEFAULTS["fip"] == dict(FIP_DEFAULTS_BEFORE, **FIP_PIPELINE)


def test_recipe_optimizer_equals_the_pipelines():
    """PURIFY.optimizer() and the pipeline's build_fip give FIP optimizers with the same hyper-parameters but the
    weight decay the pipeline chose with its patch (0.02: the recipe's .replace)."""
    from fip_fast.pipeline.methods import DEFAULTS, build_fip
    from fip_fast.pipeline.purifier import MethodContext

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    o = dict(DEFAULTS["fip"])
    for k in ("steps", "batch_size", "patience", "lr_schedule", "augment"):
        o.pop(k)
    ctx = MethodContext(torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.device("cpu"), F.cross_entropy, 0, False)
    built = build_fip(copy.deepcopy(net), ctx, **o).optimizer
    mine = PURIFY.replace(weight_decay=0.02).optimizer(net.parameters())
    drop = {"params"}
    assert {k: v for k, v in built.param_groups[0].items() if k not in drop} == \
        {k: v for k, v in mine.param_groups[0].items() if k not in drop}


def test_recipe_scheduler_is_the_loops_schedule():
    """The learning rate of PURIFY.scheduler at every step equals what fip_fast.purify sets in its loop."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    data = (torch.randn(40, 4), torch.randint(0, 3, (40,)))
    recipe = PURIFY.replace(steps=20, batch_size=8)
    seen = []
    orig = P.loop.PurifyLoop._train_step

    def spy(self, step):
        orig(self, step)
        seen.append(self._groups[0]["lr"])      # the rate the loop set for this step

    monkey = pytest.MonkeyPatch()
    monkey.setattr(P.loop.PurifyLoop, "_train_step", spy)
    try:
        P.purify(copy.deepcopy(net), data, method="fip", steps=recipe.steps, batch_size=recipe.batch_size,
                 progress=False)
    finally:
        monkey.undo()
    opt = recipe.optimizer(net.parameters())
    sched = recipe.scheduler(opt)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(data[0]), data[1])
        loss.backward()
        return loss

    mine = []
    for _ in range(recipe.steps):
        mine.append(opt.param_groups[0]["lr"])
        opt.step(closure)
        sched.step()
    assert len(seen) == recipe.steps
    assert mine == pytest.approx(seen, rel=1e-12)
    assert mine[0] == pytest.approx(PURIFY.lr / 25) and max(mine) == pytest.approx(PURIFY.lr)


def test_recipe_refuses_bad_values():
    with pytest.raises(ValueError, match="lr"):
        FIPRecipe(lr=-1.0)
    with pytest.raises(ValueError, match="steps"):
        PURIFY.replace(steps=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        PURIFY.replace(lr_schedule="triangle")
    with pytest.raises(ValueError, match="momentum"):
        PURIFY.replace(momentum=1.5)
    with pytest.raises(ValueError, match="trace_estimator"):
        PURIFY.replace(trace_estimator="hutchinson")
    with pytest.raises(dataclasses.FrozenInstanceError):
        PURIFY.lr = 1.0
    net = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="dataclasses.replace"):
        PURIFY.optimizer(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fisher0"):
        PURIFY.replace(eta_r=1.0).optimizer(net.parameters())
    with pytest.raises(ValueError, match="steps"):
        PURIFY.scheduler(PURIFY.optimizer(net.parameters()), steps=0)


def test_optimizer_loop_example_purifies(task):
    """The snippet of examples/optimizer_loop.py (the README's optimizer loop), run as it is on a synthetic
    backdoor: ASR from > 90 % to < 20 %, clean accuracy within 5 points."""
    acc0, asr0 = task.acc(), task.asr()
    model = _example().purify_in_a_loop(copy.deepcopy(task.model), task.clean_x, task.clean_y)
    acc, asr = task.acc(model), task.asr(model)
    assert asr0 > 0.9 and asr < 0.2, (asr0, asr)
    assert acc > acc0 - 0.05, (acc0, acc)


def test_constructor_defaults_do_not_purify_in_that_loop(task):
    """Why the recipe exists: FIP's constructor values (the authors' lr 5e-3, momentum 0.95, η_F 1e-3, ρ 0.05, the
    suppressor every 5th call, the anchor η_r 1 on a max-normalized F0 — the optimizer snippet the README showed
    before the recipe), in the same loop and budget, leave the backdoor (measured: ASR 100 % on seeds 0–2 of this
    task; PURIFY 0–0.7 %)."""
    authors = PURIFY.replace(lr=5e-3, momentum=0.95, eta_F=1e-3, rho=0.05, trace_every=5, weight_decay=0.0,
                             eta_r=1.0, lr_schedule="constant")
    model = copy.deepcopy(task.model)
    f0 = estimate_fisher(model, [(task.clean_x, task.clean_y)], normalize="max")
    model = _example().purify_in_a_loop(model, task.clean_x, task.clean_y, recipe=authors, fisher0=f0)
    assert task.asr(model) > 0.5, task.asr(model)
