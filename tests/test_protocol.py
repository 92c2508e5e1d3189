"""The fair protocol (bench/protocol.py): the selection rule, the report, one run end to end on a tiny cell."""
from __future__ import annotations

import json

import pytest
import torch

import bench.protocol as P
import bench.protocol_ablations as A
import bench.protocol_tasks as T
from bench.protocol_report import _dominates, _pareto, eval_md, write_report


def _dev_doc(acc_by_point):
    """A development JSON: backdoored ACC 0.97 in every dev cell; method 'ft' at grid point i has ACC
    ``acc_by_point[i]`` (and ASR 0 at the strongest point — which the rule must not look at)."""
    runs = {}
    for c in P.DEV_CELLS:
        runs[P.run_key(c, None, {})] = {"cell": c.key, "method": "before", "cfg": {}, "acc": 0.97, "asr": 1.0,
                                        "ra": 0.0}
        for i, cfg in enumerate(P.GRIDS["ft"]):
            runs[P.run_key(c, "ft", cfg)] = {"cell": c.key, "method": "ft", "cfg": cfg, "acc": acc_by_point[i],
                                             "asr": 0.0 if i == len(P.GRIDS["ft"]) - 1 else 0.9, "ra": 0.1}
    return {"runs": runs}


def test_rule_takes_the_strongest_point_within_the_margin_and_ignores_asr():
    n = len(P.GRIDS["ft"])
    accs = [0.97, 0.965, 0.955, 0.951, 0.94, 0.5][:n]
    chosen = P.choose(_dev_doc(accs))
    # 0.97 − 0.02 = 0.95: the last point with mean ACC ≥ 0.95 is index 3 (0.951); index 5 has ASR 0 but ACC 0.5.
    assert chosen["ft"]["index"] == 3 and chosen["ft"]["cfg"] == P.GRIDS["ft"][3]
    # Methods with no runs fall back to their weakest point.
    assert chosen["fip"]["index"] == 0


def test_rule_needs_every_dev_cell():
    doc = _dev_doc([0.97] * len(P.GRIDS["ft"]))
    k = next(k for k, r in doc["runs"].items() if r["method"] == "ft" and r["cfg"] == P.GRIDS["ft"][-1])
    del doc["runs"][k]                          # the strongest point misses one cell: not eligible
    assert P.choose(doc)["ft"]["index"] == len(P.GRIDS["ft"]) - 2


def test_grids_same_size_and_eval_cells_disjoint_from_dev():
    sizes = {len(g) for g in P.GRIDS.values()}
    assert sizes == {6} and set(P.GRIDS) == set(P.METHODS)
    dev_seeds = {c.seed for c in P.DEV_CELLS}
    assert not dev_seeds & {c.seed for c in P.EVAL_CELLS}
    assert len(P.EVAL_CELLS) == 120 and set(P.QUICK_CELLS) <= set(P.EVAL_CELLS)
    assert not {c.seed for c in P.DEV_TINY_CELLS} & {c.seed for c in P.EVAL_CELLS}
    assert {c.clean for c in P.DEV_TINY_CELLS} == {0.02}


