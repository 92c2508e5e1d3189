"""Where the purify loop runs: one process (:class:`SingleProcess`) or data-parallel over the ranks of a process
group (:class:`DDPStrategy`).  The loop calls the same methods either way; only this module knows about ranks.

Under DDP every rank draws the same global batch and runs its contiguous slice of it, the gradients are averaged by
``DistributedDataParallel`` inside ``backward()``, validation sums are all-reduced, ``eval_fn`` runs on rank 0 and
its result is broadcast, and rank 0 writes the checkpoints — so every rank takes the same decisions and returns
the same model (see :func:`fip_fast.pipeline.purify`, "Distributed purification").
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger("fip_fast")

__all__ = ["SingleProcess", "DDPStrategy", "make_strategy", "sync"]


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously), so that host timings measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_restoring_modes(fn: Callable[[nn.Module], Any], model: nn.Module) -> Dict[str, Any]:
    """``dict(fn(model))`` (``{}`` for None), every module's train/eval flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        res = fn(model)
        return dict(res) if res is not None else {}
    finally:
        for m, t in modes:
            m.training = t


class SingleProcess:
    """One process: every hook is the identity (or runs the thing directly)."""

    mode: Optional[str] = None
    rank, world, is_main = 0, 1, True
    val_shard: Optional[Tuple[int, int]] = None

    def configure(self, model: nn.Module, batch_size: Optional[int], config: Dict[str, Any]) -> None:
        """Check the run against the strategy before anything is built; record it in ``config``."""

    def attach(self, model: nn.Module, purifier: Any) -> None:
        """After the method's builder: route the purifier's training passes through the strategy."""

    def detach(self, purifier: Any) -> None:
        """Before the finish: the plain model again (identical on every rank)."""

    def local_batch(self, idx: Tensor, batch_size: int) -> Tensor:
        """This process's part of the global batch ``idx`` (``batch_size`` indices)."""
        return idx

    def reduce_loss(self, loss_sum: float, loss_n: int, device: torch.device) -> Tuple[float, int]:
        """The sum and count of the finite training losses over every process."""
        return loss_sum, loss_n

    def sync_buffers(self) -> None:
        """Make buffers that each process updated on its own (BatchNorm statistics) the same everywhere."""

    def eval_fn(self, fn: Callable[[nn.Module], Any], model: nn.Module) -> Dict[str, Any]:
        return _call_restoring_modes(fn, model)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def write_checkpoint(self, write: Callable[[], None]) -> None:
        self.sync_buffers()
        write()


class _RankError:
    """An exception on rank 0 passed to the other ranks (so that they raise too instead of waiting)."""

    def __init__(self, message: str):
        self.message = message


