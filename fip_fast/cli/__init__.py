"""``fip-fast``: command-line entry points (``fip-fast demo``, ``fip-fast purify``); see :mod:`fip_fast.cli.app`."""
from fip_fast.cli.app import DEMO_DEFAULTS, CLIError, build_parser, main

__all__ = ["main", "build_parser", "DEMO_DEFAULTS", "CLIError"]
