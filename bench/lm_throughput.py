"""Does Fast FIP in place keep a large causal LM's training throughput?  (Issue "Fast FIP in place": a ≥ 1 B-parameter
HF causal LM, built from a config — no download —, in bf16, purified with Fast FIP at rank 64 at ≥ 70 % of plain
forward + backward tokens/s.)

::

    python -m bench lm_throughput --device cuda          # LLaMA-style 1.1 B (TinyLlama's shape), bf16
    python -m bench lm_throughput --quick                # CPU smoke test (a tiny config; numbers mean nothing)

Variants, each timed with :func:`bench.time_fn` (``--iters`` iterations after warm-up on the CPU; CUDA: its
``do_bench`` device timing), same batch (``--batch`` × ``--seq`` tokens):

* ``plain`` — forward + backward with every weight trainable (what fine-tuning pays per pass; no optimizer);
* ``frozen`` — forward + backward with every weight frozen and the embeddings' output requiring grad (the floor:
  no dW at all);
* ``fast_fip_lagged`` — Fast FIP in place (:func:`fip_fast.integrations.hf.reparameterize_transformer`, rank
  ``--rank``, randomized SVD, relative δ) with ``FIP(trace_estimator="lagged")``: one forward + backward, the fused
  δ step and the in-place weight re-derivation per iteration (the closure-free estimator: one pass per step);
* ``fast_fip_fd`` — the same with the default ``"fd"`` suppressor every step (two passes per step).

Reported: tokens/s, the ratio to ``plain`` (target ≥ 0.70 for the one-pass variant), and on CUDA the peak memory
(``torch.cuda.max_memory_allocated``) per variant.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import RESULTS_DIR, environment, time_fn, write_json

SCHEMA = "fip_fast.bench.lm_throughput/1"
#: TinyLlama-1.1B's shape (22 layers, d 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000): 1.10 B parameters
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64)


def build(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)             # built on the device in its dtype: no fp32 CPU copy of 1 B weights
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)


def _peak(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def variant(name: str, shape: dict, device, dtype, ids, rank: int, iters: int, warmup: int) -> dict[str, Any]:
    """One variant's record (tokens/s over the timed iterations, peak memory)."""
    from fip_fast import FIP
    from fip_fast.integrations import hf

    model = build(shape, device, dtype)
    model.train()
    t_setup = time.perf_counter()
    opt = None
    if name == "frozen":
        model.requires_grad_(False)
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    elif name.startswith("fast_fip"):
        deltas = hf.reparameterize_transformer(model, rank=rank, svd="lowrank", relative=True)
        est = "lagged" if name.endswith("lagged") else "fd"
        opt = FIP(deltas, lr=1e-3, momentum=0.9, eta_F=0.005, rho=0.5, trace_every=1, trace_estimator=est,
                  eta_r=0.0)
    setup_s = time.perf_counter() - t_setup

    def loss():
        return model(input_ids=ids, labels=ids).loss

    def closure():
        opt.zero_grad(set_to_none=True)
        out = loss()
        out.backward()
        return out

    if opt is None:
        def it():
            model.zero_grad(set_to_none=True)
            loss().backward()
    elif opt.param_groups[0]["trace_estimator"] == "lagged":
        def it():
            closure()
            opt.step()
    else:
        def it():
            opt.step(closure)
    _reset_peak(device)
    t = time_fn(it, device, warmup=warmup, min_reps=iters, max_reps=iters, budget_s=0.0)
    med = t["median_s"]
    rec = dict(variant=name, median_s=med, p20_s=t["p20_s"], tokens_per_s=ids.numel() / med, timer=t["timer"],
               setup_s=setup_s, peak_bytes=_peak(device),
               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return rec


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench lm_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a tiny config on any device (smoke test)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variants", default="plain,frozen,fast_fip_lagged,fast_fip_fd")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    from . import pick_device

    device = pick_device(a.device)
    shape = TINY if a.quick else LLAMA_1B
    batch, seq, rank, iters = (2, 16, 4, 2) if a.quick else (a.batch, a.seq, a.rank, a.iters)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)
    recs = []
    for name in a.variants.split(","):
        try:
            recs.append(variant(name, shape, device, dtype, ids, rank, iters, warmup=1 if a.quick else 2))
        except Exception as exc:                 # report it, keep the other variants
            recs.append(dict(variant=name, error=f"{type(exc).__name__}: {exc}"[:400]))
        print(recs[-1], flush=True)
    base = next((r for r in recs if r["variant"] == "plain" and "tokens_per_s" in r), None)
    for r in recs:
        if base is not None and "tokens_per_s" in r:
            r["vs_plain"] = r["tokens_per_s"] / base["tokens_per_s"]
    n_params = sum(p.numel() for p in build(shape, torch.device("meta"), dtype).parameters())
    d = dict(schema=SCHEMA, env=environment(device), quick=a.quick, shape=shape, n_params=n_params,
             dtype=str(dtype), batch=batch, seq=seq, rank=rank, target="fast_fip_lagged >= 0.70x plain",
             variants=recs)
    out = a.out or RESULTS_DIR / f"lm_throughput_{device.type}{'_quick' if a.quick else ''}.json"
    write_json(d, out)
    out.with_suffix(".md").write_text(markdown(d))
    print(markdown(d))
    return 0


def markdown(d: dict) -> str:
    md = [f"# Fast FIP in place on a causal LM — {d['n_params'] / 1e9:.2f} B parameters, {d['dtype']}", "",
          f"batch {d['batch']} × {d['seq']} tokens, rank {d['rank']}, device "
          f"{(d['env'].get('device') or {}).get('name', '?')}; "
          f"target: {d['target']}", "",
          "| variant | tokens/s | vs plain | median s / iter | peak memory | trainable | setup s |",
          "|---|---|---|---|---|---|---|"]
    for r in d["variants"]:
        if "error" in r:
            md.append(f"| {r['variant']} | error: {r['error']} | | | | | |")
            continue
        peak = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "–"
        vs = f"{r['vs_plain']:.2f}" if "vs_plain" in r else "–"
        md.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {vs} | {r['median_s']:.3f} | {peak} | "
                  f"{r['trainable']:,} | {r['setup_s']:.1f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
