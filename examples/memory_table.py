"""Memory of one purification step: FIP vs Fast FIP (full rank and rank-k) on the same GPT-2-shaped model, and
bytes per parameter of a Linear stack, Fast FIP in place vs the module-swapping reference, measured vs arithmetic.

Builds a randomly initialized GPT-2 (no download), runs one FIP step per mode on a token batch and prints what
:func:`fip_fast.memory.measure` reports (CPU: saved-for-backward bytes + the in-place taps' projected inputs as
activations; CUDA: peak allocated), then the analytical bytes/parameter and the largest model that fits 80 GB
per mode.  ``--linear-stack`` instead measures a stack of Linear layers (fp32 and bf16, rank k and full rank,
:mod:`fip_fast.spectral` in place vs :mod:`fip_fast.spectral_reference`) beside :func:`memory.bytes_per_param`.

    python examples/memory_table.py                       # ≈ 30–60 s on 2 CPU cores
    python examples/memory_table.py --n-layer 12 --n-embd 768 --dtype bf16 --json mem.json
    python examples/memory_table.py --linear-stack --json bench/results/memory_cpu.json   # ≈ 30 s
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from fip_fast import memory, spectral, spectral_reference
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


STACK_MODES = {("inplace", None): "fast_fip", ("inplace", "k"): "fast_fip_rank_k",
               ("reference", None): "fast_fip_reference", ("reference", "k"): "fast_fip_reference_rank_k"}


def stack_row(impl: str, rank, dtype: torch.dtype, d: int, depth: int, tokens: int) -> dict:
    """One FIP fd step (F0 anchor on δ) of ``depth`` × Linear(d, d, bias=False) reparameterized by ``impl``."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(depth)]).to(dtype)
    mod = spectral if impl == "inplace" else spectral_reference
    deltas = mod.reparameterize(model, rank=rank, relative=True)
    opt = FIP(deltas, lr=1e-3, trace_every=1, fisher0={p: torch.ones_like(p) for p in deltas})
    x = torch.randn(tokens, d, dtype=dtype)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        return loss

    rep = memory.measure(model, opt, lambda: opt.step(closure))
    n = depth * d * d
    b = torch.finfo(dtype).bits // 8
    mode = STACK_MODES[(impl, None if rank is None else "k")]
    bp = memory.bytes_per_param(mode, b, m=d, n=d, k=rank or d)
    static = rep.total_static
    return dict(impl=impl, rank=rank or "full", dtype=str(dtype).replace("torch.", ""), mode=mode,
                static_B_per_param=static / n, activations_B_per_param=rep.activations / n,
                activations_tap_B_per_param=(rep.activations_tap or 0) / n,
                arith_persistent=bp["persistent"], arith_step_transient=bp["step_transient"],
                buffers={k: v / n for k, v in rep.buffers_spectral.items()}, weight_B_per_param=
                (rep.params_frozen + rep.params_trainable) / n, tokens=tokens)


def linear_stack_table(args) -> list[dict]:
    rows = [stack_row(impl, rank, dt, args.stack_dim, args.stack_depth, args.stack_tokens)
            for dt in (torch.float32, torch.bfloat16) for rank in (args.rank, None)
            for impl in ("reference", "inplace")]
    print(f"{args.stack_depth} × Linear({args.stack_dim}, bias=False), one FIP fd step, {args.stack_tokens} tokens; "
          "bytes per weight parameter (measured: live tensors; activations: saved for backward + taps)")
    print("| dtype | rank | Fast FIP | weight | W0 | U+Vh | residual | static measured | arithmetic persistent "
          "| activations measured (tap) | arithmetic per-step W(δ) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bu = r["buffers"]
        print(f"| {r['dtype']} | {r['rank']} | {r['impl']} | {r['weight_B_per_param']:.3f} | {bu['W0']:.3f} | "
              f"{bu['U'] + bu['Vh']:.3f} | {bu['residual']:.3f} | {r['static_B_per_param']:.3f} | "
              f"{r['arith_persistent']:.3f} | {r['activations_B_per_param']:.3f} "
              f"({r['activations_tap_B_per_param']:.3f}) | {r['arith_step_transient']:.3f} |")
    return rows


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
    ap.add_argument("--linear-stack", action="store_true", help="the Linear-stack table instead of GPT-2")
    ap.add_argument("--stack-dim", type=int, default=1024)
    ap.add_argument("--stack-depth", type=int, default=4)
    ap.add_argument("--stack-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.linear_stack:
        rows = linear_stack_table(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(args=vars(args), rows=rows), f, indent=1)
        return
    base = build(args)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = [one_mode(base, m, args, x) for m in args.modes.split(",")]
    n = sum(p.numel() for p in base.parameters())
    mb = lambda v: f"{v / 2**20:9.1f}"  # noqa: E731
    print(f"GPT-2 {args.n_layer}×{args.n_embd}, vocab {args.vocab}, {n / 1e6:.1f} M params, {args.dtype}, "
          f"batch {args.batch}×{args.seq}, device {next(base.parameters()).device}")
    print("| mode | trainable | params | grads | U | Vh | W0 | residual | optimizer state | activations | total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["buffers_spectral"]
        print(f"| {r['mode']} ({r['estimator']}) | {r['n_trainable']:,} | "
              f"{mb(r['params_trainable'] + r['params_frozen'])} | {mb(r['grads'])} | {mb(s['U'])} | {mb(s['Vh'])} "
              f"| {mb(s['W0'])} | {mb(s['residual'])} | {mb(r['optimizer_state'])} | {mb(r['activations'])} "
              f"| {mb(r['total'])} |")
    print("(MiB; activations: " + rows[0]["activations_how"] + ")")
    print(f"\nanalytical, bf16 weights, 4096×4096 layers, rank-k k={args.rank}:")
    out_an = {}
    for mode in memory.MODES:
        bp = memory.bytes_per_param(mode, 2, m=4096, n=4096, k=args.rank)
        fit = memory.max_params(80e9, mode, 2, m=4096, n=4096, k=args.rank)
        out_an[mode] = dict(bp, fits_80GB=fit)
        print(f"  {mode:26s} {bp['total']:5.1f} B/param (+{bp['foreach_transient']:.0f} foreach) → "
              f"{fit / 1e9:5.1f} B params in 80 GB (before activations)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), n_params=n, rows=rows, analytical_bf16=out_an), f, indent=1)


if __name__ == "__main__":
    main()
