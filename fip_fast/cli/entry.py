"""``main``: the ``fip-fast`` console script and ``python -m fip_fast.cli`` — parse, run the command, and turn a
usage error into one line and an exit status."""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from fip_fast.cli.checks import EXIT_USAGE, CLIError
from fip_fast.cli.parser import build_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fip-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 0, 1 (an OS error,
    e.g. a full disk: the previous outputs are intact), 2 (a usage error), 3 (diverged), 130 (interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"fip-fast: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:               # e.g. the disk filled up while writing: the previous outputs are intact
        print(f"fip-fast: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fip-fast: interrupted", file=sys.stderr)
        return 130
