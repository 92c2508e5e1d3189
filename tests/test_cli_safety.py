"""``fip-fast purify``'s safety on a user's own model (issue: "a user's own model, end to end"): the clean-accuracy
guard, option combinations checked up front, the output lock, name clashes and write errors, and the messages.

The model and data are those of the worked example, examples/own_model/ (a backdoored 12×12 CNN, 200 clean
samples: below the validation hold-out threshold, the usual case)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from fip_fast import cli
from fip_fast.cli import checks

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_model"


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """examples/own_model/make_data.py's files (model.safetensors, clean/test/triggered.npz, the MLP's)."""
    d = tmp_path_factory.mktemp("own")
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_data

        make_data.main(d)
    finally:
        sys.path.remove(str(EXAMPLE))
    return d


@pytest.fixture
def here(own, monkeypatch):
    """Run in a copy-free way from the data folder with the example's mymodels importable."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.chdir(own)
    return own


def _run(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _argv(out, *extra, method="fast_fip"):
    # These tests purify for a few steps to test what the CLI does around a purification.  Unaugmented: the default
    # shifted batches (augment "auto") wipe the model at the peak learning rate and need the rest of a real budget to
    # rebuild it (docs/holding.md), so a 3-step run ends below the accepted accuracy drop and is not saved.
    return ["purify", "--arch", "mymodels:make", "--checkpoint", "model.safetensors", "--clean", "clean.npz",
            "--num-classes", "4", "--method", method, "--no-progress", "--lambda-iters", "0", "--out", str(out),
            "--augment", "none", *extra]


def _one_line_error(rc, err, status=2):
    assert rc == status, err
    assert "Traceback" not in err and "\x1b" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fip-fast: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- 1: a ruined model is never written with exit 0
RUIN = ("--steps", "20", "--set", "lr_delta=1e4")   # finite, no skipped step: clean accuracy 100 % -> 23–56 %


def test_accuracy_collapse_is_refused(here, capsys, tmp_path):
    out = tmp_path / "ruined"
    rc, _, err = _run(_argv(out, *RUIN), capsys)
    line = _one_line_error(rc, err, status=checks.EXIT_NOT_SAVED)
    assert "clean accuracy" in line and "points lost" in line and "--accept-accuracy-drop" in line, line
    assert not (out / "purified.safetensors").exists()
    payload = json.loads((out / "report.json").read_text())
    assert payload["purified_weights"] is None and "clean accuracy" in payload["refused"]
    check = payload["results"][0]["accuracy_check"]
    assert check["data"] == "purification" and check["n"] == 200 and check["before"] == 1.0
    assert check["drop"] > 0.2 and check["exceeded"] and check["limit"] == 0.10
    assert "NOT SAVED" in (out / "report.md").read_text()
    # purified three times (the default --retries 2), each from the input model at half the rate before
    tries = payload["results"][0]["retries"]
    assert [t["lrs"]["lr_delta"] for t in tries] == [1e4, 5e3] and all("points lost" in t["text"] for t in tries)
    assert (out / "report.md").read_text().count("Abandoned try (") == 2


def test_retries_flag(here, capsys, tmp_path):
    from fip_fast.cli.parser import RETRIES as CLI_RETRIES
    from fip_fast.pipeline.report import RETRIES

    assert CLI_RETRIES == RETRIES
    out = tmp_path / "once"
    rc, _, err = _run(_argv(out, *RUIN, "--retries", "0"), capsys)
    assert rc == checks.EXIT_NOT_SAVED, err
    assert json.loads((out / "report.json").read_text())["results"][0]["retries"] == []
    rc, _, err = _run(_argv(tmp_path / "bad", *RUIN, "--retries", "-1"), capsys)
    assert "retries must be an int ≥ 0" in _one_line_error(rc, err)


def test_accept_accuracy_drop_saves_with_a_warning(here, capsys, tmp_path):
    out = tmp_path / "accepted"
    rc, _, err = _run(_argv(out, *RUIN, "--accept-accuracy-drop"), capsys)
    assert rc == 0, err
    assert (out / "purified.safetensors").is_file()
    assert "warning" in err and "points lost" in err


def test_purify_api_reports_the_drop(here, caplog):
    import mymodels
    import numpy as np
    import torch

    from fip_fast import purify
    from fip_fast.io import load_weights

    z = np.load(here / "clean.npz")
    clean = torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long()
    model, rep = purify(load_weights(mymodels.make(4, 1), here / "model.safetensors"), clean, method="fast_fip",
                        steps=20, lr_delta=1e4, progress=False)
    assert rep.accuracy.exceeded and rep.accuracy.before == 1.0 and rep.accuracy.drop > 0.2
    assert any("points lost" in w for w in rep.warnings)
    assert rep.to_dict()["accuracy"]["drop"] == pytest.approx(rep.accuracy.drop)
    model, rep = purify(load_weights(mymodels.make(4, 1), here / "model.safetensors"), clean, method="fast_fip",
                        steps=5, progress=False)
    assert not rep.accuracy.exceeded and not any("points lost" in w for w in rep.warnings)


# ---- 3: every example of --help runs; option combinations are judged before any data are loaded
def _help_examples():
    from fip_fast.cli.parser import PURIFY_EPILOG

    return [ln.strip() for ln in PURIFY_EPILOG.splitlines() if ln.startswith("  fip-fast ")]


def test_help_shows_the_examples():
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["purify"].format_help()
    assert len(_help_examples()) >= 3
    for ex in _help_examples():
        assert ex in text


@pytest.mark.parametrize("i", range(4))
def test_help_examples_run(here, capsys, tmp_path, i):
    import shlex

    examples = _help_examples()
    if i >= len(examples):
        pytest.skip("fewer examples")
    argv = shlex.split(examples[i])[1:]
    # A fresh --out, a short run (the example's flags and their combination are what is tested here), unaugmented
    # as in _argv: 20 steps of the default shifted batches may end before the rebuild and below the accepted drop.
    rc, out, err = _run(argv + ["--out", str(tmp_path / "r"), "--steps", "20", "--no-progress",
                                "--lambda-iters", "0", "--augment", "none"], capsys)
    assert rc == 0, (examples[i], err)
    assert (tmp_path / "r" / "purified.safetensors").is_file()


def test_set_examples_in_help_are_valid():
    """The --set examples of the help texts are valid for the default method (one was not: trace_estimator=lagged
    with Fast FIP's SGD δ-optimizer)."""
    from fip_fast.cli.checks import parse_set
    from fip_fast.pipeline.run import check_options

    p = cli.build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("purify", "demo"):
        h = next(a for a in sub.choices[name]._actions if "--set" in a.option_strings).help
        pairs = re.findall(r"--set (\S+=\S+)", h.split("(")[0])
        assert pairs, h
        check_options("fast_fip", **parse_set(pairs))


def test_purify_keywords_through_set_are_not_method_options(here, capsys, tmp_path):
    """--set passes purify()'s own keyword arguments too (val_margin, patience, …): the up-front check routes
    them as purify does, it does not refuse them as unknown method options."""
    from fip_fast.pipeline.run import check_options

    check_options("fast_fip", val_margin=0.05, patience=2, eval_every=3, batch_size=16, lr=0.01)
    rc, _, err = _run(_argv(tmp_path / "o", "--steps", "2", "--set", "val_margin=0.05", "--set", "patience=2",
                            method="fip"), capsys)
    assert rc == 0, err


@pytest.mark.parametrize("extra, pattern", [
    (["--set", "trace_estimator=lagged"], r"--method fast_fip with --set: .*trace_estimator='fd' only"),
    (["--set", "no_such_option=1"], r"--method fast_fip with --set: .*no_such_option"),
    (["--method", "ft", "--set", "eta_F=0.1"], r"--method ft with --set: .*eta_F"),
    (["--method", "fip", "--set", "trace_estimator=nope"], r"--method fip with --set: .*trace_estimator"),
])
def test_bad_option_combinations_fail_before_loading_data(here, capsys, monkeypatch, tmp_path, extra, pattern):
    from fip_fast.evaluation import data

    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded despite bad options"))
    rc, _, err = _run(_argv(tmp_path / "o", *extra), capsys)
    assert re.search(pattern, _one_line_error(rc, err)), err
    assert not (tmp_path / "o").exists()


# ---- 4: two runs into one new --out: the second fails (exit 2), the first's results stand
def test_second_run_into_the_same_out_fails(here, capsys, monkeypatch, tmp_path):
    from fip_fast import pipeline

    out = tmp_path / "shared"
    real = pipeline.purify
    second = {}

    def purify_while_another_run_starts(*a, **k):
        if not second:                # run B starts while run A purifies, with the same new --out
            second["started"] = True
            second["rc"] = cli.main(_argv(out, "--steps", "2", method="fip"))
            second["err"] = capsys.readouterr().err
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "purify", purify_while_another_run_starts)
    rc, _, err = _run(_argv(out, "--steps", "2", method="fip"), capsys)
    assert rc == 0, err
    line = _one_line_error(second["rc"], second["err"])
    assert "being written by another fip-fast run" in line and str(out) in line, line
    assert json.loads((out / "report.json").read_text())["config"]["steps"] == 2
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "purified.safetensors"} <= names and not [n for n in names if n[0] == "."]


