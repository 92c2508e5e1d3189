"""Smoke test of the benchmarks (issue 6): ``python -m bench ops --quick`` and ``python -m bench end_to_end
--quick`` run on tiny sizes and write JSON of the documented schema; ``python -m bench report`` turns it into
markdown.  Timings are not checked (CI machines are noisy)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _hang import communicate

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    out, _ = communicate(proc, "python -m bench " + " ".join(proc.args[3:]))
    assert proc.returncode == 0, out
    return out


ENV_KEYS = {"schema", "device", "versions", "date", "load_before", "load_after", "quick", "config"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    ops_json, e2e_json = tmp / "ops.json", tmp / "e2e.json"
    # Both at once: the two commands are independent and CI time is the sum otherwise.
    p1 = _run(["ops", "--quick", "--silent", "--out", str(ops_json)], tmp)
    p2 = _run(["end_to_end", "--quick", "--silent", "--out", str(e2e_json), "--no-cache"], tmp)
    _wait(p1), _wait(p2)
    return json.loads(ops_json.read_text()), json.loads(e2e_json.read_text()), tmp


def test_ops_quick_schema(quick_results):
    ops, _, _ = quick_results
    assert ENV_KEYS <= ops.keys() and ops["schema"] == "fip_fast.bench.ops/1" and ops["quick"] is True
    assert ops["device"]["type"] in ("cpu", "cuda") and ops["versions"]["torch"]
    bw = ops["copy_bandwidth"]
    assert bw["gbps"] > 0 and bw["median_s"] > 0
    assert {"fisher_accumulate_", "global_norm", "perturb_", "fip_step_/plain", "fip_step_/fd_mix",
            "fip_step_/lagged"} <= ops["bytes_accounting"].keys()
    assert {"reference", "foreach", "triton", "cuda"} <= ops["impls"].keys()
    for name, info in ops["impls"].items():
        assert info["available"] or info["reason"], name          # every skip says why
    res = ops["results"]
    seen = {(r["op"], r.get("variant")) for r in res if r["status"] == "ok"}
    assert {("fisher_accumulate_", None), ("global_norm", None), ("perturb_", None), ("fip_step_", "plain"),
            ("fip_step_", "fd_mix"), ("fip_step_", "lagged"), ("spectral_weight", None),
            ("spectral_linear_grad", None)} <= seen
    assert not [r for r in res if r["status"] == "error"], [r for r in res if r["status"] == "error"]
    for r in res:
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "ok":
            assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
            if r["bytes_per_elem"]:
                assert r["bytes"] == r["bytes_per_elem"] * r["numel"] and r["gbps"] > 0 and r["pct_copy_bw"] > 0
            if r.get("max_abs_err_vs_reference") is not None:
                assert r["max_abs_err_vs_reference"] < 1e-3, r        # every impl computes the same op
    assert {h["optimizer"] for h in ops["host_step"]} >= {"sgd_foreach", "fip_plain", "fip_lagged", "fip_fd"}
    mocked = [h for h in ops["host_step"] if h["impl"] == "triton (launch mocked)"]
    assert mocked and all(h.get("per_step_median_s", 0) > 0 for h in mocked), mocked


def test_whole_step_compares_fip_with_sgd():
    import torch

    from bench.ops.whole_step import time_whole_step

    impls = {"foreach": dict(available=True), "reference": dict(available=False)}
    timing = dict(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    out = time_whole_step(dict(shapes=[(3, 4), (5,)]), impls, torch.device("cpu"), timing)
    assert [(r["optimizer"], r["impl"]) for r in out] == [("sgd_foreach", "foreach"), ("fip", "foreach")]
    assert all(r["median_s"] > 0 and r["vs_sgd"] > 0 for r in out)


def test_end_to_end_quick_schema(quick_results):
    _, e2e, _ = quick_results
    assert ENV_KEYS <= e2e.keys() and e2e["schema"] == "fip_fast.bench.end_to_end/1"
    sec, = e2e["step_time"]
    assert {m["method"] for m in sec["methods"]} == {"sgd", "fip_fd", "fip_lagged", "fip_batch", "fast_fip"}
    for m in sec["methods"]:
        assert m["mean_step_s"] > 0 and m["cycle_p20_s"] <= m["cycle_median_s"] <= m["cycle_p80_s"]
        assert m["trainable"] > 0
    fast = next(m for m in sec["methods"] if m["method"] == "fast_fip")
    full = next(m for m in sec["methods"] if m["method"] == "fip_fd")
    assert fast["trainable"] < full["trainable"]
    tta = e2e["time_to_asr"]
    assert tta["asr_threshold"] == 0.05 and len(tta["methods"]) == 5
    for m in tta["methods"]:
        assert isinstance(m["reached"], bool) and m["steps"] >= 1 and 0.0 <= m["asr"] <= 1.0


def test_report_markdown(quick_results):
    ops, e2e, tmp = quick_results
    from bench.report import markdown_for
    md_ops, md_e2e = markdown_for(ops), markdown_for(e2e)
    assert "copy bandwidth" in md_ops.lower() and "| fip_step_/fd_mix |" in md_ops
    assert "Per-step time" in md_e2e and "ASR" in md_e2e


def test_dispatcher_lists_commands():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and "ops" in out.stdout and "end_to_end" in out.stdout


def test_fast_fip_quick_schema(tmp_path):
    """``python -m bench fast_fip --quick``: the three sections with every variant, paired ratios, GEMM counts."""
    out = tmp_path / "ff.json"
    _wait(_run(["fast_fip", "--quick", "--out", str(out)], tmp_path))
    d = json.loads(out.read_text())
    assert d["schema"] == "fip_fast.bench.fast_fip/1" and d["quick"] is True
    assert set(d["cnn"]["variants"]) == set(d["stack"]["variants"]) == {"fip", "inplace", "inplace_delta_only",
                                                                         "reference"}
    assert {"frozen_linear", "inplace", "inplace+update", "trainable_linear", "reference"} == set(
        d["layer"]["variants"])
    for sec, base in (("cnn", "fip"), ("stack", "fip"), ("layer", "frozen_linear")):
        for v in d[sec]["variants"].values():
            for key in ("cpu_s", "wall_s", "ratio_cpu", "ratio_wall"):
                assert v[key]["p20"] <= v[key]["median"] <= v[key]["p80"]
        assert d[sec]["variants"][base]["ratio_cpu"]["median"] == 1.0
    v = {k: x["trainable"] for k, x in d["cnn"]["variants"].items()}
    assert v["inplace_delta_only"] == v["reference"] < v["inplace"] < v["fip"]     # the default adds the band
    assert all(g["counts"]["fip"] > 0 for g in d["gemms"].values())
    assert "GEMM count" in out.with_suffix(".md").read_text()


def test_trigger_probe_statistics():
    """``bench.trigger_probe``: the clean spread is 0 along a direction the rows never vary in, ≈ 1 for an
    isotropic cloud, large along the main axis; the head features are the last Linear layer's input."""
    import torch

    from bench.trigger_probe import head_features, relative_spread

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 4, generator=g)
    assert abs(relative_spread(X, torch.tensor([1.0, 1.0, 0.0, 0.0])) - 1.0) < 0.1
    X[:, 3] = 0.0                                                 # never varies along e3
    assert relative_spread(X, torch.tensor([0.0, 0.0, 0.0, 2.0])) == 0.0
    X[:, 0] *= 10.0
    assert relative_spread(X, torch.tensor([1.0, 0.0, 0.0, 0.0])) > 3.0
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(7, 3, generator=g)
    h = head_features(model, x, batch=3)
    assert h.shape == (7, 5) and torch.allclose(h, model[1](model[0](x)).detach())
    assert not model[2]._forward_hooks                            # the hook is removed


