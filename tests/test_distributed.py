"""DDP and FSDP2 purification, 2 processes with gloo on CPU, against a single-process run on the same global batch.

One spawn (module fixture) runs every scenario on both ranks and saves what each rank ends with; the tests
compare those results with the same scenario run here in one process on the whole global batch.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _hang import HANG_S, hung
from torch import nn

from fip_fast import ops, spectral, spectral_reference
from fip_fast.fisher import estimate_fisher
from fip_fast.integrations import distributed as fd
from fip_fast.optim import FIP

WORLD = 2
GLOBAL_B = 8
STEPS = 4
ATOL = 2e-5

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


# ------------------------------------------------------------------------------------------- scenarios
def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(GLOBAL_B, 6, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (GLOBAL_B,), generator=g) for _ in range(STEPS)]
    fx = torch.randn(2 * GLOBAL_B, 6, generator=g)
    fy = torch.randint(0, 3, (2 * GLOBAL_B,), generator=g)
    return xs, ys, fx, fy


def _local(t):
    return t[list(fd.shard_indices(len(t)))]


def _full(t):
    return t.full_tensor() if fd.is_dtensor(t) else t.detach().clone()


def _named_full(model):
    return {n: _full(p) for n, p in fd.unwrap(model).named_parameters()}


def _run(kind: str, estimator: str, spectral_mode: bool, fsdp: bool, ckpt_dir=None, raw: bool = False,
         inplace: bool = True, mix: bool = False) -> dict:
    """One purification of 4 steps; runs identically with or without a process group."""
    xs, ys, fx, fy = _data()
    model = _model()
    # Fast FIP in place (DDP; FSDP2 through fip_fast.spectral.shard, called by shard_fsdp) or the module-swapping
    # reference form (FSDP2 shards its δ and residual like any parameter)
    sp = spectral if inplace else spectral_reference
    if spectral_mode:
        params = sp.reparameterize(model, relative=True)
        if mix:                     # the singular-vector mixing band (Fast FIP's default), trained beside δ
            with torch.no_grad():
                params = params + [o.add_(0.05) for o in spectral.add_mixing(model, band=1)]
    else:
        params = list(model.parameters())
    # F0 on this rank's share of the clean data: estimate_fisher all-reduces it (before wrapping / sharding).
    fx_l, fy_l = _local(fx), _local(fy)
    f0 = estimate_fisher(model, [(fx_l[:3], fy_l[:3]), (fx_l[3:], fy_l[3:])], params=params, normalize="max")
    f0_named = fd.fisher_by_name(model, f0)
    out = {"fisher": {k: v.clone() for k, v in f0_named.items()}}
    hyper = dict(lr=0.1, momentum=0.9, eta_F=0.5, eta_r=1.0, rho=0.2, trace_every=2, trace_estimator=estimator,
                 weight_decay=1e-3)
    if fsdp:
        fd.shard_fsdp(model, units=[model[0], model[2]])
        f0s = fd.shard_fisher(model, f0_named)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (FIP if raw else fd.fip_for_fsdp)(params, fisher0=f0s, **hyper)
        net = model
    else:
        net = fd.wrap_ddp(model) if kind == "ddp" else model
        opt = fd.fip_for_fsdp(params, fisher0=f0, **hyper)
    gnorms = []
    for x, y in zip(xs, ys):
        xl, yl = _local(x), _local(y)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xl), yl)
            loss.backward()
            return loss

        if estimator == "fd":
            opt.step(closure)
        else:
            closure()
            opt.step()
        # the group norm the optimizer computes (on the gradient left in .grad), vs the norm of the full grads
        g = [p.grad for p in params if p.grad is not None]
        n, _ = ops.global_norm(g, impl=opt.impl)
        n = n.full_tensor() if fd.is_dtensor(n) else n
        ref = torch.sqrt(sum(_full(t).float().pow(2).sum() for t in g))
        gnorms.append((float(n), float(ref)))
    with opt.unperturbed():
        if spectral_mode and inplace:
            spectral.sync(model)          # the in-place weights follow δ lazily: bring them to the last step's δ
        out["params"] = _named_full(model)
    out["gnorms"] = gnorms
    out["momentum"] = {n: _full(opt.state[p]["momentum_buffer"]) for n, p in fd.unwrap(model).named_parameters()
                       if p in opt.state}
    if ckpt_dir is not None:
        x, y = xs[0], ys[0]
        xl, yl = _local(x), _local(y)

        def closure2(m=net, o=opt):
            o.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(xl), yl)
            loss.backward()
            return loss

        with opt.unperturbed():
            fd.save_checkpoint(ckpt_dir, model, opt, extra={"step": STEPS})
        # a fresh model + optimizer, sharded the same way, loaded from the checkpoint
        model2 = _model(seed=5)
        if spectral_mode:
            sp.reparameterize(model2, relative=True)
            if mix:
                spectral.add_mixing(model2, band=1)
        if fsdp:
            fd.shard_fsdp(model2, units=[model2[0], model2[2]])
        p2 = [p for p in model2.parameters() if p.requires_grad]
        f02 = fd.shard_fisher(model2, {k: torch.zeros_like(v) for k, v in f0_named.items()}) if fsdp else \
            {p: torch.zeros_like(p) for p in p2}
        opt2 = fd.fip_for_fsdp(p2, fisher0=f02, **hyper)
        closure2(model2, opt2)              # materialize lazily created state so the loaded keys match
        opt2.zero_grad(set_to_none=True)
        extra = fd.load_checkpoint(ckpt_dir, model2, opt2)
        out["ckpt_extra"] = extra
        out["ckpt_params"] = _named_full(model2)
        out["ckpt_state_keys"] = sorted(opt2.state[p2[0]].keys())
        out["ckpt_fisher0"] = {n: _full(opt2.state[p]["fisher0"]) for n, p in model2.named_parameters()
                               if p in opt2.state and "fisher0" in opt2.state[p]}
        # one more step from the original and from the restored pair: identical
        for m, o in ((net, opt), (model2, opt2)):
            if estimator == "fd":
                o.step(lambda m=m, o=o: closure2(m, o))
            else:
                closure2(m, o)
                o.step()
        with opt.unperturbed(), opt2.unperturbed():
            out["after_orig"] = _named_full(model)
            out["after_ckpt"] = _named_full(model2)
    return out


SCENARIOS = {
    "ddp_full_fd": dict(kind="ddp", estimator="fd", spectral_mode=False, fsdp=False),
    "ddp_fast_lagged": dict(kind="ddp", estimator="lagged", spectral_mode=True, fsdp=False),
    "fsdp_full_fd": dict(kind="fsdp", estimator="fd", spectral_mode=False, fsdp=True),
    "fsdp_fast_fd_ckpt": dict(kind="fsdp", estimator="fd", spectral_mode=True, fsdp=True, ckpt=True, inplace=False),
    "fsdp_full_lagged": dict(kind="fsdp", estimator="lagged", spectral_mode=False, fsdp=True, raw=True),
    "fsdp_inplace_fd_ckpt": dict(kind="fsdp", estimator="fd", spectral_mode=True, fsdp=True, ckpt=True),
    "fsdp_inplace_lagged": dict(kind="fsdp", estimator="lagged", spectral_mode=True, fsdp=True),
    "fsdp_inplace_mix_fd_ckpt": dict(kind="fsdp", estimator="fd", spectral_mode=True, fsdp=True, ckpt=True, mix=True),
}


def _worker(rank: int, world: int, port: int, outdir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, w, _ = fd.init_from_env(backend="gloo", timeout_s=HANG_S)
    assert (r, w) == (rank, world)
    results = {}
    try:
        for name, sc in SCENARIOS.items():
            sc = dict(sc)
            ckpt = os.path.join(outdir, f"ckpt_{name}") if sc.pop("ckpt", False) else None
            try:
                results[name] = _run(ckpt_dir=ckpt, **sc)
            except Exception as exc:  # report, keep going
                import traceback
                results[name] = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
            fd.barrier()
        results["gather_many"] = _gather_many_check(world)
        fd.barrier()
        results["universal"] = _universal_check(rank, world)
        fd.barrier()
        results["patch"] = _patch_check(rank, world)
        fd.barrier()
        # the wrapper accepts 'lagged' on DTensor parameters (the core foreach step shards-propagates it)
        m = _model()
        fd.shard_fsdp(m)
        try:
            fd.fip_for_fsdp(list(m.parameters()), trace_estimator="lagged")
            results["wrapper_lagged"] = "accepted"
        except NotImplementedError as exc:
            results["wrapper_lagged"] = f"NotImplementedError: {exc}"
        fd.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        fd.cleanup()


def _gather_many_check(world: int) -> dict:
    """spectral._gather_many on DTensors of uneven row counts (one with an empty shard) and a plain tensor:
    equal to full_tensor() of each, with one collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    fulls = [torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * i for i, n in enumerate((5, 3, 1))]
    fulls.append(torch.arange(7, dtype=torch.float32))
    ts = [distribute_tensor(f, mesh, [Shard(0)]) for f in fulls] + [torch.ones(2)]
    calls, real = [], dist.all_gather

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    dist.all_gather = counting
    try:
        got = spectral._gather_many(ts)
    finally:
        dist.all_gather = real
    return {"equal": all(torch.equal(g, f) for g, f in zip(got, fulls + [torch.ones(2)])), "calls": len(calls)}


