"""GPT-2 Conv1D / transformer helpers of fip_fast.integrations.hf (skipped without transformers)."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fip_fast import spectral  # noqa: E402
from fip_fast.fisher import estimate_fisher  # noqa: E402
from fip_fast.integrations import hf  # noqa: E402
from fip_fast.spectral import Adapter  # noqa: E402


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


def test_conv1d_adapter_registered_and_W0_equals_original():
    model = tiny_gpt2()
    originals = {n: m.weight.detach().clone() for n, m in conv1d_layers(model)}
    hf.reparameterize_transformer(model)
    layers = dict(spectral.spectral_layers(model))
    assert set(originals) <= set(layers)
    for n, w in originals.items():
        w0 = layers[n].weight()
        assert w0.shape == w.shape                       # (in, out), GPT-2's layout
        torch.testing.assert_close(w0, w, atol=1e-5, rtol=0)
        assert layers[n].U.shape[0] == w.shape[1] and layers[n].Vh.shape[1] == w.shape[0]   # matrix is (out, in)


@pytest.mark.parametrize("rank,svd", [(None, "full"), (4, "full"), (4, "lowrank")])
def test_reparameterized_and_merged_model_match_original(rank, svd):
    model = tiny_gpt2()
    x = ids()
    ref = model(x).logits
    m = copy.deepcopy(model)
    deltas = hf.reparameterize_transformer(m, rank=rank, svd=svd, relative=True)
    assert all(p.requires_grad for p in deltas)
    assert [p for p in m.parameters() if p.requires_grad] == deltas     # everything else frozen
    if rank is not None:
        assert all(d.numel() == rank for d in deltas)
    torch.testing.assert_close(m(x).logits, ref, atol=1e-4, rtol=0)
    # move δ, merge, and compare with the spectral model's output
    with torch.no_grad():
        for d in deltas:
            d.uniform_(-0.2, 0.2)
    spec_out = m(x).logits.detach()
    hf.merge_transformer(m)
    assert not spectral.spectral_layers(m)
    assert all(isinstance(mod, hf.Conv1D) for _, mod in conv1d_layers(m))
    assert all(mod.weight.is_contiguous() for _, mod in conv1d_layers(m))
    torch.testing.assert_close(m(x).logits, spec_out, atol=1e-5, rtol=1e-5)
    # loads into the original architecture
    fresh = tiny_gpt2(seed=3)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x).logits, spec_out, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in m.parameters())                 # flags restored


def test_delta_moves_output_and_gets_gradients():
    m = tiny_gpt2()
    deltas = hf.reparameterize_transformer(m, relative=True)
    x = ids()
    loss = hf.causal_lm_loss(m(x), x)
    loss.backward()
    assert all(d.grad is not None and torch.isfinite(d.grad).all() for d in deltas)
    assert sum(d.grad.abs().sum() for d in deltas) > 0


def test_lm_head_and_tied_embeddings():
    # tied head: skipped unless embeddings=True; then it follows the spectral embedding
    m = tiny_gpt2(tie=True)
    assert hf.output_embedding_is_tied(m)
    hf.reparameterize_transformer(copy.deepcopy(m), lm_head=True)      # warns, does not untie
    m2 = copy.deepcopy(m)
    x = ids()
    ref = m(x).logits
    hf.reparameterize_transformer(m2, embeddings=True)
    assert isinstance(m2.lm_head, hf.TiedLMHead)
    torch.testing.assert_close(m2(x).logits, ref, atol=1e-4, rtol=0)
    emb = m2.transformer.wte
    with torch.no_grad():
        emb.delta.uniform_(-0.3, 0.3)
    out = m2(x).logits.detach()
    hf.merge_transformer(m2)
    assert m2.lm_head.weight is m2.transformer.wte.weight                # tied again
    torch.testing.assert_close(m2(x).logits, out, atol=1e-5, rtol=1e-5)
    # untied head: reparameterized with lm_head=True only
    u = tiny_gpt2(tie=False)
    assert not hf.output_embedding_is_tied(u)
    hf.reparameterize_transformer(u)
    assert isinstance(u.lm_head, nn.Linear)
    u = tiny_gpt2(tie=False)
    hf.reparameterize_transformer(u, lm_head=True)
    assert isinstance(u.lm_head, spectral.SpectralLayer)


def test_conv1d_fast_fisher_matches_generic_path():
    """linear_like=True: fisher.py's hook path for Conv1D δ equals the torch.func per-sample path."""
    m = tiny_gpt2()
    deltas = hf.reparameterize_transformer(m, relative=True)
    with torch.no_grad():
        for d in deltas:
            d.normal_(0, 0.1)
    x = ids(n=4)
    fast = estimate_fisher(m, [(x, x)], loss_fn=hf.causal_lm_nll)
    for _, sl in spectral.spectral_layers(m):
        a = sl.adapter
        sl.adapter = Adapter(a.to_matrix, a.from_matrix, a.forward, linear_like=False)
    slow = estimate_fisher(m, [(x, x)], loss_fn=hf.causal_lm_nll, params=deltas)
    for d in deltas:
        torch.testing.assert_close(fast[d], slow[d], rtol=1e-4, atol=1e-6 * float(slow[d].abs().max()))


def test_bf16_factors_stored_in_param_dtype():
    m = tiny_gpt2().to(torch.bfloat16)
    orig = {n: mod.weight.detach().clone() for n, mod in conv1d_layers(m)}
    hf.reparameterize_transformer(m, rank=8)
    for n, sl in spectral.spectral_layers(m):
        assert sl.U.dtype == sl.Vh.dtype == sl.residual.dtype == torch.bfloat16
        assert sl.S.dtype == sl.delta.dtype == torch.float32
        w0 = sl.weight()
        assert w0.dtype == torch.bfloat16
        # bf16 factors: W(0) reproduces W to bf16 resolution
        err = (w0.float() - orig[n].float()).abs().max() / orig[n].float().abs().max()
        assert err < 2e-2, err


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
    assert len(deltas) == 14 and isinstance(m.lm_head, nn.Linear) and isinstance(m.embed_tokens, nn.Embedding)


def test_vit_linear_layers():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    m = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 1, 8, 8)
    ref = m(x).logits
    deltas = hf.reparameterize_transformer(m, relative=True)
    assert len(deltas) == 7                                              # q, k, v, o, up, down, classifier
    torch.testing.assert_close(m(x).logits, ref, atol=1e-4, rtol=0)
    hf.merge_transformer(m)
    torch.testing.assert_close(m(x).logits, ref, atol=1e-4, rtol=0)


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
    assert len(deltas) == 2 and isinstance(blk.attn.out_proj, nn.Linear)
    torch.testing.assert_close(blk(x), ref, atol=1e-4, rtol=0)
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
