"""The step's C++ host helper (fip_fast.backends.host, csrc/cpu/fip_host.cpp): its functions return exactly what
their Python versions return, anything unusual goes to the Python version, a failed or pending build leaves the
Python versions serving, and FIP.step keeps torch's hooks and profiler record."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fip_fast import FIP
from fip_fast.backends import host

needs_cpp = pytest.mark.skipif(not host.wait(), reason=f"C++ host helper unavailable: {host.status()}")


class _MyParam(nn.Parameter):
    pass


def _params():
    ps = [nn.Parameter(torch.randn(3)) for _ in range(5)] + [nn.Parameter(torch.zeros(0))]
    ps[0].grad = torch.randn(3)
    ps[1].grad = None                                       # missing
    ps[2].grad = torch.randn(3)
    ps[3].grad = torch.randn(3).to_sparse()                 # sparse: no single address
    ps[4].grad = torch.randn(3)
    ps[5].grad = torch.zeros(0)                             # empty: address 0, not missing
    return ps


def _py(params, prev=None):
    with host.python_versions():
        return host.read_grads(params, prev)


@needs_cpp
def test_read_grads_equals_the_python_version():
    ps = _params()
    grads, ptrs, has_none = host.read_grads(ps)
    pgrads, pptrs, phas = _py(ps)
    assert all(a is b for a, b in zip(grads, pgrads)) and len(grads) == len(ps)
    assert ptrs == pptrs and has_none == phas is True
    assert ptrs[1] is None and ptrs[3] is None and ptrs[5] == ps[5].grad.data_ptr()
    dense = [p for i, p in enumerate(ps) if i not in (1, 3)]
    assert host.read_grads(dense)[2] is False                # an empty gradient is not a missing one


@needs_cpp
def test_read_grads_returns_prev_itself_until_a_gradient_moves():
    ps = _params()
    _, ptrs, _ = host.read_grads(ps)
    again = host.read_grads(ps, ptrs)[1]
    assert again is ptrs
    equal = tuple(list(ptrs))
    assert host.read_grads(ps, equal)[1] is equal              # the caller's tuple back, whichever it was
    ps[2].grad = torch.randn(3)                                # moved
    moved = host.read_grads(ps, ptrs)[1]
    assert moved is not ptrs and moved == _py(ps)[1] and moved[2] == ps[2].grad.data_ptr()
    ps[1].grad = torch.randn(3)                                # a None became a tensor
    assert host.read_grads(ps, moved)[1][1] == ps[1].grad.data_ptr()
    assert host.read_grads(ps[:3], moved)[1] is not moved      # another length: never prev


@needs_cpp
def test_tensor_subclasses_go_to_the_python_version():
    ps = [nn.Parameter(torch.randn(2)), _MyParam(torch.randn(2))]
    for p in ps:
        p.grad = torch.randn(2)
    assert host._mod.read_grads(ps, None) is NotImplemented
    assert host.read_grads(ps)[1] == _py(ps)[1]
    assert host._mod.bump_versions(ps) is NotImplemented
    v = ps[1]._version
    host.bump_versions(ps)
    assert ps[1]._version == v + 1


@needs_cpp
def test_same_items():
    a = [nn.Parameter(torch.zeros(1)) for _ in range(3)]
    assert host.same_items(a, list(a))
    assert not host.same_items(a, a[:2])
    b = list(a)
    b[1] = nn.Parameter(torch.zeros(1))
    assert not host.same_items(a, b)


@needs_cpp
def test_bump_versions_is_torchs_increment_version():
    ts = [torch.zeros(2), nn.Parameter(torch.zeros(2)), torch.zeros(0)]
    before = [t._version for t in ts]
    host.bump_versions(ts)
    assert [t._version for t in ts] == [v + 1 for v in before]
    with torch.inference_mode():
        inf = torch.zeros(2)
    torch.autograd.graph.increment_version([inf])   # torch skips inference tensors (no counter) ...
    host.bump_versions([inf])                        # ... and so do we


def test_a_failed_build_leaves_the_python_versions_serving(broken_csrc, monkeypatch):
    broken_csrc(host.SOURCE_NAME)
    monkeypatch.setenv("FIP_FAST_HOST", "sync")
    for name in ("_mod", "_error", "_thread"):
        monkeypatch.setattr(host, name, None)
    host.prepare()
    assert host._mod is None and "failed" in host.status() and host.status().startswith("Python")
    ps = _params()
    assert host.read_grads(ps)[1][0] == ps[0].grad.data_ptr()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FIP_FAST_HOST", "0")
    for name in ("_mod", "_error", "_thread"):
        monkeypatch.setattr(host, name, None)
    assert not host.wait() and "FIP_FAST_HOST=0" in host.status()


def test_without_a_cached_build_the_first_FIP_does_not_wait_for_the_compiler(monkeypatch):
    """prepare() starts the build in a thread and returns; the Python versions serve meanwhile."""
    started, release = threading.Event(), threading.Event()

    def slow_build():
        started.set()
        release.wait(30)
        raise RuntimeError("test build")
    for name in ("_mod", "_error", "_thread"):
        monkeypatch.setattr(host, name, None)
    monkeypatch.setenv("FIP_FAST_HOST", "1")
    monkeypatch.setattr(host, "_cached", lambda: False)
    monkeypatch.setattr(host, "_build", slow_build)
    p = nn.Parameter(torch.zeros(2))
    opt = FIP([p], lr=1.0, momentum=0.0, eta_F=0.0)            # calls prepare(): returns while the build runs
    assert started.wait(30) and "being built" in host.status()
    p.grad = torch.ones(2)
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(2))
    release.set()
    assert not host.wait(30) and "test build" in host.status()


@needs_cpp
def test_python_versions_are_not_undone_by_a_new_FIP():
    with host.python_versions():
        _opt()
        assert host._mod is None and host.status().startswith("Python")
    assert host._mod is not None


# ------------------------------------------------------------------------------------------------ FIP.step
def _opt():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    return p, FIP([p], lr=1.0, momentum=0.0, eta_F=0.0)


def test_step_runs_the_hooks_once_each():
    calls = []
    p, opt = _opt()
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    g = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global"))
    try:
        opt.step()
    finally:
        g.remove()
    assert calls == ["global", "pre", "post"] and torch.equal(p.detach(), -torch.ones(2))


def test_step_of_a_subclass_runs_a_hook_once():
    class Sub(FIP):
        def step(self, closure=None):
            return super().step(closure)
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = Sub([p], lr=1.0, momentum=0.0, eta_F=0.0)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.step()
    assert calls == ["pre"]


def test_step_is_recorded_by_the_profiler():
    _, opt = _opt()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#FIP.step" for e in prof.events())


def test_step_restores_grad_mode():
    p, opt = _opt()
    assert torch.is_grad_enabled()
    opt.step()
    assert torch.is_grad_enabled()
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()
