"""Layer adapters: how a layer type's weight is a matrix and how its δ-gradient comes from activations — one
registry shared by the in-place form (:mod:`fip_fast.spectral`) and the module-swapping reference
(:mod:`fip_fast.spectral_reference`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Adapter:
    """How a layer type's weight is a matrix and how its δ-gradient comes from activations — one registry for the
    in-place form (here) and the module-swapping reference (:mod:`fip_fast.spectral_reference`).

    ``to_matrix(weight) -> (m, n)`` (a view of the weight where possible); ``from_matrix(W, shape) -> weight``;
    ``project(layer, x, U, Vh) -> a`` the projected input, (N, P, k) with P positions per sample;
    ``project_grad(layer, g_out, U, Vh) -> c`` the projected output gradient, (N, P, k);
    ``weight_grad(layer, x, g_out) -> dW`` the dense weight gradient as an (m, n) matrix, or None where the type
    has none — then the δ-gradient always comes from the projections (see :func:`_weight_side`);
    ``forward(layer, x, weight) -> y`` the layer run with another weight (the reference's module swap needs it;
    None: the type works in place only); ``linear_like``: y = x·Wᵀ + b along the last dim (the reference's fast
    per-sample Fisher).
    """
    to_matrix: Callable[[Tensor], Tensor]
    from_matrix: Callable[[Tensor, torch.Size], Tensor]
    project: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    project_grad: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    weight_grad: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    forward: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    linear_like: bool = False


def _flat(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def _unflat(W: Tensor, shape: torch.Size) -> Tensor:
    return W.reshape(shape)


def _tokens(t: Tensor) -> Tensor:
    """(N, ..., d) → (N, P, d): every leading dimension after the first is a position of the sample."""
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, 1, -1)


def _linear_project(layer, x, U, Vh):
    return _tokens(x) @ Vh.to(x.dtype).t()


def _linear_project_grad(layer, g, U, Vh):
    return _tokens(g) @ U.to(g.dtype)


def _conv_project(layer, x, U, Vh):
    """The input convolved with the k rows of Vh as filters (each group's input with the same filters):
    (N, G·k, *out_spatial) → (N, P·G, k) with positions and groups as the positions of the sample.  With one group
    the result is a transposed *view* of the convolution's output (no copy; so is :func:`_conv_project_grad`'s)."""
    G, k = layer.groups, Vh.shape[0]
    filt = Vh.to(x.dtype).reshape(k, layer.in_channels // G, *layer.kernel_size)
    if G == 1:
        a = layer._conv_forward(x, filt, None)                                         # (N, k, *sp)
        return a.reshape(a.shape[0], k, -1).transpose(1, 2)
    a = layer._conv_forward(x, filt.repeat(G, *([1] * (filt.dim() - 1))), None)     # (N, G·k, *sp)
    return a.reshape(a.shape[0], G, k, -1).permute(0, 1, 3, 2).reshape(a.shape[0], -1, k)


def _conv_project_grad(layer, g, U, Vh):
    """Σ over each group's output channels of g·U: (N, out, *sp) → (N, P·G, k), ordered as :func:`_conv_project`."""
    G, k = layer.groups, U.shape[1]
    N = g.shape[0]
    if G == 1:                                  # Uᵀ·g per sample: (k, out)·(out, P), a transposed view as above
        return torch.matmul(U.to(g.dtype).t(), g.reshape(N, g.shape[1], -1)).transpose(1, 2)
    gg = g.reshape(N, G, g.shape[1] // G, -1)                                        # (N, G, out/G, P)
    c = torch.einsum("ngop,gok->ngpk", gg, U.to(g.dtype).reshape(G, -1, k))
    return c.reshape(N, -1, k)


def _linear_weight_grad(layer, x, g):
    m = g.shape[-1]
    return g.reshape(-1, m).t() @ x.reshape(-1, x.shape[-1])


def _conv_weight_grad(layer, x, g):
    """The convolution's weight gradient (one GEMM, the one full FIP's backward computes), as (m, n)."""
    padding = layer.padding
    if layer.padding_mode != "zeros":             # what nn.Conv*._conv_forward does before a zero-padding conv
        x = torch.nn.functional.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * (x.dim() - 2)
    dim = x.dim() - 2
    _, dw, _ = torch.ops.aten.convolution_backward(g, x, layer.weight, None, layer.stride, padding, layer.dilation,
                                                   False, [0] * dim, layer.groups, [False, True, False])
    return dw.reshape(dw.shape[0], -1)


def _embedding_project(layer, idx, U, Vh):
    a = U[idx]                                                                        # (…, k)
    if layer.padding_idx is not None:                 # nn.Embedding gives the padding row no gradient
        a = a * (idx != layer.padding_idx).unsqueeze(-1).to(a.dtype)
    return _tokens(a if idx.dim() > 0 else a.unsqueeze(0))


def _embedding_project_grad(layer, g, U, Vh):
    return _tokens(g) @ Vh.to(g.dtype).t()


def _linear_forward(layer, x, w):
    return torch.nn.functional.linear(x, w, layer.bias)


def _conv_forward(layer, x, w):
    return layer._conv_forward(x, w, layer.bias)


def _embedding_forward(layer, idx, w):
    return torch.nn.functional.embedding(idx, w, layer.padding_idx, None, layer.norm_type, layer.scale_grad_by_freq,
                                         layer.sparse)


LINEAR_ADAPTER = Adapter(_flat, _unflat, _linear_project, _linear_project_grad, _linear_weight_grad,
                         _linear_forward, linear_like=True)
CONV_ADAPTER = Adapter(_flat, _unflat, _conv_project, _conv_project_grad, _conv_weight_grad, _conv_forward)
EMBEDDING_ADAPTER = Adapter(_flat, _unflat, _embedding_project, _embedding_project_grad,
                            forward=_embedding_forward)
_ADAPTERS: dict[type, Adapter] = {nn.Linear: LINEAR_ADAPTER, nn.Conv1d: CONV_ADAPTER, nn.Conv2d: CONV_ADAPTER,
                                  nn.Conv3d: CONV_ADAPTER, nn.Embedding: EMBEDDING_ADAPTER}
DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def register_adapter(layer_type: type, adapter: Adapter) -> None:
    """Teach :func:`reparameterize` (and :func:`fip_fast.spectral_reference.reparameterize`, which shares this
    registry; it needs ``adapter.forward``) a new layer type (e.g. Hugging Face GPT-2 ``Conv1D``)."""
    _ADAPTERS[layer_type] = adapter


def _adapter_for(layer: nn.Module) -> Adapter:
    for t in type(layer).__mro__:
        if t in _ADAPTERS:
            return _ADAPTERS[t]
    raise TypeError(f"no spectral adapter for {type(layer).__name__}; see fip_fast.spectral.register_adapter")


def _weights_read_directly(model: nn.Module) -> set:
    """ids of the layers whose weight their parent reads directly, never calling the layer's forward — so no hook
    of it would ever run: ``nn.MultiheadAttention.out_proj`` (``F.multi_head_attention_forward`` takes
    ``out_proj.weight``; ``nn.TransformerEncoderLayer``, torchvision's ViT).  They are not reparameterized."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