def test_a_stale_lock_file_is_taken_over(here, capsys, tmp_path):
    """A killed run leaves an unlocked lock file: the next run takes it over (no --overwrite needed)."""
    from fip_fast.io import LOCK_NAME

    out = tmp_path / "stale"
    out.mkdir()
    (out / LOCK_NAME).write_text("12345\n")
    rc, _, err = _run(_argv(out, "--steps", "2", method="fip"), capsys)
    assert rc == 0, err
    assert not (out / LOCK_NAME).exists() and (out / "purified.safetensors").is_file()


def test_folder_lock_is_exclusive(tmp_path):
    from fip_fast.io import FolderBusyError, FolderLock

    with FolderLock(tmp_path / "new") as lock:
        with pytest.raises(FolderBusyError, match="another fip-fast run"):
            FolderLock(tmp_path / "new").acquire()
        assert lock.path.is_file()
    assert not (tmp_path / "new").exists()          # created by the lock, empty again: removed


# ---- 5: --save clashes are found before the work; write failures are one line naming the file, exit 3
def test_save_into_a_report_file_is_refused_up_front(here, capsys, monkeypatch, tmp_path):
    from fip_fast import pipeline

    monkeypatch.setattr(pipeline, "purify", lambda *a, **k: pytest.fail("purify ran despite a --save clash"))
    out = tmp_path / "o"
    for name in ("report.md", "report.json", "asr_acc.png"):
        rc, _, err = _run(_argv(out, "--save", str(out / name), method="fip"), capsys)
        line = _one_line_error(rc, err)
        assert "one of the report's own files" in line and name in line, line
    assert not out.exists()


