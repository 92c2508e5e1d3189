"""``fip_fast.pipeline``: the purification pipeline — ``purify(model, clean, method=…)`` and its parts.

See :func:`fip_fast.pipeline.run.purify` (also ``fip_fast.purify``) for what a purification does; each part is a
small module: ``data``, ``registry``, ``methods``, ``purifier``, ``options``, ``evaluator``, ``selection``,
``checkpoint``, ``strategy``, ``loop``, ``report``, ``run``.
"""
from fip_fast.pipeline.checkpoint import ResumeMismatchError
from fip_fast.pipeline.methods import DEFAULTS
from fip_fast.pipeline.purifier import MethodContext, OptimizerPurifier, Purifier
from fip_fast.pipeline.registry import MethodSpec, available_methods, get_method, register_method
from fip_fast.pipeline.report import PurifyReport, _jsonable  # noqa: F401  (the CLI's JSON conversion)
from fip_fast.pipeline.run import purify

__all__ = ["purify", "PurifyReport", "Purifier", "OptimizerPurifier", "MethodContext", "MethodSpec",
           "register_method", "available_methods", "get_method", "DEFAULTS", "ResumeMismatchError"]
