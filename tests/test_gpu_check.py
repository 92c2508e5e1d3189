"""bench/gpu_check.sh, the one-shot GPU check, in its CPU dry-run mode: every step runs (CPU-sized, no build) and
the summary is written — so the script does not rot between GPU loans."""
import json
import os
import sys
from pathlib import Path

import pytest
from _hang import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    r = run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [ln.split("\t") for ln in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["env", "install", "tests", "ops", "e2e", "lm", "peers"]
    logs = {s[0]: (tmp_path / f"{s[0]}.log") for s in steps}
    for name, rc, *_ in steps:
        tail = logs[name].read_text()[-2000:] if logs[name].is_file() else ""
        assert rc in ("0", "skipped"), f"step {name} failed (rc {rc}):\n{tail}"
    env_rec = json.loads((tmp_path / "env.json").read_text())
    assert env_rec["copy_bandwidth_GBps"] > 0 and env_rec["versions"]["torch"]
    assert (tmp_path / "ops_cpu.json").is_file() and (tmp_path / "end_to_end_cpu.json").is_file()
    assert (tmp_path / "lm_throughput_cpu.json").is_file() and (tmp_path / "peers_cpu.json").is_file()
    summary = (tmp_path / "summary.md").read_text()
    assert "copy bandwidth" in summary and "| tests | 0 |" in summary and "failed" not in summary
    assert "LM (" in summary and "fast_fip_lagged" in summary
