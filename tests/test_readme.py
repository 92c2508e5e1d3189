"""The README's snippets as a newcomer copies them: the command-line quick start and the Python one run (in a
temporary copy of the worked example), and the optimizer loop shown is the loop a test runs."""
from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
from _hang import run

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks_under(heading: str, lang: str) -> list[str]:
    """The ```lang code blocks of the README section that starts at ``heading`` (up to the next heading)."""
    start = README.index(heading)
    nxt = re.search(r"\n#{2,3} ", README[start + len(heading):])
    section = README[start:start + len(heading) + (nxt.start() if nxt else len(README))]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory):
    """The README's command-line quick start, run as written except for the folder it copies into."""
    (cmds,) = _blocks_under("### Purify your own model from the command line", "bash")
    where = tmp_path_factory.mktemp("readme") / "own_model"
    assert "/tmp/own_model" in cmds, cmds
    script = cmds.replace("/tmp/own_model", str(where))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    r = run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env)
    assert r.returncode == 0, f"the README's CLI quick start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert (where / "report" / "report.md").is_file(), sorted(p.name for p in (where / "report").iterdir())
    return where


def test_cli_quick_start_purifies(example_folder):
    report = (example_folder / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| fast_fip"))
    acc, asr = (float(v) for v in row.split("|")[2:4])
    assert asr <= 5.0 and acc >= 90.0, row


def test_python_quick_start_runs(example_folder):
    (code,) = _blocks_under("### Purify in Python: `fip_fast.purify`", "python")
    check = "\nassert report.accuracy is not None, report\nprint('README-PY-OK')\n"
    r = run([sys.executable, "-c", textwrap.dedent(code) + check], cwd=example_folder,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(example_folder)})
    assert r.returncode == 0 and "README-PY-OK" in r.stdout, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def test_optimizer_loop_is_the_tested_example():
    """The loop the README shows is, line for line, the snippet of examples/optimizer_loop.py that
    tests/test_recipes.py runs on a synthetic backdoor."""
    blocks = _blocks_under("### FIP as a drop-in optimizer", "python")
    src = (ROOT / "examples" / "optimizer_loop.py").read_text()
    snippet = re.search(r"# --8<-- \[start:snippet\]\n(.*?)\n\s*# --8<-- \[end:snippet\]", src, re.S).group(1)
    assert textwrap.dedent(snippet).strip() == blocks[-1].strip()

