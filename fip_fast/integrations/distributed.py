"""Multi-process purification with ``torch.distributed`` only (DDP and FSDP2), for ``torchrun``.

What works unchanged, and why (each checked by ``tests/test_distributed.py`` against a single-process run on the
same global batch, 2 processes, gloo, CPU):

DDP (:func:`wrap_ddp`)
    * :func:`fip_fast.fisher.estimate_fisher` all-reduces its sums and sample counts under an initialized
      process group, so every rank gets the Fisher F0 of the union of the ranks' data.
    * :class:`fip_fast.FIP` needs nothing: DDP averages gradients inside ``backward()``, so after the closure
      every rank holds the same global-batch gradient g; on an ``"fd"`` suppressor step the perturbation
      e = ρ·g/‖g‖ is built from that all-reduced g (identical on every rank), the second closure call's
      backward is all-reduced too, and the fused step is the same arithmetic on the same numbers on every rank.
    * ``"lagged"``: the next perturbation is also built from the all-reduced g, so ranks stay bit-identical.
FSDP2 (:func:`shard_fsdp`, ``torch.distributed.fsdp.fully_shard``, present in torch ≥ 2.6 and working on CPU
with gloo in the torch 2.13 used here)
    * Reparameterize **before** sharding (the SVD needs the whole weight): in place (``fip_fast.spectral``, the
      mixing band added before sharding too — :func:`shard_fsdp` then calls :func:`fip_fast.spectral.shard`, which
      keeps each rank's rows of W0 and re-derives each rank's rows of the weight before FSDP gathers them) or the
      module-swapping ``fip_fast.spectral_reference``.  δ, biases and every other parameter become ``DTensor`` shards
      (``Shard(0)``); ``U``, ``S``, ``Vh`` and the reference's rank-k residual are buffers and stay replicated
      (they are frozen).  For rank-k Fast FIP of
      a large model the residual dominates memory: see :mod:`fip_fast.memory`.
    * The optimizer state (momentum, Fisher EMA, anchor θ0, F0, lagged perturbation) is created with
      ``zeros_like``/``clone`` of the sharded parameters, so it is sharded the same way.
    * The group norm ‖g‖ of the fd/lagged suppressor: with the ``foreach`` implementation (the CPU default),
      ``torch._foreach_norm`` on ``Shard(0)`` DTensor gradients returns a *Replicate* DTensor holding the
      **global** norm (DTensor reduces the partial norms across the mesh), so e = ρ·g/‖g‖ uses the norm over
      the full group — verified against ``full_tensor()`` in the tests.  The Triton/CUDA kernels work on raw
      storage and cannot take DTensors, and the ``reference`` impl mixes plain and DTensor tensors; so
      :func:`fip_for_fsdp` (the documented wrapper) builds the optimizer with ``impl="foreach"`` when any
      parameter is a DTensor.  No core change is needed for correctness; fused kernels on FSDP shards would
      need a ``to_local()`` + all-reduce of the squared norm in :meth:`FIP.step` (a core change, not made).
    * F0 on a sharded model: :func:`fip_fast.fisher.estimate_fisher` keys its result by the parameters it sees
      and takes per-sample gradients through hooks/``torch.func``, which FSDP's unsharded-on-the-fly parameters
      defeat.  Estimate F0 **after reparameterizing and before sharding** (it is all-reduced over ranks, so each
      rank holds the same full F0), keep it by *name* (:func:`fisher_by_name`), and hand it to the sharded
      parameters with :func:`shard_fisher` (each rank keeps its own slice).  For Fast FIP F0 has one entry per
      singular value, so this costs nothing; for full FIP on a model that only fits sharded it needs one
      full-model forward/backward per rank (use ``estimator="batch"`` and few batches), a known limitation.
    * Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` go through ``torch.distributed.checkpoint``
      (``get_state_dict`` / ``set_state_dict``): each rank writes its shards; loading works into a model and
      optimizer sharded the same way.

Typical script (see ``examples/torchrun_purify.py``)::

    rank, world, device = init_from_env()
    model = load_model().to(device)
    params = hf.reparameterize_transformer(model, relative=True)       # before wrapping
    f0 = estimate_fisher(model, my_shard_of_clean_loader, ..., params=params, normalize="max")
    model = wrap_ddp(model)  # or: names = fisher_by_name(model, f0); shard_fsdp(model); f0 = shard_fisher(...)
    opt = fip_for_fsdp(...) / FIP(params, fisher0=f0, ...)
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger("fip_fast")

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_rank0", "rank0_print", "Rank0Filter",
           "barrier", "cleanup", "wrap_ddp", "unwrap", "shard_fsdp", "is_dtensor", "fisher_by_name",
           "shard_fisher", "fip_for_fsdp", "save_checkpoint", "load_checkpoint", "shard_indices",
           "broadcast_object", "batchnorm_modules", "to_sync_batchnorm", "average_buffers"]


# ------------------------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Initialize the default process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and pick this rank's device.

    Without those variables (a plain ``python script.py``) nothing is initialized and ``(0, 1, device)`` is
    returned, so the same script runs single-process.  The backend defaults to ``nccl`` when CUDA is available,
    else ``gloo``.  Idempotent.  Returns ``(rank, world_size, device)``.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1, device
    if not is_distributed():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kw: dict[str, Any] = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if device.type == "cuda":
            kw["device_id"] = device
        dist.init_process_group(**kw)
    return rank(), world_size(), device


def cleanup() -> None:
    """Destroy the default process group if one is initialized."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank0_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


