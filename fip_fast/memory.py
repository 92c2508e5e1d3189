"""Memory accounting for FIP and Fast FIP: what a purification holds, measured and per parameter.

Measured (:func:`measure`, one optimizer step of a real model):
    * parameters (trainable / frozen), gradients, buffers — with the spectral buffers of Fast FIP broken out:
      ``U``, ``S``, ``Vh`` and ``W0`` of the in-place layers (:mod:`fip_fast.spectral`: ``spectral_U`` /
      ``spectral_S`` / ``spectral_Vh`` / ``spectral_W0``), ``U``, ``S``, ``Vh`` and ``residual`` of the
      module-swapping reference (:class:`fip_fast.spectral_reference.SpectralLayer`) — and the optimizer state,
      by summing ``numel·element_size`` of the live tensors (storage-deduplicated);
    * activations: on CUDA the step's peak ``torch.cuda.max_memory_allocated`` minus what was allocated before
      it; on CPU there is no allocator counter, so the bytes of the tensors *saved for backward* are summed
      with ``torch.autograd.graph.saved_tensors_hooks`` during the forward passes (storage-deduplicated, parameters
      and buffers excluded), plus the projected inputs ``a`` that the in-place layers' output taps keep for the
      δ-gradient (held by the tap, not saved through autograd; also reported alone as ``activations_tap``).
      That is a measurement of what is kept alive between forward and backward (the dominant term), not of
      transient workspace inside kernels — not ``tracemalloc`` (which does not see torch's allocations) and not
      a formula.

Analytical (:func:`bytes_per_param`, :func:`max_params`): bytes per parameter of the selected (linear) layers
for each mode, from the tensors each mode keeps, and the largest model that fits a given memory.  The terms
(b = bytes of the weight dtype, 2 for bf16; fp32 optimizer state, as FIP keeps; r = min(m, n)):

===========================  ====================================================================
mode                         per parameter of a selected m×n layer
===========================  ====================================================================
inference only               b (the weight)
FIP (fd)                     b weight + b grad + b second grad g' (fd keeps g while the second
                             backward writes g') + 4 momentum + 4 Fisher EMA + b anchor θ0 + 4 F0
FIP (lagged)                 as fd without g', plus 4 for the stored perturbation
Fast FIP in place, full      b weight (frozen: no dW) + b W0 copy (the no-drift rule) + U, Vh
rank (``fast_fip``)          b·r·(m + n)/(m·n) = b·(1 + r/max(m, n)) ≤ 2b; δ, S, state O(r)
Fast FIP in place, rank k    b weight + b W0 + b·k·(m + n)/(m·n) (U_k, Vh_k); δ, S, state O(k)
(``fast_fip_rank_k``)
reference, full rank         U + Vh (≤ 2b; the weight is deleted) + W(δ) materialized in the
(``fast_fip_reference``)     forward and saved for backward: b (transient), and a dense dW (b,
                             per layer, during its backward: not counted)
reference, rank k            residual b + W(δ) b + b·k·(m + n)/(m·n) (U_k, Vh_k); δ, S, state O(k)
(``fast_fip_reference_rank_k``)
===========================  ====================================================================

In place, nothing is materialized per step: no W(δ), no kept dW (a weight-side call's dW lives only inside its
backward); the weight is re-derived W0 + U·diag(relu(s) −
S)·Vh once per change of δ (the ``reference`` / ``foreach`` implementation of
:func:`fip_fast.ops.spectral_update_` makes an fp32 m×n temporary for one layer at a time; the kernels do not).
Activations: the tap keeps the projected input a (k values per position, N·P·k) instead of the layer input
(n per position) that a dense dW would need — the layer input is still saved where the input gradient needs it
(e.g. by the preceding nonlinearity), as in the frozen model.  A call whose δ-gradient is cheaper from the weight
gradient (:func:`fip_fast.spectral._taps._weight_side`: full-rank convolutions) keeps the layer input instead, as
full FIP's autograd does (counted once when another op saves the same tensor).

The ``foreach`` implementation (the CPU default) also makes fp32 working copies of θ, g (and g') for each
group during the fused step — a transient of about 12–16 bytes per trainable parameter that the Triton/CUDA
kernels do not allocate; :func:`bytes_per_param` reports it separately (``foreach_transient``).
Activations are per token and depend on batch, sequence length and checkpointing, so they are not in the
per-parameter numbers; :func:`measure` reports them for a concrete batch.

No GPU was available when this module was written: every number in ``docs/large-models.md`` is either a CPU
measurement of the tensors above or this arithmetic.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["tensor_bytes", "MemoryReport", "model_memory", "optimizer_state_bytes", "saved_activation_bytes",
           "measure", "bytes_per_param", "max_params", "MODES", "GB"]

GB = 1e9
MODES = ("inference", "fip", "fip_lagged", "fast_fip", "fast_fip_rank_k", "fast_fip_reference",
         "fast_fip_reference_rank_k")
SPECTRAL_KEYS = ("U", "S", "Vh", "W0", "residual")


def _storage_key(t: Tensor):
    try:
        return (t.untyped_storage().data_ptr(), t.device)
    except Exception:       # wrapper subclasses (DTensor): fall back on identity
        return (id(t), t.device)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once; DTensors: the local
    shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, Tensor):
            continue
        t = _local(t)
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        try:
            total += t.untyped_storage().nbytes()
        except Exception:
            total += t.numel() * t.element_size()
    return total


@dataclass
class MemoryReport:
    """Bytes held by a model + optimizer (see the module docstring for what each field measures)."""
    params_trainable: int = 0
    params_frozen: int = 0
    grads: int = 0
    buffers_spectral: dict = field(default_factory=dict)   # {"U", "S", "Vh", "W0", "residual": bytes}
    buffers_other: int = 0
    optimizer_state: int = 0
    activations: Optional[int] = None
    activations_how: str = ""
    activations_tap: Optional[int] = None   # of ``activations``: projected inputs held by in-place taps
    n_trainable: int = 0
    n_params_total: int = 0             # of the original model (spectral layers counted as their weight)

    @property
    def total_static(self) -> int:
        return (self.params_trainable + self.params_frozen + self.grads + sum(self.buffers_spectral.values())
                + self.buffers_other + self.optimizer_state)

    @property
    def total(self) -> int:
        return self.total_static + (self.activations or 0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total_static"], d["total"] = self.total_static, self.total
        return d


def _spectral_tensors(m: nn.Module, SpectralLayer) -> Optional[tuple[dict, int]]:
    """({key: tensor}, parameters of the original layer − parameters here) of a Fast FIP layer, else None."""
    if hasattr(m, "spectral_delta"):                         # in place (fip_fast.spectral)
        t = dict(U=m.spectral_U, S=m.spectral_S, Vh=m.spectral_Vh, W0=m.spectral_W0)
        return t, -m.spectral_delta.numel()
    if isinstance(m, SpectralLayer):                          # module swap (fip_fast.spectral_reference)
        t = dict(U=m.U, S=m.S, Vh=m.Vh, residual=m.residual)
        return t, m.weight_shape.numel() - m.delta.numel()
    return None


def model_memory(model: nn.Module) -> MemoryReport:
    """Parameters, gradients and buffers of ``model`` (spectral buffers broken out, in-place and reference
    layers alike)."""
    from fip_fast.spectral_reference import SpectralLayer

    rep = MemoryReport()
    params = list(model.parameters())
    rep.params_trainable = tensor_bytes(p for p in params if p.requires_grad)
    rep.params_frozen = tensor_bytes(p for p in params if not p.requires_grad)
    rep.grads = tensor_bytes(p.grad for p in params)
    rep.n_trainable = sum(p.numel() for p in params if p.requires_grad)
    spec: dict[str, list] = {k: [] for k in SPECTRAL_KEYS}
    spec_ids = set()
    n_total = sum(p.numel() for p in params)
    for m in model.modules():
        found = _spectral_tensors(m, SpectralLayer)
        if found is None:
            continue
        for k, t in found[0].items():
            if t is not None:
                spec[k].append(t)
                spec_ids.add(id(t))
        n_total += found[1]
    rep.n_params_total = n_total
    rep.buffers_spectral = {k: tensor_bytes(v) for k, v in spec.items()}
    rep.buffers_other = tensor_bytes(b for b in model.buffers() if id(b) not in spec_ids)
    return rep


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``."""
    return tensor_bytes(v for st in optimizer.state.values() for v in st.values() if isinstance(v, Tensor))


