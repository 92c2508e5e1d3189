"""The op microbenchmarks through pytest-benchmark (not collected by the default ``testpaths = tests``)::

    pytest bench/test_ops_benchmark.py --benchmark-only                       # CPU: DemoCNN-sized lists
    pytest bench/test_ops_benchmark.py --benchmark-only --benchmark-json=out.json
    FIP_BENCH_CASE=resnet18 pytest bench/test_ops_benchmark.py --benchmark-only

Same set-ups as ``python -m bench ops`` (:func:`bench.ops.make_list_op`): every available implementation of
each list op on one parameter list.  On CUDA, each round synchronizes the device so the timer sees the kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import pick_device, sync
from bench.ops import list_cases, make_list_op, resolve_impls

DEVICE = pick_device(os.environ.get("FIP_BENCH_DEVICE", "auto"))
CASE = os.environ.get("FIP_BENCH_CASE", "demo_cnn")
_quick = CASE in ("flat", "demo_cnn", "gpt2_tiny", "deltas_small")
_CASES = list_cases(DEVICE, quick=_quick)
if CASE not in _CASES:
    raise ValueError(f"FIP_BENCH_CASE={CASE!r}: choose one of {sorted(_CASES)} (quick) or "
                     f"{sorted(list_cases(DEVICE, quick=False))}")
_IMPLS = resolve_impls(DEVICE, ["reference", "foreach", "triton", "cuda"], False)
OPS = [("fisher_accumulate_", None), ("global_norm", None), ("perturb_", None), ("fip_step_", "plain"),
       ("fip_step_", "fd_mix"), ("fip_step_", "lagged")]


@pytest.mark.parametrize("impl", list(_IMPLS))
@pytest.mark.parametrize("op,variant", OPS, ids=[f"{o}{'-' + v if v else ''}" for o, v in OPS])
def test_op(benchmark, op, variant, impl):
    info = _IMPLS[impl]
    if not info["available"]:
        pytest.skip(info["reason"])
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    fn, _ = make_list_op(op, variant, _CASES[CASE]["shapes"], DEVICE, info)

    def call():
        fn()
        sync(DEVICE)
    benchmark.extra_info.update(case=CASE, numel=_CASES[CASE]["numel"], ntensors=_CASES[CASE]["ntensors"],
                                device=str(DEVICE))
    benchmark(call)
