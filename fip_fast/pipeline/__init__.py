"""``fip_fast.pipeline``: the purification pipeline — ``purify(model, clean, method=…)`` and its parts.

See :func:`fip_fast.pipeline.run.purify` (also ``fip_fast.purify``) for what a purification does.
"""
from fip_fast.pipeline.run import (DEFAULTS, MethodContext, MethodSpec, OptimizerPurifier, Purifier,
                                   PurifyReport, ResumeMismatchError, _jsonable, available_methods, get_method,
                                   purify, register_method)

__all__ = ["purify", "PurifyReport", "Purifier", "OptimizerPurifier", "MethodContext", "MethodSpec",
           "register_method", "available_methods", "get_method", "DEFAULTS", "ResumeMismatchError"]
