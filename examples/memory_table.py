"""Memory of one purification step: FIP vs Fast FIP (full rank and rank-k) on the same GPT-2-shaped model.

Builds a randomly initialized GPT-2 (no download), runs one FIP step per mode on a token batch and prints what
:func:`fip_fast.memory.measure` reports (CPU: saved-for-backward bytes as activations; CUDA: peak allocated),
then the analytical bytes/parameter and the largest model that fits 80 GB per mode.

    python examples/memory_table.py                       # ≈ 30–60 s on 2 CPU cores
    python examples/memory_table.py --n-layer 12 --n-embd 768 --dtype bf16 --json mem.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from fip_fast import memory
from fip_fast.integrations import hf
from fip_fast.optim import FIP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(DTYPES[args.dtype])


def one_mode(base, mode: str, args, x) -> dict:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if mode == "fip":
        params, est = [p for p in model.parameters()], "fd"
    elif mode == "fip_lagged":
        params, est = [p for p in model.parameters()], "lagged"
    elif mode == "fast_fip":
        params, est = hf.reparameterize_transformer(model, relative=True), "fd"
    else:
        params, est = hf.reparameterize_transformer(model, rank=args.rank, svd="lowrank", relative=True), "fd"
    t_rep = time.perf_counter() - t0
    # F0 = ones stands in for an estimated Fisher: same tensors, same bytes
    f0 = {p: torch.ones_like(p, dtype=torch.float32) for p in params}
    opt = FIP(params, lr=1e-3, eta_F=1e-3, rho=0.05, trace_every=1, trace_estimator=est, fisher0=f0)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = hf.causal_lm_loss(model(x), x)
        loss.backward()
        return loss

    def step():
        opt.step(closure) if est == "fd" else (closure(), opt.step())

    t1 = time.perf_counter()
    rep = memory.measure(model, opt, step)
    return dict(mode=mode, estimator=est, reparam_s=t_rep, step_s=time.perf_counter() - t1, **rep.as_dict())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--modes", default="fip,fip_lagged,fast_fip,fast_fip_rank_k")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    base = build(args)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = [one_mode(base, m, args, x) for m in args.modes.split(",")]
    n = sum(p.numel() for p in base.parameters())
    mb = lambda v: f"{v / 2**20:9.1f}"  # noqa: E731
    print(f"GPT-2 {args.n_layer}×{args.n_embd}, vocab {args.vocab}, {n / 1e6:.1f} M params, {args.dtype}, "
          f"batch {args.batch}×{args.seq}, device {next(base.parameters()).device}")
    print("| mode | trainable | params | grads | U | Vh | residual | optimizer state | activations | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["buffers_spectral"]
        print(f"| {r['mode']} ({r['estimator']}) | {r['n_trainable']:,} | "
              f"{mb(r['params_trainable'] + r['params_frozen'])} | {mb(r['grads'])} | {mb(s['U'])} | {mb(s['Vh'])} "
              f"| {mb(s['residual'])} | {mb(r['optimizer_state'])} | {mb(r['activations'])} | {mb(r['total'])} |")
    print("(MiB; activations: " + rows[0]["activations_how"] + ")")
    print(f"\nanalytical, bf16 weights, 4096×4096 layers, rank-k k={args.rank}:")
    out_an = {}
    for mode in memory.MODES:
        bp = memory.bytes_per_param(mode, 2, m=4096, n=4096, k=args.rank)
        fit = memory.max_params(80e9, mode, 2, m=4096, n=4096, k=args.rank)
        out_an[mode] = dict(bp, fits_80GB=fit)
        print(f"  {mode:16s} {bp['total']:5.1f} B/param (+{bp['foreach_transient']:.0f} foreach) → "
              f"{fit / 1e9:5.1f} B params in 80 GB (before activations)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), n_params=n, rows=rows, analytical_bf16=out_an), f, indent=1)


if __name__ == "__main__":
    main()