def test_heldout_cells_are_the_textured_digits_and_run_the_frozen_choices():
    """The held-out stage runs each method's frozen configuration on the three-channel textured digits; the MNIST
    cells' keys (which index every recorded run and cached model) do not change with the data field."""
    mnist = T.Cell("cnn", "badnets", 0, 0.1, 0.1)
    assert mnist.key == "cnn/badnets/s0/c0.1/p0.1/t0" and mnist.model_key == "cnn/badnets/s0/p0.1/t0/e8"
    assert mnist.benign_key == "cnn/benign/s0/e8" and mnist.channels == 1
    tex = T.Cell("cnn", "badnets", 0, 0.1, 0.1, data="textures")
    assert tex.key == mnist.key + "/textures" and tex.model_key == mnist.model_key + "/textures"
    assert tex.benign_key == mnist.benign_key + "/textures" and tex.channels == 3
    assert T.build_arch("resnet", tex.channels)(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    frozen = {m: {"cfg": {"mark": m}} for m in P.METHODS}
    jobs = P.stage_jobs("heldout", False, frozen)
    assert {c for c, _, _ in jobs} == set(P.HELDOUT_CELLS) and all(c.data == "textures" for c, _, _ in jobs)
    assert all(cfg == {"mark": m} for _, m, cfg in jobs if m is not None)
    assert len(jobs) == len(P.HELDOUT_CELLS) * (1 + len(P.METHODS))
    with pytest.raises(ValueError, match="unknown data 'cifar'"):
        T._split(T.Cell("cnn", "badnets", 0, 0.1, 0.1, data="cifar"))


def test_ablate_report_separates_the_clean_set_sizes():
    from bench.protocol_report import ablate_md

    name, (m, cfg) = next(iter(A.TINY_ABLATIONS.items()))
    runs = {}
    for c, asr in ((P.DEV_TINY_CELLS[0], 0.25), (P.DEV_CELLS[0], 0.75)):
        runs[P.run_key(c, None, {})] = {"cell": c.key, "method": "before", "cfg": {}, "acc": 0.97, "asr": 1.0,
                                        "ra": 0.0, "retune_asr": 1.0}
        runs[P.run_key(c, m, cfg)] = {"cell": c.key, "method": m, "cfg": cfg, "acc": 0.9, "asr": asr, "ra": 0.5,
                                      "retune_asr": 0.5, "wall_s": 1.0}
    rows = [r for r in ablate_md({"runs": runs}) if r.startswith(f"| {name} |")]
    # the 10 % cell apart; the milder attack's column '–' for runs made before it existed
    assert rows == [f"| {name} | cnn | 0.02 | 90.0 | 25.0 | 50.0 | 50.0 | – | 1.0 |"], rows
    for r in runs.values():
        r["retune_mild_asr"] = 0.2
    rows = [r for r in ablate_md({"runs": runs}) if r.startswith(f"| {name} |")]
    assert rows == [f"| {name} | cnn | 0.02 | 90.0 | 25.0 | 50.0 | 50.0 | 20.0 | 1.0 |"], rows


def test_seeded_holding_variants_pool_over_their_seeds(monkeypatch):
    """_seeds names n runs of one configuration that differ only in the bench-only SEED_OFFSET, and seeds_md pools
    them (mean over cells × seeds, ΔACC against each cell's backdoored model)."""
    from bench.protocol_report import seeds_md

    table = A._seeds("v", "fip", {"lr": 0.05})
    assert list(table) == ["v", "v (purification seed +1)", "v (purification seed +2)"]
    assert [cfg.get(P.SEED_OFFSET, 0) for _, cfg in table.values()] == [0, 1, 2]
    monkeypatch.setattr(A, "HOLDING_ABLATIONS", table)
    runs = {}
    for c in (P.DEV_CELLS[0], P.DEV_TINY_CELLS[0]):
        runs[P.run_key(c, None, {})] = {"cell": c.key, "method": "before", "cfg": {}, "acc": 0.97}
        for i, (m, cfg) in enumerate(table.values()):
            runs[P.run_key(c, m, cfg)] = {"cell": c.key, "method": m, "cfg": cfg, "acc": 0.90 + 0.01 * i,
                                          "asr": 0.01 * i, "retune_asr": 0.1, "retune_mild_asr": 0.2}
    rows = [r for r in seeds_md({"runs": runs}) if r.startswith("| v |")]
    assert "| v | cnn | 0.1 | 3 | -6.00 | 1.00 | 10.00 | 20.00 |" in rows
    assert rows[-1] == "| v | all | both | 6 | -6.00 | 1.00 | 10.00 | 20.00 |", rows


def test_run_one_purifies_with_the_seed_offset(monkeypatch, tmp_path):
    """SEED_OFFSET never reaches purify: it moves the purification seed off the cell's."""
    seen = {}

    def fake_purify(model, clean, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr("fip_fast.pipeline.purify", fake_purify)
    monkeypatch.setattr(T, "build_task", lambda cell, cache: T.Task(cell, torch.nn.Linear(2, 2), None, None,
                                                                     None, None))
    monkeypatch.setattr(T, "model_digest", lambda m: "x")
    cfg = {"lr": 0.05, P.SEED_OFFSET: 2}
    with pytest.raises(RuntimeError, match="stop"):
        P.run_one(P.DEV_CELLS[0], "fip", cfg, str(tmp_path))
    assert seen["seed"] == P.DEV_CELLS[0].seed + 2 and P.SEED_OFFSET not in seen and cfg[P.SEED_OFFSET] == 2


def test_report_counts_dominance_and_excludes_failed_attacks(tmp_path):
    runs = {}
    for k, (asr0, fip, ft) in {"cnn/badnets/s0/c0.1/p0.1/t0": (1.0, (0.96, 0.01), (0.96, 0.20)),
                               "cnn/sig/s0/c0.1/p0.1/t0": (0.2, (0.90, 0.00), (0.97, 0.0))}.items():
        runs[k + "|before"] = {"cell": k, "method": "before", "cfg": {}, "acc": 0.97, "asr": asr0, "ra": 0.0,
                               "retune_asr": 1.0, "benign": {"retune_asr": 0.02}}
        for m in P.METHODS:                 # every other method as ft
            acc, asr = fip if m == "fip" else ft
            runs[k + "|" + m] = {"cell": k, "method": m, "cfg": {}, "acc": acc, "asr": asr, "ra": 0.5,
                                 "retune_asr": 0.1, "wall_s": 1.0}
    pending = "resnet/badnets/s1/c0.1/p0.1/t0"          # a cell whose methods have not run yet: not in the means
    runs[pending + "|before"] = {"cell": pending, "method": "before", "cfg": {}, "acc": 0.5, "asr": 1.0, "ra": 0.0,
                                 "retune_asr": 1.0, "benign": {"retune_asr": 0.9}}
    md = "\n".join(eval_md({"runs": runs}))
    assert "2 cells complete (every method run; 1 in progress)" in md
    assert "the attack failed in 1: cnn/sig" in md and "ASR 2.0 ± 0.0 % over 2 cells" in md
    fip_row = next(line for line in md.splitlines() if line.startswith("| fip |") and "/" in line)
    cols = [c.strip() for c in fip_row.strip("|").split("|")]
    assert cols[P.METHODS.index("ft") + 1] == "1/1"       # fip dominates ft on the one implanted cell
    assert "### Cells won, Pareto" in md
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"runs": runs}))
    assert write_report(tmp_path / "missing.json", path).read_text().startswith("# Fair protocol")
    (tmp_path / "protocol_heldout.json").write_text(json.dumps({"runs": runs}))     # beside the dev JSON
    write_report(tmp_path / "missing.json", path)
    held = (tmp_path / "protocol_heldout.md").read_text()
    assert "MNIST-5k on colour textures" in held and "## Held-out data (frozen choices)" in held
    # each report names the command of its own stage, whichever stage wrote the reports last
    assert held.rstrip().endswith("command: `python -m bench protocol heldout --jobs 2`.")
    assert path.with_suffix(".md").read_text().rstrip().endswith("command: `python -m bench protocol eval --jobs 2`.")