@contextlib.contextmanager
def saved_activation_bytes(model: Optional[nn.Module] = None):
    """Context manager counting the bytes autograd saves for backward inside it (yields a dict whose
    ``"bytes"`` is filled on exit; parameters and buffers of ``model`` are not activations and are skipped)."""
    exclude = set()
    if model is not None:
        exclude = {_storage_key(_local(t)) for t in list(model.parameters()) + list(model.buffers())}
    seen: set = set()
    out = {"bytes": 0}

    def pack(t: Tensor):
        try:
            lt = _local(t)
            key = _storage_key(lt)
            if key not in exclude and key not in seen:
                seen.add(key)
                out["bytes"] += lt.untyped_storage().nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def measure(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None],
            device: Optional[torch.device] = None) -> MemoryReport:
    """Run ``step()`` (one optimizer step, closure included) and report the memory (see the module docstring).

    On CUDA: activations = peak allocated during the step − allocated before it − the gradients and state the
    step created; on CPU: bytes saved for backward (``saved_tensors_hooks``) during the step's forwards, plus the
    projected inputs ``a`` held by the in-place Fast FIP taps (``activations_tap``, part of ``activations``) (for an
    fd suppressor step: the larger of the two passes is what is alive at once; the hook sees both, and the
    maximum over passes is reported by counting storages per pass and keeping the largest)."""
    device = device or next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        rep = model_memory(model)
        rep.optimizer_state = optimizer_state_bytes(optimizer)
        rep.activations = max(0, peak - before - rep.grads - rep.optimizer_state)
        rep.activations_how = "cuda max_memory_allocated (peak − before − grads − new state)"
        return rep
    passes: list[tuple[int, int]] = []
    exclude = {_storage_key(_local(t)) for t in list(model.parameters()) + list(model.buffers())}
    current: dict = {"seen": set(), "bytes": 0, "tap": 0}

    def count(t: Tensor) -> int:
        lt = _local(t)
        key = _storage_key(lt)
        if key in exclude or key in current["seen"]:
            return 0
        current["seen"].add(key)
        n = lt.untyped_storage().nbytes()
        current["bytes"] += n
        return n

    def pack(t: Tensor):
        try:
            count(t)
        except Exception:
            pass
        return t

    def pre_hook(mod, args):          # a new forward pass starts at the root module
        if current["bytes"]:
            passes.append((current["bytes"], current["tap"]))
        current.update(seen=set(), bytes=0, tap=0)

    h = model.register_forward_pre_hook(pre_hook)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _tapped_inputs(count, current):
            step()
    finally:
        h.remove()
    passes.append((current["bytes"], current["tap"]))
    rep = model_memory(model)
    rep.optimizer_state = optimizer_state_bytes(optimizer)
    rep.activations, rep.activations_tap = max(passes)
    rep.activations_how = ("cpu: bytes saved for backward (saved_tensors_hooks) + projected inputs held by the "
                           "in-place taps, largest forward pass")
    return rep


