"""The repository as a newcomer meets it: scripts run from the repository root must see the same packages as
anywhere else (no folder of ours shadows an installed package), and .ci/run runs the README's commands verbatim."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    # A clean interpreter in the repository root, as `python script.py` there would start (cwd first on sys.path).
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ""})


def test_no_top_level_package_of_ours_but_fip_fast():
    """Every folder at the root that Python could import as a regular package is fip_fast itself (kernels/ holds
    the Triton sources in kernels/triton/ and has no __init__.py: a root `kernels` package shadowed Hugging Face's
    `kernels`, which transformers 5 imports)."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages in (["fip_fast"], ["bench", "fip_fast"]), packages
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_import_kernels_at_root_is_not_ours():
    """`import kernels` from the root finds Hugging Face's package where it is installed, and never our sources."""
    r = _run_at_root(
        "import importlib.util as u\n"
        "s = u.find_spec('kernels')\n"
        "print('none' if s is None else (s.origin or 'namespace'))\n")
    assert r.returncode == 0, r.stderr
    where = r.stdout.strip()
    if importlib.util.find_spec("kernels") is not None and where != "namespace":
        assert str(ROOT) not in where, where      # Hugging Face's, from site-packages
    else:
        assert where in ("none", "namespace"), where


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    r = _run_at_root("from transformers import Trainer; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_fip_fast_kernels_is_importable():
    """The Triton entry point keeps its name (the dispatcher's impl="triton"); importing it needs no GPU."""
    r = _run_at_root("import fip_fast.kernels as K; print(callable(K.available))")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def _readme_commands() -> list[str]:
    """The command lines of the README's "Two commands" block, comments stripped."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Two commands\s*\n+```(?:bash)?\n(.*?)```", text, re.S)
    assert m, "README.md has no '## Two commands' code block"
    lines = [line.split("  #")[0].strip() for line in m.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_readme_commands_verbatim():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in commands:
        assert cmd in ci, f".ci/run does not run the README's command verbatim: {cmd}"
    assert "python3 -m venv" in ci or "-m venv" in ci, ".ci/run must install into a new virtual environment"
