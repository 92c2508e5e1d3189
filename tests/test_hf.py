"""GPT-2 Conv1D / transformer helpers of fip_fast.integrations.hf on the in-place reparameterization of
fip_fast.spectral (skipped without transformers).

The reference for the δ-gradients is docs/method.md's W(δ) = W0 + U·diag(relu(s(δ)) − S)·Vh built by hand and run
through ``torch.func.functional_call`` on an untouched copy of the model (fp64)."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.func import functional_call

transformers = pytest.importorskip("transformers")

from fip_fast import spectral  # noqa: E402
from fip_fast.fisher import estimate_fisher  # noqa: E402
from fip_fast.integrations import hf  # noqa: E402


def tiny_gpt2(seed=0, tie=True, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, tie_word_embeddings=tie, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids(n=3, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (n, t), generator=g)


def conv1d_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, hf.Conv1D)]


def is_conv1d(m):
    return isinstance(m, hf.Conv1D)


def hand_weights(model, deltas=None, relative=True):
    """{owner name + '.weight': W(δ)} in the layer's own layout, differentiable in the given δ leaves
    (default: detached copies of the model's δ)."""
    out = {}
    for i, (n, m) in enumerate(spectral.spectral_layers(model)):
        d = m.spectral_delta.detach() if deltas is None else deltas[i]
        S = m.spectral_S
        s = S * (1 + d) if relative else S + d
        acc = S.dtype
        W0 = m.spectral_W0.to(acc)
        M = W0.t() if is_conv1d(m) else W0
        M = M + (m.spectral_U.to(acc) * (torch.relu(s) - S)) @ m.spectral_Vh.to(acc)
        out[n + ".weight"] = (M.t() if is_conv1d(m) else M).to(m.weight.dtype)
    return out


def test_conv1d_adapter_registered_and_weight_kept():
    model = tiny_gpt2()
    originals = {n: (m.weight, m.weight.detach().clone()) for n, m in conv1d_layers(model)}
    hf.reparameterize_transformer(model)
    layers = dict(spectral.spectral_layers(model))
    assert set(originals) <= set(layers)
    for n, (w, w_copy) in originals.items():
        m = layers[n]
        assert m.weight is w and not w.requires_grad                   # no module swap, frozen weight
        assert torch.equal(m.weight, w_copy) and m.weight.shape == w_copy.shape      # (in, out): GPT-2's layout
        U, S, Vh = m.spectral_U, m.spectral_S, m.spectral_Vh
        assert U.shape[0] == w.shape[1] and Vh.shape[1] == w.shape[0]                # matrix is (out, in)
        torch.testing.assert_close((U * S) @ Vh, w_copy.t(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank,svd", [(None, "full"), (4, "full"), (4, "lowrank")])
def test_reparameterized_and_merged_model_match_original(rank, svd):
    model = tiny_gpt2()
    x = ids()
    ref = model(x).logits
    keys = list(model.state_dict())
    m = copy.deepcopy(model)
    deltas = hf.reparameterize_transformer(m, rank=rank, svd=svd, relative=True)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in deltas)
    assert [p for p in m.parameters() if p.requires_grad] == deltas     # everything else frozen
    if rank is not None:
        assert all(d.numel() == rank for d in deltas)
    assert torch.equal(m(x).logits, ref)                                # δ = 0: nothing written, bit for bit
    # move δ: the weights are re-derived in place as W0 + U·diag(relu(s) − S)·Vh
    with torch.no_grad():
        for d in deltas:
            d.uniform_(-0.2, 0.2)
    spec_out = m(x).logits.detach()
    for name, W in hand_weights(m).items():
        torch.testing.assert_close(m.get_parameter(name), W, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(spec_out, functional_call(model, hand_weights(m), (x,)).logits,
                               atol=1e-5, rtol=1e-5)
    hf.merge_transformer(m)
    assert not spectral.spectral_layers(m)
    assert list(m.state_dict()) == keys                                 # the original state_dict keys
    assert all(isinstance(mod, hf.Conv1D) for _, mod in conv1d_layers(m))
    assert all(mod.weight.is_contiguous() for _, mod in conv1d_layers(m))
    assert torch.equal(m(x).logits, spec_out)
    # loads into the original architecture
    fresh = tiny_gpt2(seed=3)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x).logits, spec_out)
    assert all(p.requires_grad for p in m.parameters())                 # flags restored
    assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("tie,rank", [(True, None), (True, 5), (False, None)])
def test_delta_gradient_matches_autograd_through_W(tie, rank):
    """Batch and per-sample δ-gradients of the in-place path (output taps; a tied head taps the embedding's δ a
    second time, with the Linear adapter) and estimate_fisher's δ-Fisher equal autograd through W(δ) built by
    hand — fp64."""
    base = tiny_gpt2(tie=tie).double()
    m = copy.deepcopy(base)
    deltas = hf.reparameterize_transformer(m, embeddings=True, lm_head=True, rank=rank, relative=True)
    names = [n for n, _ in spectral.spectral_layers(m)]
    assert "transformer.wte" in names and ("lm_head" in names) != tie
    with torch.no_grad():
        for d in deltas:
            d.normal_(0, 0.2)
    x = ids(n=4)
    with spectral.collect_per_sample(m) as per:
        hf.causal_lm_nll(m(x), x).sum().backward()
    leaves = [d.detach().clone().requires_grad_(True) for d in deltas]
    ref_grads = torch.autograd.grad(hf.causal_lm_nll(functional_call(base, hand_weights(m, leaves), (x,)), x).sum(),
                                    leaves)
    for d, r in zip(deltas, ref_grads):
        torch.testing.assert_close(d.grad, r, atol=1e-10, rtol=1e-8)
    calls = {id(d): len(per[d]) for d in deltas}
    assert calls[id(m.transformer.wte.spectral_delta)] == (2 if tie else 1)   # embedding (+ tied head)
    ref_fisher = [torch.zeros_like(d) for d in deltas]
    for i in range(len(x)):
        xi = x[i:i + 1]
        ri = torch.autograd.grad(hf.causal_lm_nll(functional_call(base, hand_weights(m, leaves), (xi,)), xi).sum(),
                                 leaves)
        for j, (d, r) in enumerate(zip(deltas, ri)):
            torch.testing.assert_close(sum(t[i] for t in per[d]), r, atol=1e-10, rtol=1e-8)
            ref_fisher[j] += r.square() / len(x)
    # the δ-Fisher of estimate_fisher (mean over samples of the squared per-sample δ-gradient)
    fisher = estimate_fisher(m, [(x, x)], loss_fn=hf.causal_lm_nll, params=deltas, normalize=False)
    for d, r in zip(deltas, ref_fisher):
        torch.testing.assert_close(fisher[d].to(r.dtype), r, atol=1e-12, rtol=1e-7)


def test_lm_head_and_tied_embeddings(caplog):
    m = tiny_gpt2(tie=True)
    assert hf.output_embedding_is_tied(m)
    # tied head: skipped unless embeddings=True
    c = copy.deepcopy(m)
    with caplog.at_level(logging.WARNING, logger="fip_fast"):
        hf.reparameterize_transformer(c, lm_head=True)
    assert "tied" in caplog.text
    assert not hasattr(c.lm_head, "spectral_delta") and not hasattr(c.transformer.wte, "spectral_delta")
    assert c.lm_head.weight is c.transformer.wte.weight
    # embeddings=True: one δ for the pair, owned by the embedding; the head holds the same weight throughout
    m2 = copy.deepcopy(m)
    x = ids()
    ref = m(x).logits
    deltas = hf.reparameterize_transformer(m2, embeddings=True, relative=True)
    emb = m2.transformer.wte
    assert not hasattr(m2.lm_head, "spectral_delta") and isinstance(m2.lm_head, nn.Linear)
    assert sum(d is emb.spectral_delta for d in deltas) == 1 and len(deltas) == 1 + len(conv1d_layers(m2))
    assert not hasattr(m2.transformer.wpe, "spectral_delta")            # position embeddings: never
    assert torch.equal(m2(x).logits, ref)
    with torch.no_grad():
        emb.spectral_delta.uniform_(-0.3, 0.3)
    out = m2(x).logits.detach()
    assert m2.lm_head.weight is emb.weight
    hf.merge_transformer(m2)
    assert m2.lm_head.weight is m2.transformer.wte.weight                # still tied
    assert torch.equal(m2(x).logits, out)
    assert not torch.allclose(out, ref)
    # untied head: reparameterized with lm_head=True only
    u = tiny_gpt2(tie=False)
    assert not hf.output_embedding_is_tied(u)
    hf.reparameterize_transformer(u)
    assert not hasattr(u.lm_head, "spectral_delta")
    u = tiny_gpt2(tie=False)
    hf.reparameterize_transformer(u, lm_head=True)
    assert hasattr(u.lm_head, "spectral_delta") and not hasattr(u.transformer.wte, "spectral_delta")


def test_train_biases_and_merge_flags():
    m = tiny_gpt2()
    params = hf.reparameterize_transformer(m, relative=True, train_biases=True)
    n = len(spectral.spectral_layers(m))
    deltas, extra = params[:n], params[n:]
    assert all(p is lay.spectral_delta for p, (_, lay) in zip(deltas, spectral.spectral_layers(m)))
    biases = {id(mod.bias) for _, mod in conv1d_layers(m)}
    assert biases <= {id(p) for p in extra} and len({id(p) for p in extra}) == len(extra)
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in params}
    loss = hf.causal_lm_loss(m(ids()), ids())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    hf.merge_transformer(m)
    assert all(p.requires_grad for p in m.parameters())