def _disk_full(*a, **k):
    raise OSError(28, "No space left on device")


def _safetensors_disk_full(*a, **k):
    import safetensors

    raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                      "message: \"No space left on device\" })")


@pytest.mark.parametrize("writer", [_disk_full, _safetensors_disk_full])
def test_full_disk_is_one_line_naming_the_file(here, capsys, monkeypatch, tmp_path, writer):
    import safetensors.torch

    out = tmp_path / "full"
    monkeypatch.setattr(safetensors.torch, "save_file", writer)
    rc, _, err = _run(_argv(out, "--steps", "2", method="fip"), capsys)
    line = _one_line_error(rc, err, status=checks.EXIT_NOT_SAVED)
    assert f"could not write {out / 'purified.safetensors'}" in line and "No space left on device" in line, line
    assert not out.exists()                         # nothing half-written, the new folder removed again


# ---- 8: reports and messages
def _fip(out, *extra):
    return _argv(out, "--steps", "3", *extra, method="fip")


def test_runner_method_has_a_history_curve(here, capsys, tmp_path):
    """Super-FT, FT, … (runners) are evaluated on the way, as the loop methods are (every step of 3 here), and
    their result is the last history record, so that asr_acc.png draws a curve, not a legend alone."""
    out = tmp_path / "ft"
    rc, _, err = _run(_argv(out, "--steps", "3", "--test", "test.npz", method="ft"), capsys)
    assert rc == 0, err
    h = json.loads((out / "report.json").read_text())["results"][0]["history"]
    assert [r["step"] for r in h] == [1, 2, 3] and all(r["eval"]["acc"] is not None for r in h), h
    assert (out / "asr_acc.png").is_file()


def test_no_empty_accuracy_plot(here, capsys, tmp_path):
    """No test data and no validation part (200 clean samples): nothing to plot over the steps — no empty 0–1
    frame; report.md says so."""
    out = tmp_path / "noplot"
    rc, _, err = _run(_fip(out), capsys)
    assert rc == 0, err
    assert not (out / "asr_acc.png").exists()
    assert "No accuracy plot" in (out / "report.md").read_text()


def test_plots_mark_the_selected_step_and_label_lambda():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from fip_fast.cli import plots

    row = {"method": "fip", "selected_step": 20, "initial_val_acc": 0.9, "lambda_max": 0.02,
           "history": [{"step": s, "val_acc": 0.9, "eval": {"acc": 0.9, "asr": 1 - s / 30}} for s in (10, 20, 30)]}
    before = {"acc": 0.9, "asr": 1.0, "lambda_max": 50.0}
    fig = plots._asr_acc_figure(plt, [row], before)
    labels = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
    assert any("selected step 20" in lb for lb in labels), labels
    plt.close(fig)
    fig = plots._lambda_figure(plt, [row], before)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"                               # 0.02 next to 50: a visible bar
    assert {"50", "0.02"} <= {t.get_text() for t in ax.texts}
    plt.close(fig)