@contextlib.contextmanager
def _tapped_inputs(count: Callable[[Tensor], int], current: dict):
    """While inside, every tap of an in-place Fast FIP layer (:class:`fip_fast.spectral._taps._Call`) has what it
    keeps counted — its projected input ``a``, or the layer input on the weight side (``count(…)``, added to
    ``current["tap"]``): the tap holds it for the δ-gradient outside autograd's saved tensors, so
    ``saved_tensors_hooks`` does not see it."""
    # patched where the tap hook looks it up (the package's fip_fast.spectral._Call is a re-export)
    from fip_fast.spectral import _taps

    base = _taps._Call

    class _Counted(base):                                   # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            try:
                current["tap"] += count(self.a if self.a is not None else self.x)   # the weight side keeps x
            except Exception:
                pass

    _taps._Call = _Counted
    try:
        yield
    finally:
        _taps._Call = base


# ------------------------------------------------------------------------------------------- analytical
def bytes_per_param(mode: str, param_bytes: int = 2, *, m: int = 4096, n: int = 4096, k: int = 64) -> dict:
    """Bytes per parameter of a selected m×n layer for ``mode`` (see the table in the module docstring).

    Returns ``{"persistent": …, "buffers": …, "step_transient": …, "foreach_transient": …, "total": persistent +
    step_transient}``; ``buffers`` is the part of ``persistent`` held in buffers (Fast FIP's W0 / U / Vh /
    residual: not sharded by FSDP); ``foreach_transient`` (fp32 working copies of the ``foreach`` impl) is extra.
    ``step_transient`` counts what exists only between forward and optimizer step (gradients, g', W(δ)).
    The O(k) terms (δ, S, optimizer state of δ) are left out."""
    b = float(param_bytes)
    r = min(m, n)
    kk = min(k, r)
    uv_full, uv_k = b * r * (m + n) / (m * n), b * kk * (m + n) / (m * n)
    buf = 0.0
    if mode == "inference":
        pers, trans, fe = b, 0.0, 0.0
    elif mode == "fip":
        pers, trans, fe = b + 4 + 4 + b + 4, 2 * b, 16.0
    elif mode == "fip_lagged":
        pers, trans, fe = b + 4 + 4 + b + 4 + 4, b, 12.0
    elif mode in ("fast_fip", "fast_fip_rank_k"):                        # in place: weight + W0 + U, Vh
        buf = b + (uv_full if mode == "fast_fip" else uv_k)
        pers, trans, fe = b + buf, 0.0, 0.0
    elif mode == "fast_fip_reference":                                    # module swap: U, Vh; W(δ) per step
        buf = pers = uv_full
        trans, fe = b, 0.0
    elif mode == "fast_fip_reference_rank_k":                             # residual + U_k, Vh_k; W(δ)
        buf = pers = b + uv_k
        trans, fe = b, 0.0
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return dict(persistent=pers, buffers=buf, step_transient=trans, foreach_transient=fe, total=pers + trans)


