"""The one measurement both commands add to the pipeline's metrics: λ_max, the top Hessian eigenvalue of the
clean loss on one fixed clean batch."""
from __future__ import annotations


def lambda_max(model, x, y, iters: int) -> float:
    """λ_max by ``iters`` power iterations (NaN when ``iters`` is 0: ``--lambda-iters 0`` skips it)."""
    from fip_fast.evaluation.smoothness import hessian_max_eigenvalue

    if iters <= 0:
        return float("nan")
    import torch

    with torch.enable_grad():
        return hessian_max_eigenvalue(model, x, y, iters=iters, tol=1e-3, seed=0)
