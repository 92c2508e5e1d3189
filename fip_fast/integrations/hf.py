"""Hugging Face ``transformers`` integration for Fast FIP (optional: ``pip install fip_fast[hf]``).

Importing this module registers a spectral :class:`~fip_fast.spectral.Adapter` for GPT-2's
``transformers.pytorch_utils.Conv1D`` (when ``transformers`` is installed; nothing happens otherwise, and the
helpers still work on plain ``nn.Linear`` models such as LLaMA-style blocks or torchvision ViTs).

GPT-2 ``Conv1D``
    Its weight is stored transposed, ``(in, out)``, and the layer computes ``y = x·W + b``.  The adapter sees
    the weight as the matrix ``Wᵀ`` of shape ``(out, in)`` — exactly an ``nn.Linear`` weight — so
    ``U (out, r)``, ``Vh (r, in)`` and ``y = x·W(δ)ᵀ_matrix + b``.  That makes the layer *linear-like* in the
    sense of :class:`~fip_fast.spectral.Adapter` (``y = x·Mᵀ + b`` along the last dimension, ``M`` the adapter
    matrix), so :func:`fip_fast.fisher.estimate_fisher` uses the fast per-sample δ-Fisher
    ``(x·Vhᵀ) ⊙ (g_out·U)`` for it; ``tests/test_hf.py`` checks it against the generic ``torch.func`` path.

Layer selection (:func:`reparameterize_transformer`)
    * every ``nn.Linear`` and GPT-2 ``Conv1D`` (attention q/k/v/o, MLP up/gate/down projections, ViT
      ``query/key/value/dense``, classifier heads);
    * not the output projection of ``nn.MultiheadAttention`` (torchvision ViT) nor the layers inside
      ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: those modules read ``out_proj.weight`` /
      ``linear1.bias`` … directly instead of calling the layer, so they can't be swapped;
    * the LM head only with ``lm_head=True``, the token embedding only with ``embeddings=True``.

Tied embeddings (GPT-2, many small LMs: ``lm_head.weight is wte.weight``)
    A tied LM head is never reparameterized on its own (that would silently untie it).  With
    ``embeddings=True`` the input embedding becomes spectral and the head is replaced by :class:`TiedLMHead`,
    which computes ``x·W_emb(δ)ᵀ (+ b)`` from the *same* δ, so the tie holds during purification;
    :func:`merge_transformer` bakes W(δ) in and re-ties ``lm_head.weight`` to the merged embedding.
    ``lm_head=True`` with a tied head and ``embeddings=False`` skips the head with a warning.

Precision
    The SVD is taken in fp32; ``U``, ``Vh`` (and the rank-k ``residual``) are stored in the parameter dtype
    (bf16 for a bf16 model), ``S`` and δ in fp32, and W(δ) is formed with fp32 math and cast once to the
    parameter dtype (:func:`fip_fast.reference.spectral_weight`).  In bf16 the factors carry bf16 rounding, so
    W(0) reproduces the original weight to ≈ bf16 resolution, not bit-exactly.

Example::

    from transformers import GPT2LMHeadModel
    from fip_fast.integrations import hf
    deltas = hf.reparameterize_transformer(model, rank=64, svd="lowrank", relative=True)
    ...                                      # purify with fip_fast.FIP over `deltas`
    hf.merge_transformer(model)              # a plain GPT2LMHeadModel again
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast import spectral
from fip_fast.spectral import Adapter, SpectralLayer, register_adapter

logger = logging.getLogger("fip_fast")

__all__ = ["HAS_TRANSFORMERS", "Conv1D", "CONV1D_ADAPTER", "TiedLMHead", "linear_layer_types",
           "reparameterize_transformer", "merge_transformer", "output_embedding_is_tied"]

try:  # optional dependency
    from transformers.pytorch_utils import Conv1D  # type: ignore
    HAS_TRANSFORMERS = True
except Exception:  # pragma: no cover - exercised only without transformers
    Conv1D = None
    HAS_TRANSFORMERS = False


# ------------------------------------------------------------------------------------------- Conv1D adapter
def _conv1d_to_matrix(w: Tensor) -> Tensor:
    return w.t()                     # (in, out) -> (out, in): an nn.Linear-shaped matrix


def _conv1d_from_matrix(W: Tensor, shape: torch.Size) -> Tensor:
    return W.t()                     # a view; the forward transposes it back without a copy


def _conv1d_forward(m: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    # y = x·w + b with w (in, out), i.e. F.linear with the (out, in) matrix wᵀ.
    return F.linear(x, w.t(), m.bias)


#: The adapter registered for ``transformers.pytorch_utils.Conv1D`` (linear-like: see the module docstring).
CONV1D_ADAPTER = Adapter(_conv1d_to_matrix, _conv1d_from_matrix, _conv1d_forward, linear_like=True)

if HAS_TRANSFORMERS:
    register_adapter(Conv1D, CONV1D_ADAPTER)


def linear_layer_types() -> tuple[type, ...]:
    """``(nn.Linear,)`` plus GPT-2 ``Conv1D`` when ``transformers`` is installed."""
    return (nn.Linear,) + ((Conv1D,) if HAS_TRANSFORMERS else ())


# ------------------------------------------------------------------------------------------- tied LM heads
class TiedLMHead(nn.Module):
    """An LM head tied to a spectral input embedding: logits = x·W_emb(δ)ᵀ (+ bias), same δ as the embedding."""

    def __init__(self, head: nn.Module, embedding: SpectralLayer):
        super().__init__()
        self.head = head                                   # the original head (weight attribute removed)
        self._embedding = weakref.ref(embedding)           # not a submodule: its δ is owned by the embedding

    @property
    def embedding(self) -> SpectralLayer:
        emb = self._embedding()
        if emb is None:
            raise RuntimeError("the tied embedding of this TiedLMHead no longer exists")
        return emb

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.embedding.matrix(), getattr(self.head, "bias", None))


def output_embedding_is_tied(model: nn.Module) -> bool:
    """Whether the model's output embedding (LM head) shares its weight with the input embedding."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    if emb is None or head is None:
        return False
    w_in, w_out = getattr(emb, "weight", None), getattr(head, "weight", None)
    return isinstance(w_in, Tensor) and w_in is w_out


