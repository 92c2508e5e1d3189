"""``python -m bench <command> [options]``.

Commands: ``ops`` (kernel microbenchmarks), ``end_to_end`` (per-step time and time to ASR ≤ 5 %), ``report``
(JSON → markdown), and ``baselines`` / ``lagged_vs_fd`` when those modules are present in ``bench/``.
``python -m bench <command> --help`` for the options of each.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

CORE = ("ops", "end_to_end", "report")
OPTIONAL = ("baselines", "lagged_vs_fd")
ALIASES = {"end-to-end": "end_to_end", "e2e": "end_to_end", "lagged-vs-fd": "lagged_vs_fd"}


def _available() -> list[str]:
    return list(CORE) + [m for m in OPTIONAL if importlib.util.find_spec(f"bench.{m}") is not None]


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
    mod = importlib.import_module(f"bench.{cmd}")   # imported at call time: optional modules may be missing
    entry = getattr(mod, "main", None)
    if entry is None:
        print(f"bench.{cmd} has no main()", file=sys.stderr)
        return 2
    out = entry(argv[1:])
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
