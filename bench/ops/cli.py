"""``python -m bench ops``: the options, one run in order (copy bandwidth, list ops, spectral ops, copy bandwidth
again, host overhead) and the output file."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import RESULTS_DIR, device_tag, environment, pick_device, save_results
from .cases import _numel, gpt2_shapes, list_cases, spectral_cases
from .host import host_step_overhead
from .impls import resolve_impls
from .micro import Recorder, copy_bandwidth, time_list_ops, time_spectral_ops
from .results import document, settle_bandwidth
from .whole_step import time_whole_step

DESCRIPTION = "Microbenchmarks of the fused ops of fip_fast, every implementation side by side in one run."

ALL_OPS = ["fisher_accumulate_", "global_norm", "perturb_", "fip_step_", "spectral_weight", "spectral_linear_grad"]


def _configure_torch(device: torch.device, threads: int) -> None:
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:   # the per-tensor compiled functions share one code object per op: allow their variants to coexist
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 0), 64)
    except Exception:
        pass


def _cases(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    cases = list_cases(device, args.quick, args.flat_numel)
    if args.gpt2_layers is not None and "gpt2" in cases:
        c = cases["gpt2"]
        c["shapes"] = gpt2_shapes(n_layer=args.gpt2_layers)
        c["numel"], c["ntensors"] = sum(_numel(s) for s in c["shapes"]), len(c["shapes"])
        c["desc"] = f"GPT-2 small shapes, {args.gpt2_layers} blocks + embeddings"
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases}
    return cases


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    quick = args.quick
    _configure_torch(device, args.threads)
    timing = dict(warmup=1 if quick else 2, min_reps=3 if quick else 5, max_reps=5 if quick else 50,
                  budget_s=0.0 if quick else args.budget)
    env = environment(device)
    wanted = args.impls
    if wanted is None and quick:   # compiling takes ~10-30 s per graph on a CPU: not in the smoke run
        wanted = ["reference", "foreach", "triton", "cuda", "cpu"]
    impls = resolve_impls(device, wanted, args.compile_loop, explicit=args.impls is not None)
    cases = _cases(args, device)
    ops_wanted = args.ops or ALL_OPS
    say = (lambda *a: None) if args.silent else (lambda *a: print(*a, flush=True))

    # Copy bandwidth, measured at the start and again at the end of the run (machine load drifts); the better of
    # the two is the denominator of "% copy".  CPU: the size of the flat case (the working set of the ops);
    # CUDA: 256 Mi elements (2 GiB moved per copy, far beyond L2).
    copy_numel = args.copy_numel or (256 * 2**20 if device.type == "cuda" else
                                     max(cases["flat"]["numel"] if "flat" in cases else 0, 2**22))
    bw_runs = [copy_bandwidth(device, copy_numel, timing)]
    bw = dict(bw_runs[0])
    say(f"copy bandwidth: {bw['gbps']:.1f} GB/s ({copy_numel} elements)")

    record = Recorder(bw, say)
    time_list_ops(record, cases, impls, device, timing, ops_wanted, args.verify_numel)
    sp_cases = spectral_cases(device, quick)
    time_spectral_ops(record, sp_cases, impls, device, timing, ops_wanted)

    whole = []
    if not args.no_whole_step and "resnet18" in cases:
        whole = time_whole_step(cases["resnet18"], impls, device, timing, compile_loop=args.compile_loop)
        for w in whole:
            say(f"  whole step  {w['optimizer']:<24}{w['impl']:<10}" + (
                f"{w['median_s'] * 1e3:9.2f} ms  ×{w.get('vs_sgd', float('nan')):.2f} of SGD" if "median_s" in w
                else f"  {w['error']}"))

    bw_runs.append(copy_bandwidth(device, copy_numel, timing))
    say(f"copy bandwidth at the end: {bw_runs[-1]['gbps']:.1f} GB/s")
    settle_bandwidth(bw, bw_runs, record.results)
    host = [] if args.no_host_step else host_step_overhead(device, impls, quick=quick)
    for h in host:
        say(f"  step() host  {h['optimizer']:<12}{h['impl']:<10}{h['ntensors']:>4} tensors "
            f"{h['per_step_median_s'] * 1e6:9.1f} µs  [{h['per_step_p20_s'] * 1e6:.1f}, "
            f"{h['per_step_p80_s'] * 1e6:.1f}]")
    return document(env, quick=quick, timing=timing, cases=cases, sp_cases=sp_cases, verify_max=args.verify_numel,
                    impls=impls, bw=bw, results=record.results, host=host, whole_step=whole)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI smoke)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="implementations (reference foreach compile compile_loop triton cuda cpu); default: all but "
                        "compile_loop")
    p.add_argument("--compile-loop", action="store_true",
                   help="also time torch.compile of the whole reference for-loop (slow to compile)")
    p.add_argument("--ops", nargs="+", default=None, help="subset of ops")
    p.add_argument("--cases", nargs="+", default=None, help="subset of list cases (flat resnet18 gpt2 deltas_7b)")
    p.add_argument("--flat-numel", type=int, default=None, help="elements of the flat tensor")
    p.add_argument("--gpt2-layers", type=int, default=None, help="GPT-2 blocks in the gpt2 case (12 = full)")
    p.add_argument("--copy-numel", type=int, default=None, help="elements of the copy-bandwidth tensor")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repetitions per measurement (CPU)")
    p.add_argument("--verify-numel", type=int, default=2_000_000,
                   help="check each impl against the reference on cases up to this many elements")
    p.add_argument("--no-host-step", action="store_true", help="skip the FIP.step() host-overhead measurement")
    p.add_argument("--no-whole-step", action="store_true",
                   help="skip FIP.step() vs SGD(foreach).step() on the resnet18 list")
    p.add_argument("--out", default=None, help="output JSON (default bench/results/ops_<device>.json; "
                                               "ops_<device>_quick.json with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: per-core numbers; with several threads on a shared machine "
                        "OpenMP barriers wait for preempted threads and the timings become meaningless)")
    p.add_argument("--silent", action="store_true")
    p.add_argument("--markdown", action="store_true", help="also write the markdown report next to the JSON")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench ops", description=DESCRIPTION)
    add_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    device = torch.device(res["device"]["type"])
    tag = device_tag(device) if device.type != "cuda" else device_tag(torch.device("cuda"))
    path = Path(args.out) if args.out else RESULTS_DIR / f"ops_{tag}{'_quick' if args.quick else ''}.json"
    return save_results(res, path, markdown=args.markdown, silent=args.silent)