def test_dominance_table_says_how_many_cells_a_row_could_win_at_most():
    """Against a column whose ASR is already within half a point of 0, no row can win a cell by lower ASR: the
    *at most* row counts only the cells where the column's ASR is above it."""
    runs = {}
    for k, ft_asr in {"cnn/badnets/s0/c0.1/p0.1/t0": 0.20, "cnn/blend/s0/c0.1/p0.1/t0": 0.004,
                      "cnn/sig/s0/c0.1/p0.1/t0": 0.006}.items():
        runs[k + "|before"] = {"cell": k, "method": "before", "cfg": {}, "acc": 0.97, "asr": 1.0, "ra": 0.0,
                               "retune_asr": 1.0, "benign": {"retune_asr": 0.02}}
        for m in P.METHODS:
            runs[k + "|" + m] = {"cell": k, "method": m, "cfg": {}, "acc": 0.96, "asr": ft_asr if m == "ft" else 0.0,
                                 "ra": 0.5, "retune_asr": 0.1, "wall_s": 1.0}
    lines = eval_md({"runs": runs})
    first = lines.index(next(line for line in lines if line.startswith("### Cells won: row dominates")))
    ceiling = next(line for line in lines[first:] if line.startswith("| *at most* |"))
    cols = [c.strip() for c in ceiling.strip("|").split("|")]
    assert cols[P.METHODS.index("ft") + 1] == "2/3" and cols[P.METHODS.index("fip") + 1] == "0/3"
    fip_row = next(line for line in lines[first:] if line.startswith("| fip |"))
    assert [c.strip() for c in fip_row.strip("|").split("|")][P.METHODS.index("ft") + 1] == "2/3"  # reached
    assert sum(line.startswith("| *at most* |") for line in lines) == 1      # not under the Pareto table