class Rank0Filter(logging.Filter):
    """A logging filter that lets records through on rank 0 only: ``handler.addFilter(Rank0Filter())``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_rank0()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, r: Optional[int] = None, w: Optional[int] = None) -> range:
    """Indices of a length-``n`` dataset that rank ``r`` of ``w`` owns: contiguous blocks, as equal as possible.
    (The global batch of a step is the concatenation of the ranks' local batches in rank order.)"""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


# ------------------------------------------------------------------------------------------- DDP
def wrap_ddp(model: nn.Module, device: Optional[torch.device] = None, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` when a process group is initialized, else ``model`` unchanged.

    Reparameterize (Fast FIP) *before* wrapping: DDP registers its gradient hooks on the parameters that
    require grad when it is constructed.  Buffers are broadcast from rank 0 once, at construction, but not before
    every forward (``forward_sync_buffers=False`` where torch has it, else ``broadcast_buffers=False``) — FIP
    has no running statistics that need it, and the SVD buffers are identical on every rank.
    """
    if not is_distributed():
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    device = device or next(model.parameters()).device
    if "broadcast_buffers" not in kwargs and "forward_sync_buffers" not in kwargs:
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [device.index])
    return DDP(model, **kwargs)


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every BatchNorm layer (``_BatchNorm``: 1d/2d/3d/Sync) of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def to_sync_batchnorm(model: nn.Module):
    """Replace every BatchNorm of ``model`` (in place, not the root) by ``nn.SyncBatchNorm`` sharing the *same*
    parameter and buffer tensors (``SyncBatchNorm.convert_sync_batchnorm``), so that train-mode statistics are
    those of the global batch.  Returns ``restore()``, which puts the original modules back (they hold the
    current values, since the tensors are shared) — the model is again of its original architecture.

    ``SyncBatchNorm`` synchronizes on CUDA (and XPU/HPU) only; torch refuses it on CPU tensors."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError("to_sync_batchnorm: the root module itself is a BatchNorm; wrap it in a container")
    originals = batchnorm_modules(model)
    for name, m in originals:
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).add_module(child, nn.SyncBatchNorm.convert_sync_batchnorm(m))

    def restore() -> None:
        for name, m in originals:
            parent, _, child = name.rpartition(".")
            m.training = model.get_submodule(name).training
            model.get_submodule(parent).add_module(child, m)

    return restore


@torch.no_grad()
def average_buffers(modules: Iterable[nn.Module]) -> None:
    """All-reduce-average the floating-point buffers of ``modules`` over ranks (e.g. BatchNorm running
    statistics accumulated from each rank's local batches), so every rank holds the same values.  No-op
    without a process group."""
    if not is_distributed():
        return
    w = world_size()
    for m in modules:
        for b in m.buffers(recurse=False):
            if b is not None and b.is_floating_point():
                dist.all_reduce(b)
                b.div_(w)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 wraps in place, so a sharded model is returned as is)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


# ------------------------------------------------------------------------------------------- FSDP2
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6
        raise RuntimeError("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch ≥ 2.6") from exc
    return fully_shard


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def shard_fsdp(model: nn.Module, units: Optional[Sequence[type] | Iterable[nn.Module]] = None, *, mesh=None,
               reshard_after_forward: bool = True, **kwargs) -> nn.Module:
    """Shard ``model`` in place with FSDP2 ``fully_shard``: first every unit, then the root.

    Args:
        units: module classes (e.g. ``GPT2Block``) or module instances to shard as separate units; default: the
            blocks of a ``transformers`` model (``model.transformer.h`` / ``model.model.layers`` …) when found,
            else only the root.
        mesh: a 1-d ``DeviceMesh`` (default: all ranks on the default group's device type).
    Reparameterize first (Fast FIP in place, :mod:`fip_fast.spectral`: its weight update is then moved ahead of
    FSDP's gathers by :func:`fip_fast.spectral.shard`, called here; or the module-swapping
    :mod:`fip_fast.spectral_reference`).  A tied embedding / LM head pair must live in one unit (the root, by
    default).
    """
    fully_shard = _fully_shard()
    kw = dict(reshard_after_forward=reshard_after_forward, **kwargs)
    if mesh is not None:
        kw["mesh"] = mesh
    if units is None:
        mods = _default_units(model)
    elif all(isinstance(u, type) for u in units):  # type: ignore[union-attr]
        types = tuple(units)  # type: ignore[arg-type]
        mods = [m for m in model.modules() if isinstance(m, types) and m is not model]
    else:
        mods = list(units)  # type: ignore[arg-type]
    for m in mods:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    from fip_fast import spectral

    if spectral.spectral_layers(model):
        spectral.shard(model)
    return model


def _default_units(model: nn.Module) -> list[nn.Module]:
    for path in ("transformer.h", "model.layers", "model.decoder.layers", "vit.encoder.layer", "encoder.layer",
                 "encoder.layers", "layers", "h", "blocks"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return list(blocks)
    return []


def fisher_by_name(model: nn.Module, fisher: dict[Tensor, Tensor]) -> dict[str, Tensor]:
    """Re-key a Fisher dict ``{parameter: F}`` by parameter name (survives FSDP's parameter replacement)."""
    ids = {id(p): n for n, p in unwrap(model).named_parameters()}
    out = {}
    for p, f in fisher.items():
        if id(p) not in ids:
            raise ValueError("fisher has an entry for a tensor that is not a parameter of model")
        out[ids[id(p)]] = f
    return out


def shard_fisher(model: nn.Module, fisher: dict[str, Tensor]) -> dict[Tensor, Tensor]:
    """``{sharded parameter: F0 shard}`` from full, rank-identical F0 tensors keyed by name.

    Each F0 is laid out like its (possibly DTensor) parameter: same mesh, same placements; every rank keeps only
    its own slice.  Plain (unsharded) parameters get the full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = dict(unwrap(model).named_parameters())
    out = {}
    for name, f in fisher.items():
        if name not in params:
            raise KeyError(f"no parameter named {name!r} in the sharded model")
        p = params[name]
        if isinstance(p, DTensor):
            f = f.to(p.device_mesh.device_type if p.device_mesh.device_type != "cpu" else "cpu")
            out[p] = distribute_tensor(f.float(), p.device_mesh, p.placements)
        else:
            out[p] = f.float().to(p.device)
    return out


def fip_for_fsdp(params, **kwargs):
    """``fip_fast.FIP(params, **kwargs)`` for FSDP2-sharded (DTensor) parameters.

    The wrapper around the one documented limitation: the group norm ‖g‖ of the fd/lagged suppressor must be the
    norm over the *full* group, which the ``foreach`` implementation computes on DTensors (partial norms are
    reduced across the mesh: a Replicate DTensor), while the Triton/CUDA kernels cannot take DTensors and the
    ``reference`` impl mixes plain tensors with DTensors.  So ``impl`` is forced to ``"foreach"`` (``"auto"``
    or unset) when a parameter is a DTensor, and any other explicit choice raises.  For plain parameters it is
    exactly ``FIP``.  Both ``"fd"`` and ``"lagged"`` run on DTensor parameters."""
    from fip_fast.optim import FIP
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if any(is_dtensor(p) for p in flat):
        impl = kwargs.get("impl", "auto")
        if impl not in ("auto", "foreach"):
            raise ValueError(f"FSDP2 (DTensor) parameters need impl='foreach' (the group norm must be global); "
                             f"got impl={impl!r}")
        kwargs["impl"] = "foreach"
    return FIP(params, **kwargs)


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[dict] = None) -> None:
    """Save model (+ optimizer) with ``torch.distributed.checkpoint``: every rank writes its own shards to the
    directory ``path``.  Works for plain, DDP and FSDP2 models.  With ``"lagged"`` FIP, call it between steps
    (the parameters then hold θ; the stored perturbation is saved and is pending again after loading).  ``extra``:
    small picklable metadata (rank 0's copy is saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    m = unwrap(model)
    if optimizer is not None:
        msd, osd = get_state_dict(m, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(m)}
    state["extra_json"] = json.dumps(extra if extra is not None else {})
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load what :func:`save_checkpoint` wrote into a model (and optimizer) sharded the same way.  The FIP state
    is restored in fp32 (``torch`` casts optimizer state to the parameter dtype; FIP keeps fp32 state).
    Returns the ``extra`` metadata (or ``{}``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )
    m = unwrap(model)
    if optimizer is not None:
        # DCP loads only the keys the target state dict already has: create FIP's lazily made state (step,
        # momentum, Fisher EMA, lagged perturbation) first, as zeros, so that all of it is read back.
        if hasattr(optimizer, "_lazy_state"):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer._lazy_state(p, group)
        msd, osd = get_state_dict(m, optimizer)
        state = {"model": msd, "optim": osd, "extra_json": "{}"}
    else:
        state = {"model": get_model_state_dict(m), "extra_json": "{}"}
    dcp.load(state, checkpoint_id=path)
    if optimizer is not None:
        set_state_dict(m, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _fp32_state(optimizer)
    else:
        set_model_state_dict(m, state["model"])
    return json.loads(state["extra_json"])


def _fp32_state(optimizer) -> None:
    for p, st in optimizer.state.items():
        for k in ("momentum_buffer", "fisher", "pert", "fisher0", "step"):
            if k in st and isinstance(st[k], Tensor) and st[k].dtype != torch.float32:
                st[k] = st[k].float()
        if "anchor" in st and st["anchor"].dtype != p.dtype:
            st["anchor"] = st["anchor"].to(p.dtype)
