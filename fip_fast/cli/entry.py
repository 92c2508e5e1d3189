"""``main``: the ``fip-fast`` console script and ``python -m fip_fast.cli`` — parse, run the command, and turn a
usage error into one line and an exit status."""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Optional, Sequence

from fip_fast.cli.checks import EXIT_NOT_SAVED, EXIT_USAGE, CLIError
from fip_fast.cli.parser import build_parser

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(message: object) -> str:
    """``message`` on one line without terminal escapes: an error is one line, whatever a library put in it
    (torch's refusal of a pickle is seven lines with bold escapes)."""
    return " ".join(_ANSI.sub("", str(message)).split())


def _os_error(e: OSError) -> str:
    """An OSError as one line that names the file (``[Errno 28] No space left on device`` alone does not)."""
    from fip_fast.io import OutputWriteError

    if isinstance(e, OutputWriteError) or not getattr(e, "filename", None):
        return one_line(e)
    return one_line(f"{e.filename}: {e.strerror or e}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fip-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 0, 2 (a usage error
    or an unusable input, found before any work), 3 (no purified model was written: diverged, clean accuracy
    fell more than the accepted drop, or an output could not be written — e.g. a full disk; the previous outputs
    are intact), 130 (interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    with _warnings_once():
        return _run(args)


@contextlib.contextmanager
def _warnings_once():
    """fip_fast's logged warnings shown once each, as ``fip-fast: warning: …`` (they were printed twice: logged
    when found, and again beside the result)."""
    from fip_fast.cli.render import WarnOnce, reset_warnings

    reset_warnings()
    log, handler = logging.getLogger("fip_fast"), WarnOnce(logging.WARNING)
    propagate, level = log.propagate, log.level
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(min(level or logging.WARNING, logging.WARNING))
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate, log.level = propagate, level


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"fip-fast: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:               # e.g. the disk filled up while writing: the previous outputs are intact
        print(f"fip-fast: error: {_os_error(e)}; no purified model was written (previous outputs are intact)",
              file=sys.stderr)
        return EXIT_NOT_SAVED
    except KeyboardInterrupt:
        print("fip-fast: interrupted", file=sys.stderr)
        return 130