def max_params(memory_bytes: float, mode: str, param_bytes: int = 2, *, activation_bytes: float = 0.0,
               shards: int = 1, shard_buffers: bool = False, **shape) -> float:
    """The largest number of (selected-layer) parameters whose purification fits ``memory_bytes`` per device.

    ``shards``: FSDP world size.  Parameters, gradients and optimizer state are divided by it; Fast FIP's
    ``U``/``Vh``/``residual`` are *buffers*, which FSDP2 does not shard, so they are divided only with
    ``shard_buffers=True`` (what would need them registered as frozen parameters — see docs/large-models.md).
    In place, the frozen weight is a parameter (sharded) and :func:`fip_fast.spectral.shard` keeps only each
    rank's rows of W0 (sharded too); the reference's W(δ) is not sharded.
    """
    bp = bytes_per_param(mode, param_bytes, **shape)
    free = memory_bytes - activation_bytes
    if mode.startswith("fast_fip"):
        buf = bp["buffers"]
        w0 = float(param_bytes) if mode in ("fast_fip", "fast_fip_rank_k") else 0.0     # sharded by spectral.shard
        rest = buf - w0
        per = ((bp["persistent"] - rest) / shards + (rest / shards if shard_buffers else rest)
               + bp["step_transient"])
    else:
        per = bp["total"] / shards
    return max(0.0, free / per)