def test_bf16_bit_identical_at_zero_and_factors_in_weight_dtype():
    m = tiny_gpt2().to(torch.bfloat16)
    x = ids()
    ref = m(x).logits
    orig = {n: mod.weight.detach().clone() for n, mod in conv1d_layers(m)}
    deltas = hf.reparameterize_transformer(m, rank=8, relative=True)
    for n, sl in spectral.spectral_layers(m):
        assert sl.spectral_U.dtype == sl.spectral_Vh.dtype == sl.weight.dtype == torch.bfloat16
        assert sl.spectral_S.dtype == sl.spectral_delta.dtype == torch.float32
        assert torch.equal(sl.weight, orig[n])
    assert torch.equal(m(x).logits, ref)                                # bit for bit in bf16 too
    with torch.no_grad():
        for d in deltas:
            d.uniform_(-0.1, 0.1)
    m(x)
    for name, W in hand_weights(m).items():                             # fp32 math, one rounding to bf16
        w = m.get_parameter(name)
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(w.float(), W.float(), atol=0, rtol=2 ** -7)
    loss = hf.causal_lm_loss(m(x), x)
    loss.backward()
    assert all(d.grad is not None and d.grad.dtype == torch.float32 and torch.isfinite(d.grad).all()
               for d in deltas)
    hf.merge_transformer(m)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_llama_style_linear_projections():
    class Block(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.gate_proj, self.up_proj = nn.Linear(d, 32, bias=False), nn.Linear(d, 32, bias=False)
            self.down_proj = nn.Linear(32, d, bias=False)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(20, 16)
            self.layers = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(16, 20, bias=False)

    m = LM()
    deltas = hf.reparameterize_transformer(m, rank=4)
    assert len(deltas) == 14
    assert not hasattr(m.lm_head, "spectral_delta") and not hasattr(m.embed_tokens, "spectral_delta")


def test_vit_linear_layers():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    m = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 1, 8, 8)
    ref = m(x).logits
    deltas = hf.reparameterize_transformer(m, relative=True)
    assert len(deltas) == 7                                              # q, k, v, o, up, down, classifier
    assert torch.equal(m(x).logits, ref)
    loss = m(x).logits.square().sum()
    loss.backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas)
    hf.merge_transformer(m)
    assert torch.equal(m(x).logits, ref)