class DDPStrategy(SingleProcess):
    """Data-parallel over the default process group (``purify(distributed="ddp")``).

    BatchNorm: on CUDA (and XPU / HPU) every BatchNorm becomes ``nn.SyncBatchNorm`` for the loop (global-batch
    statistics, exact) and is converted back by :meth:`detach`.  Elsewhere torch has no SyncBatchNorm: each rank
    normalizes with its local slice's statistics and the running statistics are averaged over ranks before every
    evaluation and checkpoint (``config["batchnorm"] = "local"``)."""

    mode = "ddp"

    def __init__(self, device: torch.device):
        from fip_fast.integrations import distributed as fd

        self.fd, self.device = fd, device
        self.rank, self.world = fd.rank(), fd.world_size()
        self.is_main = self.rank == 0
        self.val_shard = (self.rank, self.world)
        self.bn_layers: list = []
        self.bn_local = False
        self._restore_bn: Optional[Callable[[], None]] = None

    def configure(self, model: nn.Module, batch_size: Optional[int], config: Dict[str, Any]) -> None:
        bs_global = int(batch_size or 0)
        if bs_global % self.world:
            raise ValueError(f"purify(distributed={self.mode!r}): batch_size {bs_global} is not divisible by the "
                             f"world size {self.world} (each rank runs batch_size / world_size samples of every "
                             "global batch)")
        # The BatchNorm modules of the model as given (before a builder reparameterizes it).
        self.bn_layers = [m for _, m in self.fd.batchnorm_modules(model)]
        self.bn_local = bool(self.bn_layers) and self.device.type not in ("cuda", "xpu", "hpu")
        config.update(distributed=self.mode, world_size=self.world,
                      batchnorm=("local" if self.bn_local else "sync") if self.bn_layers else "none")
        if self.bn_local and self.is_main:
            logger.warning("fip_fast.pipeline: distributed=%r on %s with BatchNorm: torch's SyncBatchNorm needs "
                           "CUDA, so each rank normalizes with its local slice's statistics (not identical to a "
                           "single-process run) and running statistics are averaged over ranks before every "
                           "evaluation", self.mode, self.device.type)

    def attach(self, model: nn.Module, purifier: Any) -> None:
        # After the builder (Fast FIP has reparameterized): DDP registers its hooks on the parameters that
        # require grad now.  SyncBatchNorm shares the BatchNorm tensors, so the optimizer's references stay valid.
        if self.bn_layers and not self.bn_local:
            self._restore_bn = self.fd.to_sync_batchnorm(model)
        purifier.distribute(lambda m: self.fd.wrap_ddp(m, device=self.device))

    def detach(self, purifier: Any) -> None:
        purifier.distribute(None)     # drop the DDP wrapper; the model itself is identical on every rank
        if self._restore_bn is not None:
            self._restore_bn()        # the original BatchNorm modules (they share the current tensors)
            self._restore_bn = None
        self.sync_buffers()

    def local_batch(self, idx: Tensor, batch_size: int) -> Tensor:
        r = self.fd.shard_indices(batch_size, self.rank, self.world)
        return idx[r.start:r.stop]

    def reduce_loss(self, loss_sum: float, loss_n: int, device: torch.device) -> Tuple[float, int]:
        # The mean of the ranks' slice losses = the global-batch loss.
        ln = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(ln)
        return float(ln[0]), int(ln[1])

    def sync_buffers(self) -> None:
        if self.bn_local:
            self.fd.average_buffers(self.bn_layers)

    def eval_fn(self, fn: Callable[[nn.Module], Any], model: nn.Module) -> Dict[str, Any]:
        res: Any = None
        if self.is_main:
            try:
                res = _call_restoring_modes(fn, model)
            except Exception as e:    # the other ranks must raise too, not wait in the broadcast
                res = _RankError(f"eval_fn raised on rank 0: {type(e).__name__}: {e}")
        res = self.fd.broadcast_object(res)
        if isinstance(res, _RankError):
            raise RuntimeError(res.message)
        return res

    def broadcast(self, obj: Any) -> Any:
        return self.fd.broadcast_object(obj)

    def write_checkpoint(self, write: Callable[[], None]) -> None:
        self.sync_buffers()
        if self.is_main:              # every rank holds the same state (DDP): rank 0 writes it
            write()
        self.fd.barrier()


def make_strategy(distributed: Optional[str], kind: str, name: str, device: torch.device) -> SingleProcess:
    """Validate ``purify(distributed=…)`` for a method of ``kind``; the strategy to run it with."""
    if distributed is None or distributed is False or distributed == "none":
        return SingleProcess()
    if distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed must be None or 'ddp', got {distributed!r}")
    if distributed == "fsdp":
        raise NotImplementedError(
            "purify(distributed='fsdp') is not implemented: the loop's selection copies, evaluation and merge need "
            "the full weights.  Use DDP (distributed='ddp'), or FSDP2 through fip_fast.integrations.distributed "
            "(shard_fsdp, shard_fisher, fip_for_fsdp, save_checkpoint) as in examples/torchrun_purify.py "
            "--parallel fsdp")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "purify(distributed='ddp') needs an initialized torch.distributed process group: launch the script "
            "with torchrun (e.g. torchrun --nproc_per_node=2 script.py) and call "
            "fip_fast.integrations.distributed.init_from_env() before purify()")
    if kind != "loop":
        raise ValueError(f"method {name!r} is a kind='runner' method (its own loop): it cannot run under "
                         "purify(distributed=…); only kind='loop' methods (fip, fast_fip, …) can")
    return DDPStrategy(device)
