"""fip_fast benchmarks (``python -m bench {ops,end_to_end,report,...}``) and their shared helpers: timers,
environment description, JSON output.

Sub-commands: :mod:`bench.ops` (kernel microbenchmarks), :mod:`bench.end_to_end` (per-step time and time to
ASR ≤ 5 %), :mod:`bench.report` (JSON → markdown); ``baselines`` / ``lagged_vs_fd`` when those modules exist.

Timers
------
* CUDA: :func:`triton.testing.do_bench` when Triton imports (it flushes L2 between repetitions and times with CUDA
  events), otherwise CUDA events around each call with a ``torch.cuda.synchronize()`` per repetition.
* CPU: ``time.perf_counter()`` around each call after ``warmup`` calls; repetitions continue until both
  ``min_reps`` are done and ``budget_s`` is spent (or ``max_reps`` is reached).  The process CPU time of each
  call (``time.process_time()``) is recorded too (``cpu_*_s``): on a shared, overloaded machine wall time includes
  the time the process waited for a core, CPU time does not (with one torch thread, the default of the benchmarks
  on CPU, the two agree on an idle machine).

Every timing is reported as median and 20th / 80th percentiles of the per-call times, in seconds.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(times: list[float]) -> dict[str, Any]:
    return dict(median_s=statistics.median(times), p20_s=percentile(times, 20), p80_s=percentile(times, 80),
                n_reps=len(times))


def time_interleaved(fns: list, *, min_rounds: int, max_rounds: int, budget_s: float = 0.0, steps: int = 1,
                     warmup: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """(wall, process-CPU) seconds per call of every function, measured in rounds that call each in turn — the
    start rotating from round to round — so that a drift of the machine's load moves every function alike (the
    CPU way to time things whose ratios matter).  Each round times ``steps`` consecutive calls of each function and
    records their mean; at least ``min_rounds``, at most ``max_rounds`` rounds, and more than ``min_rounds`` only
    while ``budget_s`` seconds have not passed.  ``warmup`` untimed calls of each function first."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    n = len(fns)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    end_at = time.perf_counter() + budget_s
    r = 0
    while n and r < max_rounds and (r < min_rounds or time.perf_counter() < end_at):
        for i in list(range(r % n, n)) + list(range(r % n)):
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fns[i]()
            wall[i].append((time.perf_counter() - w0) / steps)
            cpu[i].append((time.process_time() - c0) / steps)
        r += 1
    return wall, cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, min_reps: int = 5,
            max_reps: int = 50, budget_s: float = 1.0) -> dict[str, Any]:
    """Time ``fn()`` (see the module docstring).  Returns ``summarize(...)`` plus ``timer`` and ``first_call_s``
    (the first call alone — includes compilation / autotuning where there is any)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            q = do_bench(fn, warmup=25, rep=max(100, int(budget_s * 1000)), quantiles=[0.5, 0.2, 0.8])
            med, p20, p80 = (x / 1e3 for x in q)
            return dict(median_s=med, p20_s=p20, p80_s=p80, n_reps=None, timer="triton.testing.do_bench",
                        first_call_s=first)
        except Exception:   # no triton: CUDA events
            for _ in range(warmup):
                fn()
            times = []
            end_at = time.perf_counter() + budget_s
            while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < end_at):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return dict(summarize(times), timer="cuda events", first_call_s=first)
    for _ in range(max(0, warmup - 1)):
        fn()
    times, cpu = [], []
    end_at = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < end_at):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    c = summarize(cpu)
    return dict(summarize(times), timer="time.perf_counter", first_call_s=first, cpu_median_s=c["median_s"],
                cpu_p20_s=c["p20_s"], cpu_p80_s=c["p80_s"])


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions, date, machine description and load (``os.getloadavg()``)."""
    dev: dict[str, Any] = dict(type=device.type, cpu=_cpu_model(), cpu_count=os.cpu_count(),
                               torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev.update(name=p.name, total_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count)
    else:
        dev.update(name=_cpu_model())
    versions: dict[str, Any] = dict(python=sys.version.split()[0], torch=torch.__version__,
                                    cuda=torch.version.cuda, platform=platform.platform(), git_commit=_git_commit())
    try:
        import triton
        versions["triton"] = triton.__version__
    except Exception:
        versions["triton"] = None
    try:
        from importlib.metadata import version
        versions["fip_fast"] = version("fip_fast")
    except Exception:
        versions["fip_fast"] = None
    return dict(device=dev, versions=versions,
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                hostname=platform.node(), load_before=loadavg(),
                env=dict(TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"),
                         OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS")))


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for tag in ("h200", "h100", "a100", "l40s", "l4", "a10", "t4", "v100", "4090", "3090"):
            if tag in name:
                return tag
        return "cuda"
    return device.type


def write_json(obj: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_default))
    tmp.replace(path)
    return path


def _default(o):
    if isinstance(o, (torch.device, torch.dtype, Path)):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_results(res: dict, path: Path, *, markdown: bool = False, silent: bool = False) -> dict:
    """Write a benchmark's result JSON (and its markdown table if asked), saying where unless ``silent``."""
    write_json(res, path)
    if not silent:
        print(f"wrote {path}")
    if markdown:
        from .report import write_markdown
        md = write_markdown(path)
        if not silent:
            print(f"wrote {md}")
    return res


def pick_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
