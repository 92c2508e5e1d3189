"""The op microbenchmarks: the copy bandwidth (the ceiling), then every op × case × implementation, timed and
checked against the reference; each measurement becomes one record of the ``results`` list."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fip_fast import reference

from .. import time_fn
from .cases import BYTES_ACCOUNTING
from .setups import _max_err, make_list_op, make_spectral_op

#: the list ops in the order they are run: (op, variant)
LIST_OPS = [("fisher_accumulate_", None), ("global_norm", None), ("perturb_", None), ("fip_step_", "plain"),
            ("fip_step_", "fd_mix"), ("fip_step_", "lagged")]

#: the spectral ops: (op, key of :func:`bench.ops.cases.spectral_cases`)
SPECTRAL_OPS = (("spectral_weight", "weight"), ("spectral_linear_grad", "linear_grad"))


# ------------------------------------------------------------------------------------------------ copy bandwidth
def copy_bandwidth(device: torch.device, numel: int, timing: dict) -> dict[str, Any]:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
    t = time_fn(copy, device, **dict(timing, min_reps=max(10, timing["min_reps"]),
                                     max_reps=max(100, timing["max_reps"]),
                                     budget_s=max(1.0, timing["budget_s"])))
    nbytes = 8 * numel
    if t.get("cpu_median_s"):
        t["gbps_cpu_time"] = nbytes / t["cpu_median_s"] / 1e9
    t.update(numel=numel, bytes=nbytes, gbps=nbytes / t["median_s"] / 1e9,
             gbps_p20_time=nbytes / t["p20_s"] / 1e9, what="dst.copy_(src), fp32, 4 B read + 4 B write per element")
    return t


# ------------------------------------------------------------------------------------------------ records
class Recorder:
    """Collects the records of one run: timings with GB/s and "% copy" (against ``bw``, the copy bandwidth
    measured at the start), GFLOP/s, the error against the reference, or why an implementation did not run."""

    TIMING_KEYS = ("median_s", "p20_s", "p80_s", "n_reps", "first_call_s", "timer", "cpu_median_s", "cpu_p20_s",
                   "cpu_p80_s")

    def __init__(self, bw: dict, say: Callable[..., None]):
        self.bw, self.say = bw, say
        self.results: list[dict[str, Any]] = []

    def __call__(self, base: dict, impl_name: str, t: Optional[dict], status: str, reason: str = "", err=None):
        rec = dict(base, impl=impl_name, status=status, reason=reason, max_abs_err_vs_reference=err)
        if t is not None:
            self._add_rates(rec, t)
        self.results.append(rec)
        self._say(rec, base, impl_name, t, status, reason)

    def _add_rates(self, rec: dict, t: dict) -> None:
        bw = self.bw
        rec.update({k: t.get(k) for k in self.TIMING_KEYS})
        if rec.get("bytes"):
            rec["gbps"] = rec["bytes"] / t["median_s"] / 1e9
            rec["pct_copy_bw"] = 100.0 * rec["gbps"] / bw["gbps"]
            if t.get("cpu_median_s"):
                rec["gbps_cpu_time"] = rec["bytes"] / t["cpu_median_s"] / 1e9
                rec["pct_copy_bw_cpu_time"] = 100.0 * rec["gbps_cpu_time"] / bw["gbps_cpu_time"]
        if rec.get("flops"):
            rec["gflops"] = rec["flops"] / t["median_s"] / 1e9

    def _say(self, rec: dict, base: dict, impl_name: str, t: Optional[dict], status: str, reason: str) -> None:
        head = f"  {base['op']:<22}{base.get('variant') or '':<8}{base['case']:<14}{impl_name:<13}"
        if t is not None:
            self.say(head + f"{t['median_s'] * 1e3:10.3f} ms  [{t['p20_s'] * 1e3:.3f}, {t['p80_s'] * 1e3:.3f}]"
                     + (f"  {rec['gbps']:7.2f} GB/s ({rec['pct_copy_bw']:.0f}% copy)" if "gbps" in rec else "")
                     + (f"  {rec['gflops']:.1f} GFLOP/s" if "gflops" in rec else ""))
        else:
            self.say(head + f"{status}: {reason[:90]}")


# ------------------------------------------------------------------------------------------------ list ops
def time_list_ops(record: Recorder, cases: dict, impls: dict, device: torch.device, timing: dict,
                  ops_wanted: list[str], verify_max: int) -> None:
    """Every list op × case × implementation; cases up to ``verify_max`` elements are checked against the
    reference first (on fresh inputs, so the timed call starts from the same state)."""
    for op, variant in LIST_OPS:
        if op not in ops_wanted:
            continue
        key = op if variant is None else f"{op}/{variant}"
        bpe, _ = BYTES_ACCOUNTING[key]
        for cname, case in cases.items():
            base = dict(op=op, variant=variant, case=cname, case_desc=case["desc"], numel=case["numel"],
                        ntensors=case["ntensors"], bytes_per_elem=bpe, bytes=bpe * case["numel"], flops=None)
            ref_state = None
            if case["numel"] <= verify_max:
                rrun, ref_state = make_list_op(op, variant, case["shapes"], device, dict(obj=reference,
                                                                                          device_scalars=False))
                rrun()
            for impl_name, impl in impls.items():
                _time_list_impl(record, base, op, variant, case, device, impl_name, impl, timing, ref_state)
            ref_state = None


def _time_list_impl(record: Recorder, base: dict, op: str, variant: Optional[str], case: dict,
                    device: torch.device, impl_name: str, impl: dict, timing: dict, ref_state: Optional[dict]):
    if not impl["available"]:
        record(base, impl_name, None, "skipped", impl["reason"])
        return
    try:
        fn, state = make_list_op(op, variant, case["shapes"], device, impl)
        err = None
        if ref_state is not None:
            fn()
            err = _max_err(ref_state, state)
            fn, state = make_list_op(op, variant, case["shapes"], device, impl)
        t = time_fn(fn, device, **timing)
        record(base, impl_name, t, "ok", err=err)
    except Exception as exc:  # an impl failing must not lose the other numbers
        record(base, impl_name, None, "error", f"{type(exc).__name__}: {exc}")
    finally:
        state = fn = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ spectral ops
def _spectral_base(op: str, case: dict, numel=None, nbytes=None, flops=None) -> dict:
    return dict(op=op, variant=None, case=case["name"], case_desc=case["name"], numel=numel, ntensors=1,
                bytes_per_elem=None, bytes=nbytes, flops=flops)


def time_spectral_ops(record: Recorder, sp_cases: dict, impls: dict, device: torch.device, timing: dict,
                      ops_wanted: list[str]) -> None:
    """The spectral ops per case and implementation; the reference runs first and is the error baseline."""
    for op, key in SPECTRAL_OPS:
        if op not in ops_wanted:
            continue
        for case in sp_cases[key]:
            ref_res: dict = {}
            for impl_name, impl in impls.items():
                if impl_name == "foreach":
                    record(_spectral_base(op, case), impl_name, None, "skipped",
                           "the foreach backend delegates the spectral ops to the reference (same numbers)")
                elif not impl["available"]:
                    record(_spectral_base(op, case), impl_name, None, "skipped", impl["reason"])
                else:
                    _time_spectral_impl(record, op, case, device, impl_name, impl, timing, ref_res)


def _time_spectral_impl(record: Recorder, op: str, case: dict, device: torch.device, impl_name: str, impl: dict,
                        timing: dict, ref_res: dict) -> None:
    """Time one implementation; ``ref_res`` receives the reference's output (an empty dict until it ran)."""
    try:
        fn, res, nbytes, flops, numel = make_spectral_op(op, case, device, impl)
        base = _spectral_base(op, case, numel, nbytes, flops)
        fn()
        err = None
        if impl_name == "reference":
            ref_res["out"] = res["out"]
        elif ref_res:
            err = _max_err(ref_res, {"out": res["out"]})
        t = time_fn(fn, device, **timing)
        record(base, impl_name, t, "ok", err=err)
    except Exception as exc:
        record(_spectral_base(op, case), impl_name, None, "error", f"{type(exc).__name__}: {exc}")
