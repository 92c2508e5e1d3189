"""Backends of the dispatcher :mod:`fip_fast.ops` besides the reference (:mod:`fip_fast.reference`) and the Triton
kernels (:mod:`fip_fast.kernels`): ``foreach`` (``torch._foreach_*``, any device) and ``cuda`` (the C++/CUDA
extension ``fip_fast._C``).  Each module provides the kernel-level ops of the reference plus
``available(device) -> (ok, reason)``; reach them through :func:`fip_fast.ops.get`."""