def test_pareto_wins_on_accuracy_where_both_asrs_are_near_zero():
    """Both ASRs within half a point: the ASR-first rule calls it a tie, Pareto gives it to the higher accuracy;
    a trade (better ACC, worse ASR) and a copy are won by neither."""
    a, b = {"acc": 0.95, "asr": 0.005}, {"acc": 0.91, "asr": 0.006}
    assert _pareto(a, b) and not _pareto(b, a) and not _dominates(a, b)
    trade = {"acc": 0.97, "asr": 0.10}
    assert not _pareto(trade, a) and not _pareto(a, trade) and not _pareto(a, dict(a))
    assert _pareto({"acc": 0.95, "asr": 0.0}, {"acc": 0.95, "asr": 0.2})


@pytest.fixture
def tiny_protocol(monkeypatch):
    """One cell at a toy budget: a 2-epoch CNN, 4 purification steps."""
    monkeypatch.setitem(T.TRAIN_EPOCHS, "cnn", 1)
    monkeypatch.setattr(P, "STEPS", 4)
    return T.Cell("cnn", "badnets", 0, 0.02, 0.1)


def test_run_one_end_to_end(tiny_protocol, tmp_path):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    before = P.run_one(tiny_protocol, None, {}, str(tmp_path))
    # one thread is the workers' business (the pool initializer), not the caller's: it changed later tests' numerics
    assert torch.get_num_threads() == threads
    assert {"acc", "asr", "ra", "retune_asr", "retune_mild_asr", "benign"} <= before.keys()
    assert {"retune_asr", "retune_mild_asr"} <= before["benign"].keys()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2          # backdoored + benign model cached
    after = P.run_one(tiny_protocol, "ft", {"lr": 0.01}, str(tmp_path))
    assert {"acc", "asr", "ra", "wall_s", "val_acc0", "val_acc", "retune_asr", "retune_mild_asr"} <= after.keys()
    assert 0.0 <= after["asr"] <= 1.0 and after["wall_s"] > 0
    # the record keeps the effective configuration (defaults included), JSON-serializable
    assert after["config"]["steps"] == P.STEPS and after["config"]["lr"] == 0.01 and "lr_schedule" in after["config"]
    json.dumps(after)


def test_retune_attack_raises_asr_of_a_purified_model_not_of_a_benign_one(tiny_protocol, tmp_path):
    """The re-tuning attack is an attack: with a strong setting it implants the trigger in a benign model, and at
    the calibrated default it does not."""
    sp, atk, clean = T._split(tiny_protocol)
    benign = T.benign_model(tiny_protocol, tmp_path)
    task = T.Task(tiny_protocol, benign, clean, sp.test, atk.triggered_test(*sp.test), atk)
    weak = T.retune_asr(benign, task)
    strong = T.retune_asr(benign, task, T.Retune(steps=60, lr=0.05, per_batch=16))
    assert weak < 0.3 and strong > weak + 0.3


