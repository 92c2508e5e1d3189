"""The JSON document of ``python -m bench ops`` (schema :data:`SCHEMA`; :mod:`bench.report` renders it as
markdown)."""
from __future__ import annotations

from typing import Any

from .. import loadavg
from .cases import BYTES_ACCOUNTING, HYPER

SCHEMA = "fip_fast.bench.ops/1"

COMPILE_NOTE = ("compile = torch.compile(dynamic=True) of the reference op applied to a one-element list of a flat "
                "view, called once per tensor; compile_loop = torch.compile of the whole reference for-loop; "
                "spectral ops: torch.compile(reference function)")


def settle_bandwidth(bw: dict, bw_runs: list[dict], results: list[dict]) -> None:
    """The better of the copy-bandwidth measurements becomes ``bw`` (in place) and the denominator of every
    record's "% copy" (the records were first expressed against ``bw_runs[0]``)."""
    best = max(bw_runs, key=lambda b: b["gbps"])
    if best is not bw_runs[0]:      # re-express "% copy" against the better measurement
        for r in results:
            if r.get("gbps") is not None:
                r["pct_copy_bw"] = 100.0 * r["gbps"] / best["gbps"]
            if r.get("gbps_cpu_time") is not None and best.get("gbps_cpu_time"):
                r["pct_copy_bw_cpu_time"] = 100.0 * r["gbps_cpu_time"] / best["gbps_cpu_time"]
    bw.clear()
    bw.update(best, runs=[{k: b.get(k) for k in ("gbps", "gbps_cpu_time", "median_s", "p20_s", "p80_s")}
                          for b in bw_runs], note="the better of the measurements at the start and at the end")


def document(env: dict, *, quick: bool, timing: dict, cases: dict, sp_cases: dict, verify_max: int, impls: dict,
             bw: dict, results: list[dict], host: list[dict], whole_step: list[dict] = ()) -> dict[str, Any]:
    """The whole result of one run, in the key order of the schema."""
    return dict(schema=SCHEMA, **env, load_after=loadavg(), quick=quick,
                config=dict(timing=timing, hyper=HYPER, dtype="float32",
                            cases={k: dict(desc=v["desc"], numel=v["numel"], ntensors=v["ntensors"])
                                   for k, v in cases.items()},
                            spectral_cases=sp_cases, verify_numel=verify_max, compile_note=COMPILE_NOTE),
                impls={k: dict(available=v["available"], reason=v["reason"]) for k, v in impls.items()},
                bytes_accounting={k: dict(bytes_per_elem=v[0], what=v[1]) for k, v in BYTES_ACCOUNTING.items()},
                copy_bandwidth=bw, results=results, host_step=host, whole_step=list(whole_step))
