"""Fast FIP in place (docs/method.md "Fast FIP", "In place"): train only a shift δ of each layer's singular values,
without swapping modules, without rebuilding W(δ) in the forward and without the dense weight gradient.

For a selected layer with weight matrix W0 (Linear: out×in; Conv: out×(in/groups·k…); Embedding: num×dim; other
types through :func:`register_adapter`), the (top-k or full) SVD W0 = U·diag(S)·Vh is taken once in fp32 and

    s(δ) = S + δ            (or S·(1 + δ) with ``relative=True``, or S·exp(δ) with ``relative="exp"``)
    W(δ) = W0 + U_k·diag(relu(s(δ)) − S_k)·Vh_k

which is docs/method.md's W − U_k·diag(S_k)·Vh_k + U_k·diag(relu(S_k + δ))·Vh_k written around W0 (S ≥ 0, so
relu(S) = S).  How it runs:

* **The layer keeps its ordinary weight.**  It is frozen (``requires_grad=False``: autograd never computes dW);
  ``U`` (m×k), ``S`` (k), ``Vh`` (k×n) are buffers of the layer (``spectral_U`` / ``spectral_S`` /
  ``spectral_Vh``, saved in the ``state_dict``, moved by ``.to()``), δ is its parameter ``spectral_delta`` (fp32,
  zeros), and W0 is the buffer ``spectral_W0`` in the weight dtype (saved too, so that a resume starts from the
  exact W0: the no-drift rule below holds across save/load, bf16 included).
* **The weight is updated in place, lazily.**  A forward pre-hook (and a ``state_dict`` pre-hook) re-derives
  W = W0 + U·diag(relu(s(δ)) − S)·Vh, once per change of δ, for every stale layer of the reparameterization in
  one call of :func:`fip_fast.ops.spectral_update_`.  A change is a change of *value*: the layer keeps a copy of
  the δ its weight was derived from and compares (``torch.equal``, k numbers per call) — version counters miss
  torch's fused optimizer kernels and writes through ``.data``.  Recomputing from W0 costs one copy of the
  weights and means no drift: after any number of steps W equals W0 + U·diag(relu(s(δ)) − S)·Vh up to one
  rounding of the weight dtype; at δ = 0 nothing is written at all, so the model is θ0 bit for bit.  The
  optimizer's perturbations of δ (FIP's fd / lagged suppressor) reach the weights the same way.  A weight whose
  matrix is not a view of its memory (a channels_last convolution) is computed aside and copied in.
* **The state lives on the layers.**  The hooks are plain functions that find their state on the module they are
  called with: a ``copy.deepcopy`` of the model (``torch.optim.swa_utils.AveragedModel`` too) trains, syncs and
  merges on its own, and :func:`merge` / :func:`sync` find the layers anywhere below the model given.
* **δ-gradient from activations.**  The layer's forward is untouched; a forward hook records the projected input
  ``a`` (Linear-like: x·Vhᵀ; Conv: the input convolved with the rows of Vh as k filters; Embedding: the rows
  U[idx]) and routes the output through an identity autograd function whose backward projects the output gradient
  (c = g_out·U, over channels for Conv, g_out·Vhᵀ for Embedding) and returns
  ∂ℓ/∂δ = Σ_positions (a ⊙ c) ⊙ ∂s/∂δ,  ∂s/∂δ = 1[s > 0] (× S when relative; = s for ``"exp"``).
  Per-sample values (sum over positions first) are what :func:`collect_per_sample` hands to the δ-Fisher.  A weight
  shared by several modules (a tied LM head) has one δ and a hook on every module using it.
* **Or from the weight gradient, where that is cheaper.**  Per call, :func:`._taps._weight_side` compares the
  multiply-adds of the projections (NP·k·(m + n)) with those of the dense weight gradient projected,
  ∂ℓ/∂δ = diag(Uᵀ·dW·Vhᵀ) ⊙ ∂s/∂δ (NP·m·n + m·n·k): at full rank a convolution's input projection costs a second
  forward, its dW less.  The tap then keeps the input (as autograd keeps it for a trainable weight; an in-place
  change of it before the backward raises) and computes dW in its backward; per-sample gradients always come from
  the projections.
* :func:`merge` drops hooks, buffers and δ: the weights already hold W(δ), so the model is its original self.
* **Supported and refused** (docs/fast-fip-in-place.md): unbatched convolution inputs and keyword calls
  (``fc(input=x)``) are tapped like positional batched ones; ``load_state_dict`` of δ alone (``strict=False``)
  keeps W0; ``nn.MultiheadAttention.out_proj`` is never selected (MHA reads its weight without calling it, so no
  hook would run); double backward through a tap (``create_graph=True``, FIP's ``trace_estimator="batch"``) raises
  — the taps compute ∂ℓ/∂δ outside autograd.

Reference: :mod:`fip_fast.spectral_reference` (module swap, W(δ) rebuilt by autograd) computes the same gradients; the
tests compare the two.

The package: :mod:`._adapters` (the layer adapters and their registry, shared with the reference),
:mod:`._reparam` (SVD, buffers and δ, :func:`add_mixing`'s O), :mod:`._state` (one weight's state, s(δ), the
value-based staleness test), :mod:`._sync` (the in-place update of a group's weights), :mod:`._taps` (the
δ-gradient taps and the per-sample collection), :mod:`._state_dict` (save and load), :mod:`._fsdp` (FSDP2) and
:mod:`._merge`.
"""
from __future__ import annotations

