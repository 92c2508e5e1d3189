"""Hang guards for tests that wait on other processes (subprocesses, torchrun, spawned workers).

A guard catches a process that never finishes; it is not a speed claim, so it must hold on a machine under heavy
load (the whole suite once took 60 minutes at a load of 8 on 2 cores, where it takes 6 quietly).  One limit for all
of them, ``HANG_S`` (30 minutes; ``FIP_FAST_TEST_HANG_S`` overrides it), and a failure that says how long the
wait lasted and what the load was, so a slow machine is never mistaken for a wrong result.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import pytest

HANG_S = float(os.environ.get("FIP_FAST_TEST_HANG_S", "1800"))


def _load() -> str:
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def hung(what: str, started: float, output: str = "") -> None:
    """Fail the test: ``what`` did not finish within the guard."""
    pytest.fail(f"{what} did not finish within the {HANG_S:.0f} s hang guard (waited {time.monotonic() - started:.0f}"
                f" s, {_load()}; FIP_FAST_TEST_HANG_S raises the guard)\n{output[-4000:]}")


def run(cmd: Any, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)`` under the hang guard."""
    started = time.monotonic()
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, **kwargs)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or "") if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        hung(f"{cmd!r}", started, out)
        raise  # pragma: no cover - pytest.fail raised


def communicate(proc: subprocess.Popen, what: str = "the subprocess") -> tuple[Any, Any]:
    """``proc.communicate()`` under the hang guard (the process is killed when the guard trips)."""
    started = time.monotonic()
    try:
        return proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        hung(what, started, out if isinstance(out, str) else (out or b"").decode(errors="replace"))
        raise  # pragma: no cover