def _universal_grads(world: int):
    """Per-rank input gradients of a 4-sample batch (2 perturbed) whose signs disagree across the ranks."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 2, 3, generator=g) * (r + 1) for r in range(world)]


def _universal_check(rank: int, world: int) -> torch.Tensor:
    """The universal perturbation's shared update under DDP: each rank feeds its own input gradient; δ after the
    update (the same on every rank if the gradient is summed over the ranks)."""
    from fip_fast.pipeline.holding import UniversalPerturbation, _Universal

    x = torch.full((8, 2, 3), 0.5)
    u = _Universal(UniversalPerturbation(eps=0.2, fraction=0.5, clamp=(0.0, 1.0), gradient="shared"), x,
                   torch.device("cpu"), world_size=world)
    mixed, _ = u.mix(x[:4], torch.zeros(4, dtype=torch.long))
    mixed.grad = _universal_grads(world)[rank]
    u.update_shared(mixed)
    return u.delta.clone()


def _patch_case(world: int):
    """A tiny conv net, the patch surrogate's _Universal (budget 4.5 of 9 positions) and each rank's batch."""
    from fip_fast.pipeline.holding import UniversalPerturbation, _Universal

    g = torch.Generator().manual_seed(5)
    xs = [torch.rand(4, 2, 3, 3, generator=g) for _ in range(world)]
    ys = [torch.randint(3, (4,), generator=g) for _ in range(world)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 3))
    cfg = UniversalPerturbation(eps=0.2, clamp=(0.0, 1.0), patch=0.5)
    return model, lambda w: _Universal(cfg, xs[0], torch.device("cpu"), world_size=w), xs, ys


def _patch_check(rank: int, world: int) -> dict:
    """The patch surrogate's update under DDP: δ, the mask and the pattern after one update on each rank's batch."""
    model, make, xs, ys = _patch_case(world)
    u = make(world)
    u.update(model, xs[rank], ys[rank])
    return {"delta": u.delta.clone(), "mask": u.mask.clone(), "pattern": u.pattern.clone()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD, join=False,
                             start_method="spawn")
    started = time.monotonic()
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > started + HANG_S:
                hung("the 2-process run", started)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_results():
    assert not dist.is_initialized()
    out = {}
    for name, sc in SCENARIOS.items():
        sc = {k: v for k, v in sc.items() if k != "ckpt"}
        out[name] = _run(**dict(sc, kind="single", fsdp=False))
    return out


def _close(a: dict, b: dict, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_single_process(name, dist_results, single_results):
    ref = single_results[name]
    for r, res in enumerate(dist_results):
        got = res[name]
        assert "error" not in got, got.get("error")
        _close(got["fisher"], ref["fisher"])             # F0 all-reduced over ranks == F0 of the global data
        _close(got["params"], ref["params"])             # same trajectory as one process on the global batch
        _close(got["momentum"], ref["momentum"])
        # the suppressor's group norm is the norm over the full (unsharded, all-reduced) gradient
        for (n, full), (n_ref, _) in zip(got["gnorms"], ref["gnorms"]):
            assert n == pytest.approx(full, rel=1e-5)
            assert n == pytest.approx(n_ref, rel=1e-4)
    # every rank ends with the same model
    _close(dist_results[0][name]["params"], dist_results[1][name]["params"], atol=0)


def test_universal_perturbation_is_one_delta_across_ranks(dist_results):
    """purify(distributed="ddp", universal_perturbation=…): δ's gradient is summed over the ranks, so every rank
    takes the same signed step, that of the global batch's gradient."""
    grads = _universal_grads(WORLD)
    want = 0.02 * sum(g[:2].sum(0) for g in grads).sign()
    assert int((torch.stack([g[:2].sum(0).sign() for g in grads]).diff(dim=0) != 0).sum()) > 0   # ranks disagree
    for res in dist_results:
        torch.testing.assert_close(res["universal"], want, rtol=0, atol=0)


