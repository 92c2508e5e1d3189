"""``python -m bench <command> [options]``.

Commands: ``ops`` (kernel microbenchmarks), ``end_to_end`` (per-step time and time to ASR ≤ 5 %), ``report``
(JSON → markdown), ``all`` (ops + end_to_end + report into one folder), and ``baselines`` / ``lagged_vs_fd`` when
those modules are present in ``bench/`` (and ``fast_fip``: in place vs full FIP vs reference; ``protocol``: the fair
comparison of every defense, ``docs/protocol.md``; ``trigger_probe``: where each trigger lives and how much of it a
defense removes; ``peers``: fip_fast next to torch's fused optimizers, BackPACK, PyHessian and the authors'
Fast FIP, ``docs/peers.md``; ``holding_cost`` and ``rebuild_probe``: docs/holding.md; ``retries``: what
``purify``'s retries do, docs/purify.md).

``python -m bench all --out-dir DIR [--device cuda] [--quick]`` writes ``DIR/ops_<device>.json``,
``DIR/end_to_end_<device>.json`` and their ``.md`` tables (the GPU recipe: ``--out-dir $OUT``).
``python -m bench <command> --help`` for the options of each.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

CORE = ("ops", "end_to_end", "report", "all")
OPTIONAL = ("baselines", "lagged_vs_fd", "fast_fip", "protocol", "lm_throughput", "trigger_probe", "peers",
            "holding_cost", "rebuild_probe", "retries")
ALIASES = {"end-to-end": "end_to_end", "e2e": "end_to_end", "lagged-vs-fd": "lagged_vs_fd", "fast-fip": "fast_fip",
           "trigger-probe": "trigger_probe"}


def _available() -> list[str]:
    return list(CORE) + [m for m in OPTIONAL if importlib.util.find_spec(f"bench.{m}") is not None]


def run_all(argv: list[str]) -> int:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m bench all", description="ops + end_to_end + report")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile-loop", action="store_true", help="passed to ops")
    args, rest = p.parse_known_args(argv)
    from . import device_tag, end_to_end, ops, pick_device, report

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(pick_device(args.device)) + ("_quick" if args.quick else "")
    common = ["--device", args.device] + (["--quick"] if args.quick else [])
    ops.main(common + (["--compile-loop"] if args.compile_loop else []) + ["--out", str(out / f"ops_{tag}.json")]
             + rest)
    end_to_end.main(common + ["--out", str(out / f"end_to_end_{tag}.json")])
    report.main([str(out / f"ops_{tag}.json"), str(out / f"end_to_end_{tag}.json")])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("available commands:", ", ".join(cmds))
        return 0 if argv else 2
    cmd = ALIASES.get(argv[0], argv[0])
    if cmd not in cmds:
        print(f"unknown command {argv[0]!r}; available: {', '.join(cmds)}", file=sys.stderr)
        return 2
    if cmd == "all":
        return run_all(argv[1:])
    mod = importlib.import_module(f"bench.{cmd}")   # imported at call time: optional modules may be missing
    entry = getattr(mod, "main", None)
    if entry is None:
        print(f"bench.{cmd} has no main()", file=sys.stderr)
        return 2
    import inspect
    try:
        takes_argv = bool(inspect.signature(entry).parameters)
    except (TypeError, ValueError):
        takes_argv = True
    if takes_argv:
        out = entry(argv[1:])
    else:                              # a main() that parses sys.argv itself
        sys.argv = [f"python -m bench {cmd}"] + argv[1:]
        out = entry()
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