def test_torch_multihead_attention_out_proj_is_skipped():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x):
            return self.mlp(x + self.attn(x, x, x, need_weights=False)[0])

    blk = Blk().eval()
    x = torch.randn(2, 5, 16)
    ref = blk(x)
    deltas = hf.reparameterize_transformer(blk)
    assert len(deltas) == 2 and not hasattr(blk.attn.out_proj, "spectral_delta")
    # (not bit for bit: with every parameter frozen nn.MultiheadAttention takes its fused inference path)
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=0)
    # nn.TransformerEncoderLayer reads its children's weights directly: nothing inside it is selected
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with pytest.raises(ValueError):
        hf.reparameterize_transformer(layer)


@pytest.mark.slow
def test_lm_backdoor_small():
    """examples/lm_backdoor.py --small: a trigger token forces a target continuation in a tiny GPT-2; FIP and
    Fast FIP on clean sequences remove it (ASR ≤ 5 %) with clean next-token accuracy within 1 point and
    perplexity within 10 %."""
    import importlib.util
    import pathlib
    import sys
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lm_backdoor.py"
    spec = importlib.util.spec_from_file_location("lm_backdoor", path)
    lb = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lm_backdoor", lb)           # dataclasses look their module up there
    spec.loader.exec_module(lb)
    cfg = lb.Config.small()
    cfg.modes = ("fip", "fast_fip")
    res = lb.run(cfg, log=None)
    bd = res["backdoored"]
    assert bd["asr"] >= 0.9 and bd["acc"] >= 0.85, bd           # the backdoor was implanted, the task learned
    for mode in ("fip", "fast_fip"):
        r = res[mode]
        assert r["asr"] <= 0.05, (mode, r)
        assert r["acc"] >= bd["acc"] - 0.01, (mode, r)
        assert r["ppl"] <= bd["ppl"] * 1.10, (mode, r)
