# --- fip_fast.kernels (Triton) -------------------------------------------------------------------------------
# The Triton kernels run on CPU tensors only under the interpreter, which must be selected before triton is
# imported (triton.jit decides at decoration time).  setdefault: a GPU job can run the same tests compiled with
# TRITON_INTERPRET=0.  A private cache dir keeps test runs from reading or polluting ~/.triton.
import os as _os
import tempfile as _tempfile

_os.environ.setdefault("TRITON_INTERPRET", "1")
_os.environ.setdefault("TRITON_CACHE_DIR", _tempfile.mkdtemp(prefix="fip_fast_triton_cache_"))


# --- one torch thread ------------------------------------------------------------------------------------------
import pytest as _pytest
import torch as _torch


@_pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (tiny models: one thread is fastest, and the suite shares the cores
    with other test processes); the caller's count is restored.
    Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = _torch.get_num_threads()
    _torch.set_num_threads(1)
    yield
    _torch.set_num_threads(n)


@_pytest.fixture
def broken_csrc(tmp_path, monkeypatch):
    """``broken_csrc(source_name)``: a ``csrc/cpu/<source_name>`` that does not compile, with FIP_FAST_CSRC and an
    empty FIP_FAST_CPU_CACHE pointing at it — what a C++ build that fails looks like."""
    def make(source_name: str):
        bad = tmp_path / "csrc" / "cpu"
        bad.mkdir(parents=True, exist_ok=True)
        (bad / source_name).write_text("this is not C++\n")
        monkeypatch.setenv("FIP_FAST_CSRC", str(tmp_path / "csrc"))
        monkeypatch.setenv("FIP_FAST_CPU_CACHE", str(tmp_path / "cache"))
    return make


# --- the step's C++ host helper -------------------------------------------------------------------------------
# Built (≈10 s, once per machine and torch version) before the tests, so that every FIP.step of the suite takes
# the path users get after the first seconds; tests/test_step_plan.py also runs its steps with the Python versions.
from fip_fast.backends import host as _host  # noqa: E402

_host.wait()


# --- what was resolved ------------------------------------------------------------------------------------------
def pytest_report_header(config):
    """The versions that decide whether the suite passes (pip resolves the extras anew on every fresh install)."""
    from importlib import metadata

    found = []
    for dist in ("torch", "triton", "transformers", "accelerate", "numpy"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} -")
    return "resolved: " + ", ".join(found)