def test_patch_surrogate_is_one_mask_and_pattern_across_ranks(dist_results):
    """With ``patch``, δ's, the mask's and the pattern's gradients are summed over the ranks in the one collective:
    every rank ends with the steps of the summed gradients (computed here rank by rank in one process), not with
    its own."""
    model, make, xs, ys = _patch_case(WORLD)
    grads = []
    for r in range(WORLD):
        u = make(1)
        u._steps = lambda gs: grads.append([g.clone() for g in gs])
        u.update(model, xs[r], ys[r])
    want = make(1)
    want._steps([sum(gs) for gs in zip(*grads)])
    assert any(bool((a.sign() != b.sign()).any()) for a, b in zip(*grads))            # the ranks disagree
    for res in dist_results:
        for k in ("delta", "mask", "pattern"):
            torch.testing.assert_close(res["patch"][k], getattr(want, k), rtol=0, atol=1e-7, msg=k)
        assert float(res["patch"]["mask"].sum()) > 0


def test_fsdp_sync_gathers_every_delta_in_one_collective(dist_results):
    for res in dist_results:
        assert res["gather_many"] == {"equal": True, "calls": 1}, res["gather_many"]


def test_fip_for_fsdp_refuses_lagged_on_dtensors(dist_results):
    for res in dist_results:
        assert res["wrapper_lagged"] == "accepted"
    assert "error" not in dist_results[0]["fsdp_full_lagged"]


@pytest.mark.parametrize("name", ["fsdp_fast_fd_ckpt", "fsdp_inplace_fd_ckpt", "fsdp_inplace_mix_fd_ckpt"])
def test_fsdp_state_is_sharded_and_checkpoint_roundtrip(dist_results, name):
    for res in dist_results:
        got = res[name]
        assert "error" not in got, got.get("error")
        assert got["ckpt_extra"] == {"step": STEPS}
        _close(got["ckpt_params"], got["params"], atol=0)                 # loaded weights == saved weights
        _close(got["ckpt_fisher0"], {k: v for k, v in got["fisher"].items()}, atol=1e-6)  # F0 restored, fp32
        assert {"anchor", "fisher", "fisher0", "momentum_buffer", "step"} <= set(got["ckpt_state_keys"])
        _close(got["after_ckpt"], got["after_orig"], atol=1e-6)          # resumes exactly
