"""Run a test in a fresh Python process.

For tests whose subject is process-global state that other tests of the same session disturb: torch.library's
schema checks after transformers and torch.compile have run in the process (an INTERNAL ASSERT inside
``opcheck`` seen only in the full session), and DDP workers forked after inductor started its threads.  The test
body and its assertions are unchanged; the wrapper re-invokes pytest on exactly this test id in a subprocess and
fails with its output if that run fails.
"""
from __future__ import annotations

import functools
import os
import sys

from _hang import run

_FLAG = "FIP_FAST_IN_SUBPROCESS"


def in_fresh_process(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if os.environ.get(_FLAG) == "1":
            return fn(*args, **kwargs)
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        env = dict(os.environ, **{_FLAG: "1"})
        r = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", nodeid], env=env)
        assert r.returncode == 0, f"{nodeid} failed in a fresh process:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    return wrapper
