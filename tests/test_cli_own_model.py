"""The worked example of docs/own-model.md (examples/own_model/): a user's own CNN and MLP purified with the
``fip-fast`` console script from the folder that holds ``mymodels.py`` — no PYTHONPATH — on image and flat
(N, D) data."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from _hang import run

from fip_fast import cli

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_model"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A user's folder: mymodels.py and the files `python make_data.py` writes."""
    d = tmp_path_factory.mktemp("user")
    for f in ("mymodels.py", "make_data.py"):
        shutil.copy(EXAMPLE / f, d / f)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    r = run([sys.executable, "make_data.py"], cwd=d, env=env)
    assert r.returncode == 0, r.stderr
    return d


def _console_script() -> str:
    exe = Path(sys.executable).with_name("fip-fast")
    if not exe.is_file():
        pytest.skip("the fip-fast console script is not installed beside this Python")
    return str(exe)


def test_console_script_imports_the_factory_from_the_current_folder(folder, tmp_path):
    """`fip-fast purify --arch mymodels:make` from the user's folder, without PYTHONPATH (it failed: a console
    script's sys.path does not hold the current folder)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = tmp_path / "report"
    r = run([_console_script(), "purify", "--arch", "mymodels:make", "--checkpoint", "model.safetensors",
                        "--clean", "clean.npz", "--num-classes", "4", "--test", "test.npz", "--triggered",
                        "triggered.npz", "--target", "0", "--out", str(out), "--no-progress", "--lambda-iters",
                        "0", "--steps", "40"], cwd=folder, env=env)
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "report.json").read_text())["results"][0]
    assert row["acc"] >= 0.95 and row["asr"] is not None, row


def test_factory_import_from_cwd_in_process(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder), os.getcwd())])
    sys.modules.pop("mymodels", None)
    before = list(sys.path)
    rc = cli.main(["purify", "--arch", "mymodels:make", "--checkpoint", "model.safetensors", "--clean", "clean.npz",
                   "--num-classes", "4", "--steps", "5", "--out", str(tmp_path / "o"), "--no-progress",
                   "--lambda-iters", "0"])
    assert rc == 0, capsys.readouterr().err
    assert sys.path == before                         # the folder was on the path for the import only
    sys.modules.pop("mymodels", None)


def test_flat_features_purify(folder, tmp_path, capsys, monkeypatch):
    """Flat (N, D) data for a model that takes them (an MLP on tabular features): accepted, in_channels = D."""
    monkeypatch.chdir(folder)
    out = tmp_path / "flat"
    rc = cli.main(["purify", "--arch", "mymodels:make_mlp", "--checkpoint", "mlp.safetensors", "--clean",
                   "clean_flat.npz", "--test", "test_flat.npz", "--triggered", "triggered_flat.npz", "--target", "0",
                   "--num-classes", "4", "--out", str(out), "--no-progress", "--lambda-iters", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    payload = json.loads((out / "report.json").read_text())
    assert payload["before"]["acc"] >= 0.95 and payload["results"][0]["acc"] >= 0.95   # the example MLP: 99.8 %
    sys.modules.pop("mymodels", None)


def test_docs_commands_are_the_tested_examples():
    """Every `fip-fast purify` command of docs/own-model.md is one of --help's examples, which
    tests/test_cli_safety.py::test_help_examples_run runs."""
    from fip_fast.cli.parser import PURIFY_EXAMPLES

    doc = (ROOT / "docs" / "own-model.md").read_text(encoding="utf-8")
    cmds = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("fip-fast purify")]
    assert cmds
    for c in cmds:
        assert c in PURIFY_EXAMPLES, c


def test_make_data_does_not_depend_on_the_processes_random_state(tmp_path, one_thread):
    """make_data.main seeds each model before building it: called in a process whose global torch RNG was used
    (as inside a test session), it writes the bytes `python make_data.py` writes (it did not: the CNN was built
    before the seed, so a CLI test purified a different model depending on the tests that ran before it)."""
    import torch

    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_data
    finally:
        sys.path.remove(str(EXAMPLE))
    outs = []
    for i, burn in enumerate((0, 1000)):
        torch.rand(burn)                                   # another history of the global generator
        d = tmp_path / str(i)
        d.mkdir()
        make_data.main(d)
        outs.append({f: (d / f).read_bytes() for f in ("model.safetensors", "mlp.safetensors")})
    assert outs[0] == outs[1]