def test_warnings_are_printed_once(own, tmp_path):
    from _hang import run

    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLE)}
    r = run([sys.executable, "-m", "fip_fast.cli", *_fip(tmp_path / "w")], cwd=own, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("too few for a validation part") == 1, r.stderr


def test_pickle_refusal_is_one_line(here, capsys, tmp_path):
    import mymodels
    import torch

    torch.save(mymodels.make(4, 1), tmp_path / "pickled.pt")             # a whole pickled module
    argv = _fip(tmp_path / "o")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "pickled.pt")
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert err.strip() == line and "weights-only" in line and "safetensors" in line, err


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_checkpoint_that_is_not_a_regular_file(here, capsys, tmp_path, kind):
    import os

    p = tmp_path / "fifo.pt"
    if kind == "fifo":
        os.mkfifo(p)
    else:
        p = Path("/dev/zero")
    argv = _fip(tmp_path / "o")
    argv[argv.index("--checkpoint") + 1] = str(p)
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert "not a regular file" in line and str(p) in line, line


def test_corrupt_npz_says_so(here, capsys, tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive at all" * 10)
    argv = _fip(tmp_path / "o")
    argv[argv.index("--clean") + 1] = str(tmp_path / "bad.npz")
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert "not a valid .npz" in line and "pickle" not in line, line


def test_save_writes_the_format_its_suffix_names(here, capsys, tmp_path):
    import safetensors.torch
    import torch

    rc, _, err = _run(_fip(tmp_path / "o", "--save", str(tmp_path / "x.pt")), capsys)
    assert rc == 0, err
    sd = torch.load(tmp_path / "x.pt", weights_only=True)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())
    with pytest.raises(Exception):
        safetensors.torch.load_file(str(tmp_path / "x.pt"))
    rc, _, err = _run(_fip(tmp_path / "o2", "--save", str(tmp_path / "x.bin")), capsys)
    assert "unknown format '.bin'" in _one_line_error(rc, err)


def test_steps_0_is_refused(here, capsys, tmp_path):
    rc, _, err = _run(_argv(tmp_path / "o", "--steps", "0", method="fip"), capsys)
    assert "--steps must be ≥ 1" in _one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_resume_needs_a_checkpoint_of_the_method(here, capsys, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    rc, _, err = _run(_fip(tmp_path / "o1", "--checkpoint-dir", str(ck), "--resume"), capsys)
    assert "holds no purification checkpoint" in _one_line_error(rc, err)
    rc, _, err = _run(_fip(tmp_path / "o2", "--checkpoint-dir", str(ck), "--checkpoint-every", "1"), capsys)
    assert rc == 0, err
    rc, _, err = _run(_argv(tmp_path / "o3", "--steps", "3", "--checkpoint-dir", str(ck), "--resume"), capsys)
    line = _one_line_error(rc, err)
    assert "checkpoints of --method fip, not of --method fast_fip" in line, line
    rc, _, err = _run(_fip(tmp_path / "o4", "--checkpoint-dir", str(ck), "--resume"), capsys)
    assert rc == 0, err


@pytest.mark.parametrize("case", ["one_sample", "single_class"])
def test_degenerate_clean_sets_are_refused(here, capsys, tmp_path, case):
    import numpy as np

    z = np.load(here / "clean.npz")
    x, y = z["x"], z["y"]
    if case == "one_sample":
        x, y = x[:1], y[:1]
    else:
        x, y = x[y == 2], y[y == 2]
    np.savez(tmp_path / "c.npz", x=x, y=y)
    argv = _fip(tmp_path / "o")
    argv[argv.index("--clean") + 1] = str(tmp_path / "c.npz")
    rc, _, err = _run(argv, capsys)
    line = _one_line_error(rc, err)
    assert ("holds 1 sample" if case == "one_sample" else "single class (2)") in line, line
    assert not (tmp_path / "o").exists()


# ---- 6: --threads defaults to one thread for a small model (torch's choice was several times slower)
def test_threads_default_is_one_for_a_small_model(here, capsys, tmp_path):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc, _, err = _run(_fip(tmp_path / "o"), capsys)
        assert rc == 0, err
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "o" / "report.json").read_text())["config"]["threads"] == 1
    finally:
        torch.set_num_threads(n)


def test_threads_default_keeps_torchs_choice_for_a_large_model():
    import argparse

    import torch

    from fip_fast.cli.purify_cmd import SMALL_MODEL_PARAMS, set_threads

    n = torch.get_num_threads()
    big = torch.nn.Linear(SMALL_MODEL_PARAMS // 1000 + 1, 1000)
    args = argparse.Namespace(threads=None)
    set_threads(args, big)
    assert args.threads == 0 and torch.get_num_threads() == n
    args = argparse.Namespace(threads=3)                              # an explicit count is used as given
    set_threads(args, big)
    assert torch.get_num_threads() == 3
    torch.set_num_threads(n)