def test_peers_quick_schema(tmp_path):
    """``python -m bench peers --quick``: every row of issue 30's table, both sides timed (or the peer skipped with
    the reason), paired ratios with their spread, the peer's version, the load before and after."""
    out = tmp_path / "peers.json"
    _wait(_run(["peers", "--quick", "--out", str(out)], tmp_path))
    d = json.loads(out.read_text())
    assert d["schema"] == "fip_fast.bench.peers/1" and d["quick"] is True
    assert d["env"]["load_before"] is not None and d["env"]["load_after"] is not None
    assert {r["group"] for r in d["rows"]} == {"optimizer", "fisher_cnn", "fisher_tokens", "hutchinson", "fast_fip"}
    for r in d["rows"]:
        assert r["status"] in ("ok", "skipped") and r["goal"] and r["unit"].startswith("per "), r
        if r["status"] == "skipped":
            assert r["reason"], r                                     # every skip says why
            continue
        for key in ("ours_cpu_s", "peer_cpu_s", "ours_wall_s", "peer_wall_s", "ratio_cpu", "ratio_wall"):
            s = r[key]
            assert 0 < s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"], (key, r)
    ok = {(r["group"], r["peer"].split("(")[0]) for r in d["rows"] if r["status"] == "ok"}
    assert {("optimizer", "torch.optim.AdamW"), ("optimizer", "torch.optim.SGD"), ("fast_fip", "full FIP ")} <= ok
    assert "| work | ours | peer (version) |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("method", ["fip", "fast_fip"])
def test_holding_cost_purifies_a_copy(method):
    """bench.holding_cost times every variant on the same backdoored model: each purification works on a copy, so
    the task's model leaves a timing run unchanged (purify works in place on the model it is given)."""
    import copy
    from types import SimpleNamespace

    import torch
    from _synthetic import small_cnn

    from bench.holding_cost import _one

    torch.manual_seed(0)
    task = SimpleNamespace(model=small_cnn(), clean=(torch.rand(64, 1, 10, 10), torch.arange(64) % 4))
    before = copy.deepcopy(task.model.state_dict())
    assert _one(task, method, {}, steps=2) > 0
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_peers_unguarded_diagnostic_matches_and_restores():
    """The bench's guard-off diagnostic (``bench.peers.fisher._without_guard``) computes the shipped estimator's squares
    and puts torch.autograd.grad and the guard back afterwards."""
    import torch

    from bench.peers.fisher import SmallCNN, _without_guard
    from fip_fast import estimate_fisher
    from fip_fast._fisher_capture import _HookCapture

    torch.manual_seed(0)
    m = SmallCNN(4).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    want = estimate_fisher(m, [(x, y)], estimator="per_sample")
    grad, flush, x_leaf = torch.autograd.grad, _HookCapture.flush, x.clone().requires_grad_()
    with _without_guard(x_leaf):
        got = estimate_fisher(m, [(x_leaf, y)], estimator="per_sample")
        assert torch.autograd.grad is not grad
    assert torch.autograd.grad is grad and _HookCapture.flush is flush
    for p in m.parameters():
        torch.testing.assert_close(got[p], want[p])