def _qualname(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    if module is None:
        return None
    for n, m in model.named_modules():
        if m is module:
            return n
    return None


_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _mha_children(model: nn.Module) -> set[str]:
    """Names of the submodules of layers that read their children's ``weight``/``bias`` directly instead of
    calling them (``nn.MultiheadAttention``; ``nn.Transformer{Encoder,Decoder}Layer``'s fast-path checks)."""
    out = set()
    for n, m in model.named_modules():
        if isinstance(m, _READS_CHILD_WEIGHTS):
            for cn, _ in m.named_modules():
                if cn:
                    out.add(f"{n}.{cn}" if n else cn)
    return out


_TIED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, str]]]" = weakref.WeakKeyDictionary()


def reparameterize_transformer(model: nn.Module, embeddings: bool = False, lm_head: bool = False,
                               rank: Optional[int] = None, svd: str = "full", relative: bool = False, *,
                               freeze_others: bool = True, train_biases: bool = False,
                               include: Optional[Callable[[str, nn.Module], bool]] = None,
                               impl: str = "auto") -> list[nn.Parameter]:
    """Fast FIP for transformers: make the linear layers of a causal LM / ViT spectral (train only δ).

    Args:
        model: a ``transformers`` model (GPT-2, LLaMA-style, ViT …) or any module built from ``nn.Linear``.
        embeddings: also reparameterize the input token embedding (``get_input_embeddings()``); a tied LM head
            then follows it through :class:`TiedLMHead`.
        lm_head: also reparameterize an *untied* LM head (``get_output_embeddings()``, else a child named
            ``lm_head``).  A tied head is skipped (warning) unless ``embeddings=True``.
        rank: ``None`` full rank; ``k`` trains the top-k singular values of each layer (frozen residual).
        svd: ``"full"`` or ``"lowrank"`` (``torch.svd_lowrank``; only used when ``rank`` < the layer's rank).
        relative: s = S·(1 + δ) (recommended: one step size for every layer).
        freeze_others: freeze every other parameter (restored by :func:`merge_transformer`).
        train_biases: leave the biases of the selected layers and LayerNorm affine parameters trainable
            (METHOD.md: Fast FIP purifies better when these train beside δ).  Returned after the δs.
        include: extra predicate ``(qualified_name, layer) -> bool``.
        impl: kernel implementation of W(δ).
    Returns:
        The trainable parameters: the δs in module order (then biases / norms with ``train_biases``).
    """
    types = linear_layer_types()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and isinstance(getattr(model, "lm_head", None), nn.Module):
        head = model.lm_head
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_name, emb_name = _qualname(model, head), _qualname(model, emb)
    tied = output_embedding_is_tied(model)
    if lm_head and tied and not embeddings:
        logger.warning("fip_fast.integrations.hf: the LM head is tied to the input embedding; it is skipped "
                       "(reparameterizing it alone would untie it). Pass embeddings=True to purify the tied pair.")
    skip = _mha_children(model)
    if embeddings and emb is not None:
        types = types + (type(emb),)

    def select(name: str, layer: nn.Module) -> bool:
        if name in skip:
            return False
        if name == head_name and (not lm_head or tied):
            return False
        if layer is emb and not embeddings:
            return False
        if isinstance(layer, nn.Embedding) and layer is not emb:
            return False            # position embeddings etc.: not "linear layers"
        return include is None or include(name, layer)

    # Split tied weights before surgery: reparameterize() deletes the embedding's weight attribute.
    head_weight = None
    if tied and embeddings and head is not None:
        head_weight = head.weight
        del head.weight
    try:
        deltas = spectral.reparameterize(model, types, rank=rank, freeze_others=freeze_others, relative=relative,
                                         svd=svd, include=select, impl=impl)
    except Exception:
        if head_weight is not None:
            head.weight = head_weight
        raise
    if head_weight is not None:
        emb_sl = model.get_submodule(emb_name)
        assert isinstance(emb_sl, SpectralLayer)
        _set(model, head_name, TiedLMHead(head, emb_sl))
        _TIED.setdefault(model, []).append((head_name, emb_name))
    extra: list[nn.Parameter] = []
    if train_biases:
        for _, m in spectral.spectral_layers(model):
            b = getattr(m.base, "bias", None)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)
                extra.append(b)
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("RMSNorm"):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
                    extra.append(p)
    return list(deltas) + extra


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def merge_transformer(model: nn.Module) -> nn.Module:
    """:func:`fip_fast.spectral.merge` plus transformer fix-ups: re-tie a :class:`TiedLMHead` to the merged
    embedding and make merged GPT-2 ``Conv1D`` weights contiguous (they come back as transposed views).
    Returns ``model``: the original architecture, no SVD left."""
    conv_names = [n for n, m in spectral.spectral_layers(model)
                  if HAS_TRANSFORMERS and isinstance(m.base, Conv1D)]
    spectral.merge(model)
    for n in conv_names:
        layer = model.get_submodule(n)
        if not layer.weight.is_contiguous():
            layer.weight = nn.Parameter(layer.weight.detach().contiguous(),
                                        requires_grad=layer.weight.requires_grad)
    for head_name, emb_name in _TIED.pop(model, []):
        wrapper = model.get_submodule(head_name)
        head = wrapper.head if isinstance(wrapper, TiedLMHead) else wrapper
        head.weight = model.get_submodule(emb_name).weight       # the same Parameter: tied again
        _set(model, head_name, head)
    return model


# ------------------------------------------------------------------------------------------- losses
def logits_of(output) -> Tensor:
    """The logits tensor of a ``transformers`` ``ModelOutput`` (or the tensor itself)."""
    return output if isinstance(output, Tensor) else output.logits


def causal_lm_nll(output, labels: Tensor) -> Tensor:
    """Per-sequence −log p for a causal LM: logits at t predict ``labels[t+1]`` (the shift ``transformers``
    applies internally), token losses summed per sequence, −100 ignored.  Shape (N,).  A ``loss_fn`` for
    :func:`fip_fast.fisher.estimate_fisher` (the default :func:`~fip_fast.fisher.nll_per_sample` does not
    shift and does not read ``ModelOutput``)."""
    logits = logits_of(output)[:, :-1]
    tgt = labels[:, 1:]
    tok = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction="none", ignore_index=-100)
    return tok.view(tgt.shape).sum(1)


def causal_lm_loss(output, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over non-ignored tokens (the training / purification loss)."""
    logits = logits_of(output)[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


__all__ += ["logits_of", "causal_lm_nll", "causal_lm_loss"]
