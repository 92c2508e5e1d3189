"""What the holding mechanisms (docs/holding.md) cost: purification loop time with and without each, per method.

::

    python -m bench holding_cost [--steps 30] [--rounds 3] [--out bench/results/holding_cost_cpu.json]

On the fair protocol's development models (both architectures, BadNets, seed 100, the 10 % clean set; trained or
loaded from its cache), every variant purifies the same model for ``--steps`` steps of batch 64 at the protocol's
frozen options, one thread.  Rounds are interleaved (every variant once per round, the order rotated), so a load
that changes during the run hits every variant alike; the table gives each variant's median loop time and its
ratio to the plain method's in the same rounds.  The issue's budget: a default may cost at most 2× plain FIP.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent / "results"

#: (label, method, options) — the plain method first: the ratios are to it.
_OFF = dict(universal_perturbation=None, distill=None, augment="none")   # every holding default off

VARIANTS: Dict[str, List[Tuple[str, dict]]] = {
    "fip": [("fip", dict(_OFF)),                                  # the method without the (default) holding options
            ("fip + universal, separate gradient", dict(_OFF, universal_perturbation=dict(gradient="separate"))),
            ("fip + universal, shared gradient", dict(_OFF, universal_perturbation=dict(gradient="shared"))),
            ("fip + path aware", dict(_OFF, path_aware=0.5)),
            ("fip, defaults without the patch (universal + distill + augment)",
             dict(universal_perturbation="auto", weight_decay=0.03)),
            ("fip, defaults (universal with the patch + distill + augment)", {}),
            # not a holding option: the plain method with the model and the clean set in channels_last (a CPU tip)
            ("fip, channels_last model and data", dict(_OFF, _channels_last=True))],
    "fast_fip": [("fast_fip", dict(_OFF)),
                 ("fast_fip + universal, separate gradient", dict(_OFF,
                                                                  universal_perturbation=dict(gradient="separate"))),
                 ("fast_fip + universal, shared gradient", dict(_OFF, universal_perturbation=dict(gradient="shared"))),
                 ("fast_fip, defaults (universal + distill + augment)", {}),
                 ("fast_fip, defaults + patch 0.04", dict(universal_perturbation=dict(
                     inputs="auto", schedule="constant", patch=0.04))),
                 ("fast_fip, channels_last model and data", dict(_OFF, _channels_last=True))],
}


def _one(task, method: str, cfg: dict, steps: int) -> float:
    from bench.protocol_ablations import _FAST, _FIP
    from fip_fast.pipeline import purify

    base = _FIP if method == "fip" else _FAST
    cfg = dict(cfg)
    # a copy: purify works on the model it is given, and every variant must start from the backdoored one
    model, (x, y) = copy.deepcopy(task.model), task.clean
    if cfg.pop("_channels_last", False):
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    _, rep = purify(model, (x, y), method=method, steps=steps, batch_size=64, seed=0, progress=False,
                    eval_every=steps, **{**base, **cfg})
    return float(rep.timings["loop"])


def measure(steps: int, rounds: int) -> List[dict]:
    import torch

    from bench.protocol import DEV_CELLS
    from bench.protocol_tasks import build_task, default_cache

    torch.set_num_threads(1)
    rows = []
    for cell in [c for c in DEV_CELLS if c.attack == "badnets"]:
        task = build_task(cell, default_cache())
        for method, variants in VARIANTS.items():
            times: Dict[str, List[float]] = {label: [] for label, _ in variants}
            for r in range(rounds):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for label, cfg in order:
                    times[label].append(_one(task, method, cfg, steps))
            plain = times[variants[0][0]]
            for label, _ in variants:
                ratios = [t / p for t, p in zip(times[label], plain)]
                rows.append({"arch": cell.arch, "method": method, "variant": label, "steps": steps,
                             "median_s": statistics.median(times[label]), "ratio": statistics.median(ratios),
                             "ratio_min": min(ratios), "ratio_max": max(ratios)})
                print(f"{cell.arch:7s} {label:42s} {rows[-1]['median_s']:7.2f} s  ×{rows[-1]['ratio']:.2f} "
                      f"({rows[-1]['ratio_min']:.2f}–{rows[-1]['ratio_max']:.2f})", flush=True)
    return rows


def to_md(doc: dict) -> str:
    lines = ["# What the holding mechanisms cost (docs/holding.md)", "",
             f"`{doc['command']}` — {doc['machine']}, one thread, {doc['rounds']} interleaved rounds, "
             f"{doc['steps']} steps of batch 64; load average at the start {doc['load']}.", "",
             "| arch | variant | loop s (median) | × plain (median, min–max) |", "|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['variant']} | {r['median_s']:.2f} | {r['ratio']:.2f} "
              f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |" for r in doc["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    import os
    import platform

    p = argparse.ArgumentParser(prog="python -m bench holding_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "holding_cost_cpu.json"))
    args = p.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.time()
    rows = measure(args.steps, args.rounds)
    doc = {"command": "python -m bench holding_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "steps": args.steps, "rounds": args.rounds, "load": round(load, 2), "seconds": round(time.time() - t0),
           "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(to_md(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