def test_report_flags_runs_of_one_cell_on_different_models():
    from bench.protocol_report import _model_check

    same = {"c1": {"before": {"model_sha": "a"}, "fip": {"model_sha": "a"}}}
    assert "the same backdoored model" in _model_check(same)[0]
    mixed = {**same, "c2": {"before": {"model_sha": "a"}, "fip": {"model_sha": "b"}}}
    assert _model_check(mixed)[0].startswith("**Mixed models**: in 1 cells") and "c2" in _model_check(mixed)[0]
    old = {**same, "c3": {"before": {}, "fip": {"model_sha": "a"}}}
    assert _model_check(old)[0].startswith("1 cells hold runs without a model digest")


def test_model_digest_sees_one_changed_weight():
    m = T.build_arch("cnn")
    d0 = T.model_digest(m)
    assert d0 == T.model_digest(m) and len(d0) == 16
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-6
    assert T.model_digest(m) != d0


def test_mild_retune_set_is_pams_split_with_five_triggered_images(tiny_protocol, tmp_path):
    """The milder attack's set: the 2 % split (80 images, the 2 % cells' own clean set), exactly 5 of its
    non-target images replaced by their triggered versions labelled with the target, the rest untouched; the same
    80 images when the defender holds the 10 % set."""
    import dataclasses

    sp, atk, clean = T._split(tiny_protocol)
    task = T.Task(tiny_protocol, None, clean, sp.test, atk.triggered_test(*sp.test), atk)
    x, y, pick = T.mild_retune_set(task)
    assert x.shape[0] == clean[0].shape[0] == 80 and pick.numel() == 5
    assert bool((clean[1][pick] != tiny_protocol.target).all()) and bool((y[pick] == tiny_protocol.target).all())
    assert torch.equal(x[pick], atk.apply(clean[0][pick]))
    rest = torch.ones(80, dtype=torch.bool)
    rest[pick] = False
    assert torch.equal(x[rest], clean[0][rest]) and torch.equal(y[rest], clean[1][rest])
    big = dataclasses.replace(tiny_protocol, clean=0.1)
    sp, atk, clean10 = T._split(big)
    x10, _, _ = T.mild_retune_set(T.Task(big, None, clean10, sp.test, atk.triggered_test(*sp.test), atk))
    assert clean10[0].shape[0] == 400 and torch.equal(x10[rest], x[rest])


def test_mild_retune_attack_is_milder_and_still_an_attack(tiny_protocol, tmp_path):
    """On a benign model: PAM's setting stays low; the same mechanics at a strong setting implant the trigger."""
    sp, atk, clean = T._split(tiny_protocol)
    benign = T.benign_model(tiny_protocol, tmp_path)
    task = T.Task(tiny_protocol, benign, clean, sp.test, atk.triggered_test(*sp.test), atk)
    mild = T.retune_mild_asr(benign, task)
    strong = T.retune_mild_asr(benign, task, T.MildRetune(n_trigger=40, epochs=40, lr=0.05))
    assert mild < 0.3 and strong > mild + 0.3


def test_eval_records_the_dev_choice_also_when_every_run_is_there(tmp_path, monkeypatch):
    """The eval JSON's frozen choice follows the development JSON's even when no run is left to make (a choice
    changed back to runs made before): the report reads the choice from it."""
    import bench.protocol_report as R

    chosen = {m: {"cfg": P.GRIDS[m][0], "index": 0} for m in P.METHODS}
    dev, out = tmp_path / "protocol_dev.json", tmp_path / "protocol_quick.json"
    dev.write_text(json.dumps({"chosen": chosen}))
    doc = P._open(out, {**P._config("eval"), "quick": True}, True)
    for c, m, cfg in P.stage_jobs("eval", True, chosen):
        doc["runs"][P.run_key(c, m, cfg)] = {"cell": c.key, "method": m or "before", "cfg": cfg}
    doc["chosen"] = {m: {"cfg": P.GRIDS[m][1], "index": 1} for m in P.METHODS}     # the previous choice
    P._save(doc, out)
    monkeypatch.setattr(R, "write_report", lambda *a: None)
    assert P.main(["eval", "--quick", "--dev-json", str(dev), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["chosen"] == chosen