from fip_fast.spectral._adapters import DEFAULT_TYPES, Adapter, register_adapter
from fip_fast.spectral._fsdp import shard
from fip_fast.spectral._merge import merge
from fip_fast.spectral._reparam import add_mixing, deltas, reparameterize, spectral_layers, spectrum
from fip_fast.spectral._sync import sync
from fip_fast.spectral._taps import collect_per_sample

__all__ = ["Adapter", "register_adapter", "reparameterize", "merge", "spectral_layers", "spectrum", "deltas", "sync",
           "collect_per_sample", "add_mixing", "shard", "DEFAULT_TYPES"]

# Every other name of the single-module form, so that ``fip_fast.spectral.<name>`` keeps resolving — for callers
# and for pickles of reparameterized models made before the split (a pickle names the hooks, the state classes and
# the adapter functions by module).  A monkeypatch must target the module that looks the name up
# (``fip_fast.spectral._taps._weight_side``, ``fip_fast.spectral._taps._Call``): rebinding it here changes nothing.
from fip_fast.spectral._adapters import (  # noqa: E402, F401, I001
    _ADAPTERS, CONV_ADAPTER, EMBEDDING_ADAPTER, LINEAR_ADAPTER, _adapter_for, _conv_forward, _conv_project,
    _conv_project_grad, _conv_weight_grad, _embedding_forward, _embedding_project, _embedding_project_grad, _flat,
    _linear_forward, _linear_project, _linear_project_grad, _linear_weight_grad, _tokens, _unflat,
    _weights_read_directly)
from fip_fast.spectral._fsdp import _chunk_rows, _gather_many, _matrix_axis_of_dim0, _shard_rows  # noqa: E402, F401
from fip_fast.spectral._merge import _HOOKS, _remove_hooks  # noqa: E402, F401
from fip_fast.spectral._reparam import _attach, _svd, _targets  # noqa: E402, F401
from fip_fast.spectral._state import (  # noqa: E402, F401
    _STATE, _aliases, _changed, _core, _gathered, _groups, _has_mix, _is_exp, _local, _relu_spectra, _same_layout,
    _snapshot, _Spectral, _spectrum, _write_matrix)
from fip_fast.spectral._state_dict import (  # noqa: E402, F401
    _ENTRIES, _load_hook, _load_pre_hook, _rederive_w0_shard, _state_dict_hook)
from fip_fast.spectral._sync import _Group, _sync_mixed  # noqa: E402, F401
from fip_fast.spectral._taps import (  # noqa: E402, F401
    _NO_DOUBLE_BACKWARD, _Call, _cross, _input_name, _pre_hook, _Tap, _tap_hook, _TapMix, _unbatched, _weight_side)
