"""Distributed purification of the GPT-2 backdoor of ``examples/lm_backdoor.py`` — launch with torchrun.

    torchrun --nproc_per_node=2 examples/torchrun_purify.py --mode fast_fip --parallel ddp --out runs/ddp
    torchrun --nproc_per_node=2 examples/torchrun_purify.py --mode fip --parallel fsdp --out runs/fsdp
    torchrun --nproc_per_node=2 examples/torchrun_purify.py --mode fast_fip --parallel fsdp --out runs/fsdp_fast
    python examples/torchrun_purify.py --mode fast_fip            # the same, single process

(For a torchvision-style classifier checkpoint the CLI does the same without a script:
``torchrun --nproc_per_node=2 -m fip_fast.cli purify --distributed ddp …``.)

Every rank builds the same data; rank 0 trains the backdoored model (or loads ``--model``) and broadcasts it.
The defender's clean set is split across ranks (:func:`fip_fast.integrations.distributed.shard_indices`): F0 is
estimated on each rank's share and all-reduced by :func:`fip_fast.fisher.estimate_fisher`; each step draws one global
batch (same generator on every rank) and each rank runs its slice, so the run equals a single-process run on the
global batch (``tests/test_distributed.py`` checks that equality).  Fast FIP reparameterizes *before* wrapping.
At the end the purified weights are gathered, merged (no SVD left) and saved by rank 0 as ``purified.pt``
(a plain ``GPT2LMHeadModel`` state dict), the sharded FIP state as a ``torch.distributed.checkpoint`` in
``ckpt/``, and the metrics as ``result.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_backdoor as lb  # noqa: E402

from fip_fast import spectral  # noqa: E402
from fip_fast.fisher import estimate_fisher  # noqa: E402
from fip_fast.integrations import distributed as fd  # noqa: E402
from fip_fast.integrations import hf
from fip_fast.io import UnsafeCheckpointError, load_weights  # noqa: E402


def get_model(args, cfg, data):
    model = lb.make_model(cfg)
    if args.model:
        # The model under purification is untrusted: safetensors or a weights-only torch file, never a pickle.
        try:
            load_weights(model, args.model)
        except UnsafeCheckpointError as e:
            raise SystemExit(f"--model: {e}") from e
        return model.eval()
    state = None
    if fd.is_rank0():
        lb.train_backdoored(model, data, cfg, log=fd.rank0_print)
        state = model.state_dict()
    state = fd.broadcast_object(state)
    model.load_state_dict(state)
    return model.eval()


def full_state(model) -> dict:
    """The full (unsharded) state dict of a plain, DDP or FSDP2 model, on CPU, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    m = fd.unwrap(model)
    if fd.is_distributed() and any(fd.is_dtensor(p) for p in m.parameters()):
        return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["fip", "fast_fip"], default="fast_fip")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--estimator", choices=["fd", "lagged"], default="fd")
    ap.add_argument("--model", help="weights of a backdoored lm_backdoor model: .safetensors or a weights-only "
                    "torch state dict such as purified.pt (pickles are refused; default: train one)")
    ap.add_argument("--small", action="store_true", help="lm_backdoor's CPU-small configuration")
    ap.add_argument("--set", nargs="*", default=[], help="override lm_backdoor.Config fields, e.g. fip_steps=20")
    ap.add_argument("--out", default="runs/torchrun_purify")
    args = ap.parse_args(argv)

    rank, world, device = fd.init_from_env()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = lb.Config.small() if args.small else lb.Config()
    for kv in args.set:
        k, v = kv.split("=")
        typ = type(getattr(cfg, k))
        setattr(cfg, k, v.lower() in ("1", "true", "yes") if typ is bool else typ(v))
    t0 = time.perf_counter()
    data = lb.make_data(cfg)
    model = get_model(args, cfg, data)
    before = lb.evaluate(model, data) if fd.is_rank0() else None
    fd.rank0_print(f"[rank0/{world}] backdoored: {before}")

    # --- reparameterize (before wrapping), F0 on this rank's share of the clean set (all-reduced)
    t1 = time.perf_counter()
    clean = data["clean"]
    mine = clean[list(fd.shard_indices(len(clean)))]
    batches = [(mine[i:i + 50], mine[i:i + 50]) for i in range(0, len(mine), 50)]
    if args.mode == "fast_fip":
        params = hf.reparameterize_transformer(model, relative=True, train_biases=cfg.fast_train_biases)
        n_delta = len(spectral.spectral_layers(model))
        f0 = estimate_fisher(model, batches, loss_fn=hf.causal_lm_nll, params=params, normalize="max")
        groups = [dict(names=None, params=params[:n_delta], lr=cfg.fast_lr, rho=cfg.fast_rho, eta_r=cfg.fast_eta_r),
                  dict(names=None, params=params[n_delta:], lr=cfg.fip_lr, rho=cfg.fip_rho, eta_r=cfg.fip_eta_r)]
        steps = cfg.fast_steps
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        f0 = estimate_fisher(model, batches, loss_fn=hf.causal_lm_nll, params=params, normalize="max",
                             estimator="batch")
        groups = [dict(names=None, params=params, lr=cfg.fip_lr, rho=cfg.fip_rho, eta_r=cfg.fip_eta_r)]
        steps = cfg.fip_steps
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["names"] = [names[id(p)] for p in g["params"]]
    f0_named = fd.fisher_by_name(model, f0)

    # --- wrap
    if args.parallel == "fsdp" and fd.is_distributed():
        fd.shard_fsdp(model)                       # GPT-2 blocks, then the root (tied wte/lm_head in the root)
        f0 = fd.shard_fisher(model, f0_named)
        net = model
        pmap = dict(model.named_parameters())
        for g in groups:
            g["params"] = [pmap[n] for n in g["names"]]
    else:
        net = fd.wrap_ddp(model)
    opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups if g["params"]]
    opt = fd.fip_for_fsdp(opt_groups, momentum=0.9, eta_F=cfg.fip_eta_F, trace_every=cfg.trace_every,
                          trace_estimator=args.estimator, fisher0=f0)

    # --- purify: one global batch per step, each rank runs its slice
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    net.train()
    for step in range(steps):
        x = clean[torch.randint(0, len(clean), (cfg.fip_batch,), generator=gen)]
        xl = x[list(fd.shard_indices(len(x)))]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = hf.causal_lm_loss(net(xl), xl)
            loss.backward()
            return loss

        if args.estimator == "fd":
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        if (step + 1) % 25 == 0:
            fd.rank0_print(f"  step {step + 1}/{steps}: local clean loss {loss.item():.3f}")
    net.eval()
    secs = time.perf_counter() - t1

    # --- save: sharded FIP state (DCP), then the merged plain model on rank 0
    os.makedirs(args.out, exist_ok=True)
    with opt.unperturbed():
        fd.save_checkpoint(os.path.join(args.out, "ckpt"), net, opt, extra={"steps": steps, "mode": args.mode})
        state = full_state(net)
    result = None
    if fd.is_rank0():
        plain = lb.make_model(cfg)
        if args.mode == "fast_fip":
            hf.reparameterize_transformer(plain, relative=True)
        plain.load_state_dict(state)
        hf.merge_transformer(plain)
        torch.save(plain.state_dict(), os.path.join(args.out, "purified.pt"))
        result = dict(mode=args.mode, parallel=args.parallel if world > 1 else "single", world_size=world,
                      estimator=args.estimator, before=before, after=lb.evaluate(plain, data),
                      purify_s=secs, total_s=time.perf_counter() - t0)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)
    fd.barrier()
    fd.cleanup()
    return result


if __name__ == "__main__":
    main()
