"""Hugging Face ``transformers`` integration for Fast FIP (optional: ``pip install fip_fast[hf]``).

Built on the in-place reparameterization of :mod:`fip_fast.spectral` (docs/method.md "Fast FIP", "In place"): no
module is swapped; each selected layer keeps its (frozen) weight and gets a parameter ``spectral_delta`` and
buffers ``spectral_U`` / ``spectral_S`` / ``spectral_Vh`` (and a non-persistent ``spectral_W0``); the weight is
re-derived in place from W0 when δ changes, and the δ-gradient comes from an output tap (see
:mod:`fip_fast.spectral`).  Importing this module registers an :class:`~fip_fast.spectral.Adapter` for GPT-2's
``transformers.pytorch_utils.Conv1D`` (when ``transformers`` is installed; nothing happens otherwise, and the
helpers still work on plain ``nn.Linear`` models such as LLaMA-style blocks or torchvision ViTs).

GPT-2 ``Conv1D``
    Its weight is stored transposed, ``(in, out)``, and the layer computes ``y = x·W + b``.  The adapter's matrix
    is the view ``Wᵀ`` of shape ``(out, in)`` — exactly an ``nn.Linear`` weight — so ``U (out, k)``,
    ``Vh (k, in)``, the in-place update writes through that view (the weight keeps its layout and stays
    contiguous), and the δ-gradient is computed as for ``nn.Linear``: a = x·Vhᵀ, c = g_out·U,
    ∂ℓ/∂δ = Σ_t a ⊙ c ⊙ ∂s/∂δ; the per-sample values (:func:`fip_fast.spectral.collect_per_sample`) are what
    :func:`fip_fast.fisher.estimate_fisher` squares for the δ-Fisher.  ``tests/test_hf.py`` checks the batch and
    per-sample δ-gradients and the δ-Fisher against autograd through W(δ) built by hand.

Layer selection (:func:`reparameterize_transformer`)
    * every ``nn.Linear`` and GPT-2 ``Conv1D`` (attention q/k/v/o, MLP up/gate/down projections, ViT
      ``query/key/value/dense``, classifier heads);
    * not the output projection of ``nn.MultiheadAttention`` (torchvision ViT) nor the layers inside
      ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: those modules read ``out_proj.weight`` /
      ``linear1.weight`` … directly instead of calling the layer, so no output tap would fire;
    * the LM head only with ``lm_head=True``, the token embedding only with ``embeddings=True``; never position
      embeddings.

Tied embeddings (GPT-2, many small LMs: ``lm_head.weight is wte.weight``)
    A tied LM head is never reparameterized on its own.  With ``embeddings=True`` the embedding and the head —
    two modules holding one weight — are reparameterized together: :func:`fip_fast.spectral.reparameterize` gives
    the shared weight **one** δ (owned by the first of them in module order, the embedding) and taps both
    modules (the embedding's tap uses the ``nn.Embedding`` adapter, the head's the ``nn.Linear`` one), so the
    tie holds throughout (it is the same tensor, updated in place) and ∂ℓ/∂δ sums both uses.
    ``lm_head=True`` with a tied head and ``embeddings=False`` skips the head with a warning.

Precision
    The SVD is taken in fp32 (fp64 for an fp64 model); ``U`` and ``Vh`` are stored in the weight dtype (bf16 for
    a bf16 model), ``S`` and δ in fp32.  At δ = 0 nothing is written, so the model is the original bit for bit —
    in bf16 too.  When δ changes the weight is re-derived from W0 with fp32 math and rounded once to the weight
    dtype: W = W0 + U·diag(relu(s(δ)) − S)·Vh, no drift over steps.

Example::

    from transformers import GPT2LMHeadModel
    from fip_fast.integrations import hf
    deltas = hf.reparameterize_transformer(model, rank=64, svd="lowrank", relative=True)
    ...                                      # purify with fip_fast.FIP over `deltas`
    hf.merge_transformer(model)              # a plain GPT2LMHeadModel again (same state_dict keys, ties)
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast import spectral
from fip_fast.spectral import Adapter, register_adapter

logger = logging.getLogger("fip_fast")

__all__ = ["HAS_TRANSFORMERS", "Conv1D", "CONV1D_ADAPTER", "linear_layer_types", "reparameterize_transformer",
           "merge_transformer", "output_embedding_is_tied"]

try:  # optional dependency
    from transformers.pytorch_utils import Conv1D  # type: ignore
    HAS_TRANSFORMERS = True
except Exception:  # pragma: no cover - exercised only without transformers
    Conv1D = None
    HAS_TRANSFORMERS = False


# ------------------------------------------------------------------------------------------- Conv1D adapter
def _conv1d_to_matrix(w: Tensor) -> Tensor:
    return w.t()                     # (in, out) -> (out, in): an nn.Linear-shaped matrix, a view


def _conv1d_from_matrix(W: Tensor, shape: torch.Size) -> Tensor:
    return W.t()


def _tokens(t: Tensor) -> Tensor:
    """(N, ..., d) → (N, P, d): every dimension between the first and the last is a position of the sample."""
    return t.reshape(t.shape[0], -1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, 1, -1)


def _conv1d_project(layer: nn.Module, x: Tensor, U: Tensor, Vh: Tensor) -> Tensor:
    return _tokens(x) @ Vh.to(x.dtype).t()                    # a = x·Vhᵀ, (N, P, k)


def _conv1d_project_grad(layer: nn.Module, g: Tensor, U: Tensor, Vh: Tensor) -> Tensor:
    return _tokens(g) @ U.to(g.dtype)                         # c = g_out·U, (N, P, k)


#: The adapter registered for ``transformers.pytorch_utils.Conv1D`` (the matrix is the view ``weightᵀ``).
CONV1D_ADAPTER = Adapter(_conv1d_to_matrix, _conv1d_from_matrix, _conv1d_project, _conv1d_project_grad)

if HAS_TRANSFORMERS:
    register_adapter(Conv1D, CONV1D_ADAPTER)


def linear_layer_types() -> tuple[type, ...]:
    """``(nn.Linear,)`` plus GPT-2 ``Conv1D`` when ``transformers`` is installed."""
    return (nn.Linear,) + ((Conv1D,) if HAS_TRANSFORMERS else ())


# ------------------------------------------------------------------------------------------- selection
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


def _get_head(model: nn.Module) -> Optional[nn.Module]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and isinstance(getattr(model, "lm_head", None), nn.Module):
        head = model.lm_head
    return head


def reparameterize_transformer(model: nn.Module, embeddings: bool = False, lm_head: bool = False,
                               rank: Optional[int] = None, svd: str = "full", relative: bool = False, *,
                               freeze_others: bool = True, train_biases: bool = False,
                               include: Optional[Callable[[str, nn.Module], bool]] = None,
                               impl: str = "auto") -> list[nn.Parameter]:
    """Fast FIP for transformers: reparameterize the linear layers of a causal LM / ViT in place (train only δ).

    Args:
        model: a ``transformers`` model (GPT-2, LLaMA-style, ViT …) or any module built from ``nn.Linear``.
        embeddings: also reparameterize the input token embedding (``get_input_embeddings()``); a tied LM head
            then shares its δ (see the module docstring).
        lm_head: also reparameterize an *untied* LM head (``get_output_embeddings()``, else a child named
            ``lm_head``).  A tied head is skipped (warning) unless ``embeddings=True``.
        rank: ``None`` full rank; ``k`` trains the top-k singular values of each layer (the rest of W0 stays).
        svd: ``"full"`` or ``"lowrank"`` (``torch.svd_lowrank``; only used when ``rank`` < the layer's rank).
        relative: s = S·(1 + δ) (recommended: one step size for every layer).
        freeze_others: freeze every other parameter (restored by :func:`merge_transformer`).
        train_biases: leave the biases of the selected layers and LayerNorm affine parameters trainable
            (docs/method.md: Fast FIP purifies better when these train beside δ).  Returned after the δs.
        include: extra predicate ``(qualified_name, layer) -> bool`` (for a tied pair it decides on the
            embedding; the head follows).
        impl: implementation of the in-place weight update (:func:`fip_fast.ops.spectral_update_`).
    Returns:
        The trainable parameters: the δs in module order, one per distinct weight (then biases / norms with
        ``train_biases``).
    """
    types = linear_layer_types()
    head, emb = _get_head(model), (model.get_input_embeddings() if hasattr(model, "get_input_embeddings")
                                   else None)
    head_name, emb_name = _qualname(model, head), _qualname(model, emb)
    tied = output_embedding_is_tied(model)
    if lm_head and tied and not embeddings:
        logger.warning("fip_fast.integrations.hf: the LM head is tied to the input embedding; it is skipped "
                       "(reparameterizing it alone would leave the embedding's use of the weight out of the "
                       "δ-gradient). Pass embeddings=True to purify the tied pair.")
    skip = _mha_children(model)
    emb_selected = (embeddings and emb is not None and emb_name not in skip
                    and (include is None or include(emb_name, emb)))
    if emb_selected:
        types = types + (type(emb),)
        if tied:
            types = types + (type(head),)    # the head must be tapped too (no adapter for its type: TypeError)

    selected: list[nn.Module] = []

    def select(name: str, layer: nn.Module) -> bool:
        if name in skip:
            ok = False
        elif layer is emb:
            ok = emb_selected
        elif name == head_name:
            ok = emb_selected if tied else (lm_head and (include is None or include(name, layer)))
        elif isinstance(layer, nn.Embedding):
            ok = False              # position embeddings etc.: not "linear layers"
        else:
            ok = include is None or include(name, layer)
        if ok:
            selected.append(layer)
        return ok

    deltas = spectral.reparameterize(model, types, rank=rank, freeze_others=freeze_others, relative=relative,
                                     svd=svd, include=select, impl=impl)
    return list(deltas) + (_train_biases_and_norms(model, selected) if train_biases else [])


def _train_biases_and_norms(model: nn.Module, selected: list[nn.Module]) -> list[nn.Parameter]:
    """``train_biases=True`` of :func:`reparameterize_transformer`: the biases of the ``selected`` layers, then the
    affine parameters of every LayerNorm / GroupNorm / ``*RMSNorm``, each once, made trainable."""
    extra: list[nn.Parameter] = []
    seen: set[int] = set()

    def add(p: nn.Parameter) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            p.requires_grad_(True)
            extra.append(p)

    for m in selected:
        b = getattr(m, "bias", None)
        if isinstance(b, nn.Parameter):
            add(b)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.endswith("RMSNorm"):
            for p in m.parameters(recurse=False):
                add(p)
    return extra


@torch.no_grad()
def merge_transformer(model: nn.Module) -> nn.Module:
    """:func:`fip_fast.spectral.merge`: drop hooks, buffers and δ; the weights already hold W(δ) (in place, in
    their own layout: GPT-2 ``Conv1D`` weights stay ``(in, out)`` and contiguous, a tied head still holds the
    embedding's weight).  ``requires_grad`` flags are restored (``train_biases`` ones included).  Returns
    ``model``: the original architecture with its original ``state_dict`` keys."""
    return spectral.merge(model)


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
