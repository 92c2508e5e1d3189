"""The environment record and the summary of :file:`bench/gpu_check.sh` (the one-shot GPU check).

``python -m bench.gpu_env --device cuda --out env.json``
    device, driver, versions, date, git revision and the measured device-to-device copy bandwidth — the ceiling the
    op benchmarks are compared against (bytes read + written per second, one 256 MiB fp32 copy, median of 20).
``python -m bench.gpu_env --summary OUT``
    markdown: one row per step of ``OUT/steps.tsv`` (rc, seconds) and the headline numbers found in the results.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import environment


def copy_bandwidth(device: torch.device, numel: int, reps: int = 20) -> float:
    """Bytes read + written per second of ``dst.copy_(src)`` for ``numel`` fp32 elements (median of ``reps``)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * 4 * numel / statistics.median(times[2:])


def record(device: str) -> dict:
    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    rec = dict(environment(dev), requested_device=device)
    if dev.type == "cuda":
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                     "--format=csv,noheader"]
            rec["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            rec["nvidia_smi"] = f"unavailable: {e}"
    numel = (64 << 20) if dev.type == "cuda" else (4 << 20)
    rec["copy_bandwidth_GBps"] = copy_bandwidth(dev, numel) / 1e9
    rec["copy_numel"] = numel
    return rec


def summary(out: Path) -> str:
    lines = [f"# GPU check — {out}", ""]
    env = out / "env.json"
    if env.is_file():
        e = json.loads(env.read_text())
        d, v = e.get("device", {}), e.get("versions", {})
        lines += [f"* device: {d.get('name')} ({d.get('type')}); torch {v.get('torch')}, triton {v.get('triton')}, "
                  f"cuda {v.get('cuda')}; {e.get('date')}; git {v.get('git_commit')}",
                  f"* copy bandwidth (read + write): {e.get('copy_bandwidth_GBps', float('nan')):.1f} GB/s", ""]
    lines += ["| step | rc | seconds | command |", "|---|---|---|---|"]
    steps = out / "steps.tsv"
    for row in (steps.read_text().splitlines() if steps.is_file() else []):
        name, rc, secs, cmd = (row.split("\t") + ["", "", ""])[:4]
        flag = "" if rc in ("0", "skipped") else " **failed**"
        lines.append(f"| {name} | {rc}{flag} | {secs} | `{cmd}` |")
    tests = out / "tests.log"
    if tests.is_file():
        tail = [ln for ln in tests.read_text().splitlines() if ln.strip()][-1:]
        lines += ["", f"GPU tests: `{tail[0] if tail else 'no output'}`"]
    for lm in sorted(out.glob("lm_throughput_*.json")):
        d = json.loads(lm.read_text())
        cells = [f"{r['variant']} {r['tokens_per_s']:.0f} tok/s ({r.get('vs_plain', float('nan')):.2f}× plain)"
                 for r in d.get("variants", []) if "tokens_per_s" in r]
        lines += ["", f"LM ({d.get('n_params', 0) / 1e9:.2f} B, {d.get('dtype')}; target {d.get('target')}): "
                  + "; ".join(cells)]
    lines += ["", "Results: " + ", ".join(sorted(p.name for p in out.glob("*.md") if p.name != "summary.md")
                                            + sorted(p.name for p in out.glob("*.json")))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_env", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the environment record (JSON) here")
    p.add_argument("--summary", default=None, help="print the markdown summary of this gpu_check.sh output folder")
    a = p.parse_args(argv)
    if a.summary:
        sys.stdout.write(summary(Path(a.summary)))
        return 0
    rec = record(a.device)
    text = json.dumps(rec, indent=2, default=str)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
