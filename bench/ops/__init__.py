"""Microbenchmarks of the fused ops of fip_fast, every implementation side by side in one run.

::

    python -m bench ops                 # defaults for the device (CPU: seconds-scale sizes)
    python -m bench ops --quick         # tiny sizes (CI smoke)
    python -m bench ops --device cuda   # GPU sizes (flat tensor of 128 M elements, GPT-2 124 M, ...)

Ops and variants
----------------
``fisher_accumulate_``, ``global_norm``, ``perturb_``, ``fip_step_`` (``plain``: d = g + anchor;
``fd_mix``: a finite-difference suppressor step — restore θ = (θ+e) − e and mix g + c·(g' − g); ``lagged``: restore
from and write back the lagged perturbation), ``spectral_weight`` and ``spectral_linear_grad``.

Implementations
---------------
``reference`` (the spec: a Python for-loop over tensors, unfused), ``foreach`` (``torch._foreach_*``),
``compile`` (``torch.compile`` of the *reference's per-tensor math*: for the list ops, the reference op applied to a
one-element list of a **flat view** of each tensor is compiled once with ``dynamic=True`` and called tensor by
tensor — one fused kernel per tensor; for the spectral ops, the reference function itself is compiled),
``compile_loop`` (opt-in with ``--compile-loop``: the whole reference for-loop compiled, unrolled over the list),
``triton`` and ``cuda`` (when :func:`fip_fast.ops.availability` says they can run on the device; otherwise they
are listed as skipped with the reason).  Triton on CPU runs only in its interpreter (``TRITON_INTERPRET=1``),
which says nothing about speed: it is skipped on CPU unless ``--impls`` names it.

Scalars are given the way each implementation is used in :class:`fip_fast.FIP`: device 0-dim tensors for the mix
coefficient, restore / perturbation scales, step count and ``found_inf`` for ``foreach``/``triton``/``cuda``
(no host sync in the fused kernels; ``foreach`` reads ``found_inf`` on the host — one sync per call, as in the
optimizer); Python floats for ``reference`` and ``compile`` (a 0-dim tensor would force ``.item()``).

Bytes moved per element (fp32 everywhere; the *minimum* traffic of a fused one-pass implementation — unfused
paths move more, which is what the GB/s column shows)
-------------------------------------------------------------------------------------------------------------
See :data:`bench.ops.cases.BYTES_ACCOUNTING`.  Achieved GB/s = bytes / median time; "% copy" divides by the
bandwidth of a large ``dst.copy_(src)`` (8 bytes per element: one read, one write) measured in the same run.

Layout
------
:mod:`.cases` (parameter lists, spectral shapes, bytes accounting), :mod:`.impls` (the implementations,
``torch.compile`` included), :mod:`.setups` (one call of each op, ready to time), :mod:`.micro` (the op
microbenchmarks and the copy bandwidth), :mod:`.host` (host overhead per ``step()``), :mod:`.results` (the JSON
document; :mod:`bench.report` renders it as markdown), :mod:`.cli` (options, the run, the output file).
"""
from __future__ import annotations

from .cases import BYTES_ACCOUNTING, HYPER, gpt2_shapes, list_cases, llama7b_delta_shapes, model_shapes, spectral_cases
from .cli import add_args, main, run
from .host import host_step_overhead
from .impls import resolve_impls
from .micro import copy_bandwidth
from .results import SCHEMA
from .setups import make_list_op, make_spectral_op

__all__ = ["BYTES_ACCOUNTING", "HYPER", "SCHEMA", "add_args", "copy_bandwidth", "gpt2_shapes", "host_step_overhead",
           "list_cases", "llama7b_delta_shapes", "main", "make_list_op", "make_spectral_op", "model_shapes",
           "resolve_impls", "run", "spectral_cases"]
