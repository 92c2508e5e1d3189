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
    return ["purify", "--arch", "mymodels:make", "--checkpoint", "model.safetensors", "--clean", "clean.npz",
            "--num-classes", "4", "--method", method, "--no-progress", "--lambda-iters", "0", "--out", str(out),
            *extra]


def _one_line_error(rc, err, status=2):
    assert rc == status, err
    assert "Traceback" not in err and "\x1b" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fip-fast: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- 1: a ruined model is never written with exit 0
RUIN = ("--steps", "20", "--set", "lr_delta=1e4")   # finite, no skipped step, clean accuracy 100 % -> 23 %


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
    assert check["drop"] > 0.5 and check["exceeded"] and check["limit"] == 0.10
    assert "NOT SAVED" in (out / "report.md").read_text()


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
    assert rep.accuracy.exceeded and rep.accuracy.before == 1.0 and rep.accuracy.drop > 0.5
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
    # A fresh --out, a short run (the example's flags and their combination are what is tested here).
    rc, out, err = _run(argv + ["--out", str(tmp_path / "r"), "--steps", "20", "--no-progress",
                                "--lambda-iters", "0"], capsys)
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
