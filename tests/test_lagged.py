"""Closure-free FIP (``trace_estimator="lagged"``, GitHub issue 9) in real clients: implementation parity over
many steps, Hugging Face ``Trainer``, ``torch.amp.GradScaler`` with a planted inf, gradient accumulation, DDP and
``torch.compile``.  Everything on CPU, small models; the whole file runs in well under 90 s."""
import contextlib
import copy
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fip_fast import FIP, ops
from fip_fast.integrations import drop_perturbation, find_fip

sys.path.insert(0, os.path.dirname(__file__))  # noqa: E402
from _hang import HANG_S, hung  # noqa: E402
from _isolate import in_fresh_process  # noqa: E402


# ------------------------------------------------------------------------------------------------ helpers
class Net(nn.Module):
    """An MLP with awkward sizes (1-element and odd tensors), no BatchNorm (so micro-batching is exact)."""

    def __init__(self, seed=0, d_in=6, hidden=13, k=4):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, k)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) * self.scale


def _batches(n_batches, bs=16, d_in=6, k=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d_in, generator=g), torch.randint(0, k, (bs,), generator=g)) for _ in range(n_batches)]


def _fisher0(model):
    return {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
            for i, p in enumerate(model.parameters()) if p.numel() != 1}


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, state


def _assert_snap_equal(a, b, rtol=0.0, atol=0.0):
    for p, q in zip(a[0], b[0]):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    for s, t in zip(a[1], b[1]):
        assert set(s) == set(t)
        for k in s:
            torch.testing.assert_close(s[k], t[k], rtol=rtol, atol=atol, msg=lambda m: f"state {k}: {m}")


def _lagged(model, **kw):
    kw = {**dict(lr=0.05, momentum=0.9, trace_estimator="lagged", eta_F=0.05, rho=0.1, trace_every=2,
                 impl="foreach"), **kw}
    return FIP(model.parameters(), **kw)


def _clean(model, opt):
    """θ for every parameter: (θ + e) − e while e is applied (what the next step / unperturbed() restores), the
    parameters themselves between steps (e stored, applied at the next training forward)."""
    return [p.detach() - opt.state[p]["pert"] if opt.is_perturbed and "pert" in opt.state[p]
            else p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------ 1. parity
PARITY_CONFIGS = [
    dict(trace_every=1),
    dict(trace_every=3, nesterov=True, weight_decay=1e-2),
    dict(trace_every=2, precondition="fisher", damping=1e-2, lr=1e-3, max_mix=0.5),
    dict(trace_every=1, eta_F=5.0, rho=0.02),          # r capped at max_mix·ρ
]


def _parity_run(impl, cfg, steps=20, fisher=True, dtype=torch.float32):
    model = Net().to(dtype)
    f0 = {p: f.to(dtype) for p, f in _fisher0(model).items()} if fisher else None
    opt = _lagged(model, impl=impl, fisher0=f0, **cfg)
    data = _batches(steps)
    trail, perturbed_calls = [], 0
    for x, y in data:
        # The forward/backward runs at whatever the parameters hold: θ + e before a suppressor call.
        perturbed_calls += int(any(opt.state[p].get("pert", torch.zeros(1)).abs().sum() > 0
                                   for p in model.parameters()))
        opt.zero_grad()
        F.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
        trail.append(_snapshot(model, opt))
    return trail, perturbed_calls


def _max_rel_err(trail, want):
    """Largest |a − b| / (|b| + 1e-6) over every step, parameter and state tensor (b in fp64)."""
    worst = 0.0
    for a, b in zip(trail, want):
        for x, y in zip(a[0] + [t for s in a[1] for t in s.values()], b[0] + [t for s in b[1] for t in s.values()]):
            worst = max(worst, ((x.double() - y.double()).abs() / (y.double().abs() + 1e-6)).max().item())
    return worst


@pytest.mark.parametrize("cfg", PARITY_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_lagged_foreach_matches_reference_over_20_steps(cfg):
    ref, n_ref = _parity_run("reference", cfg)
    fe, n_fe = _parity_run("foreach", cfg)
    assert n_ref == n_fe > 0          # the suppressor really ran at perturbed points
    if not cfg.get("precondition"):
        for a, b in zip(ref, fe):     # params + every state tensor after every one of the 20 steps
            _assert_snap_equal(a, b, rtol=2e-5, atol=2e-6)
        return
    # Preconditioning divides by fisher/(1−β^t) + λ with fisher ≪ λ for some elements, and the lagged
    # perturbation feeds each step's rounding into the next gradient: over 20 steps two fp32 paths that round in
    # a different order drift apart by as much as the fp32 reference itself drifts from fp64 (measured: ~5e-4
    # relative on the worst element).  So: foreach must be as close to the fp64 reference as the fp32 reference is.
    ref64, _ = _parity_run("reference", cfg, dtype=torch.float64)
    e_ref, e_fe = _max_rel_err(ref, ref64), _max_rel_err(fe, ref64)
    assert e_fe <= 2.0 * e_ref + 1e-6, (e_fe, e_ref)
    assert e_ref < 5e-3


def test_lagged_triton_interpreter_matches_reference():
    ok, why = ops.availability("triton", "cpu")
    if not ok:
        pytest.skip(f"fip_fast.kernels unavailable on CPU: {why}")
    cfg = dict(trace_every=2, nesterov=True, weight_decay=1e-2)
    ref, n_ref = _parity_run("reference", cfg, steps=20)
    tr, n_tr = _parity_run("triton", cfg, steps=20)
    assert n_ref == n_tr > 0
    for a, b in zip(ref, tr):
        _assert_snap_equal(a, b, rtol=2e-5, atol=2e-6)


def test_drop_perturbation_and_find_fip():
    model = Net()
    opt = _lagged(model, trace_every=1)
    x, y = _batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    clean = _clean(model, opt)
    assert any(opt.state[p]["pert"].abs().sum() > 0 for p in model.parameters())

    class Wrapper:                      # accelerate's AcceleratedOptimizer keeps the real one in .optimizer
        def __init__(self, o):
            self.optimizer = o
    assert find_fip(Wrapper(opt)) is opt and find_fip(torch.optim.SGD(model.parameters(), 0.1)) is None
    # Between steps the weights are θ and e is pending; after a training forward e is applied.  Inside
    # unperturbed() the weights are clean again; dropping e there zeroes it and leaving re-applies nothing.
    assert not opt.is_perturbed and all(torch.equal(p, c) for p, c in zip(model.parameters(), clean))
    with torch.enable_grad():
        model(x)
    assert opt.is_perturbed
    clean = _clean(model, opt)          # (θ + e) − e: what taking e off gives, bit for bit
    with opt.unperturbed():
        drop_perturbation(Wrapper(opt))
    for p, c in zip(model.parameters(), clean):
        assert torch.equal(p, c) and opt.state[p]["pert"].abs().sum() == 0
    drop_perturbation(opt)              # idempotent
    for p, c in zip(model.parameters(), clean):
        assert torch.equal(p, c)
    # The optimizer stays consistent: the next step restores nothing (e = 0) — it equals a step of a twin
    # optimizer whose state is the same but which never perturbed — and sets a new e.
    m2 = copy.deepcopy(model)
    twin = _lagged(m2, trace_every=1)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))   # e = 0 stored: re-applying it changes nothing
    for mm, oo in ((model, opt), (m2, twin)):
        oo.zero_grad()
        F.cross_entropy(mm(x), y).backward()
        oo.step()
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert any(opt.state[p]["pert"].abs().sum() > 0 for p in model.parameters())   # new e along the new g
    with pytest.raises(TypeError):
        drop_perturbation(torch.optim.SGD(model.parameters(), 0.1))


# ------------------------------------------------------------------------------------------------ 2. GradScaler
def _scaler_run(batches, poison_at=None, trace_every=2, autocast=True):
    model = Net()
    opt = _lagged(model, trace_every=trace_every, fisher0=_fisher0(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    snaps = {}
    for i, (x, y) in enumerate(batches):
        before = _snapshot(model, opt)
        opt.zero_grad()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(model(x).float(), y)
        if i == poison_at:
            loss = loss * float("inf")              # planted overflow: every gradient is inf/nan
        scaler.scale(loss).backward()
        scaler.step(opt)                             # no closure: FIP lagged works under GradScaler
        scaler.update()
        snaps[i] = (before, _snapshot(model, opt), opt.is_perturbed)
    return model, opt, scaler, snaps


@pytest.mark.parametrize("trace_every,k", [(1, 4), (2, 4), (2, 3)])
def test_gradscaler_planted_inf_skips_cleanly(trace_every, k):
    """k = 4 with trace_every = 2: the poisoned batch is a suppressor call, run at θ + e; k = 3: the poisoned
    batch is the call that would set e (GradScaler does not call step(), so the next batch sets it instead)."""
    batches = _batches(9, seed=5)
    m1, o1, s1, snaps = _scaler_run(batches, poison_at=k, trace_every=trace_every)
    assert s1.get_scale() == 2.0 ** 11               # the scaler saw the inf and backed off
    before, after, applied = snaps[k]
    # θ, e and every state tensor keep their bits.  (The skipped batch's forward applied e and GradScaler never
    # called step(), so the weights hold θ + e now: compare θ = (θ + e) − e.)
    if applied:
        after = ([p - e for p, e in zip(after[0], (s["pert"] for s in after[1]))], after[1])
    _assert_snap_equal(before, after, rtol=1e-6, atol=1e-7)
    assert before[1][0]["momentum_buffer"].abs().sum() > 0                  # state is non-trivial
    perturbed = any(s["pert"].abs().sum() > 0 for s in before[1])
    assert perturbed == (k % trace_every == 0)       # the skip happened at θ + e on suppressor calls
    # Training continues as if the poisoned batch had never been seen (power-of-two scales: exact unscaling).
    m2, o2, _, _ = _scaler_run(batches[:k] + batches[k + 1:], trace_every=trace_every)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(m1.parameters(), m2.parameters()):
        for key in o1.state[p]:
            if key != "step":
                torch.testing.assert_close(o1.state[p][key], o2.state[q][key], rtol=1e-6, atol=1e-7)
    assert o1.state[next(m1.parameters())]["step"].item() == len(batches) - 1
    with o1.unperturbed(), o2.unperturbed():
        for p, q in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _plain_run(batches, poison_at=None, trace_every=2):
    model = Net()
    opt = _lagged(model, trace_every=trace_every)
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss * float("inf") if i == poison_at else loss).backward()
        opt.step()
    return model, opt


def test_internal_skip_without_scaler_trace_every_1_is_as_if_batch_never_happened():
    batches = _batches(8, seed=6)
    m1, o1 = _plain_run(batches, poison_at=3, trace_every=1)
    m2, o2 = _plain_run(batches[:3] + batches[4:], trace_every=1)
    assert o1.skipped_steps == 1
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("poison_at", [2, 3])
def test_internal_skip_without_scaler_keeps_suppressor_schedule(poison_at):
    """FIP's own non-finite skip (no GradScaler) should leave the schedule as if the batch had never happened —
    the spec: such a step 'leaves every parameter and state untouched'.  With trace_every=2 it does not."""
    batches = _batches(8, seed=6)
    m1, o1 = _plain_run(batches, poison_at=poison_at, trace_every=2)
    m2, o2 = _plain_run(batches[:poison_at] + batches[poison_at + 1:], trace_every=2)
    assert o1.skipped_steps == 1
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ 3. accumulation
@pytest.mark.parametrize("n_micro", [2, 4])
def test_gradient_accumulation_equals_full_batch(n_micro):
    data = _batches(10, bs=16, seed=7)
    full, acc = Net(), Net()
    o_full, o_acc = _lagged(full, trace_every=2), _lagged(acc, trace_every=2)
    for x, y in data:
        o_full.zero_grad()
        F.cross_entropy(full(x), y).backward()
        o_full.step()
        o_acc.zero_grad()
        for xm, ym in zip(x.chunk(n_micro), y.chunk(n_micro)):   # every micro-batch runs at the same θ + e
            (F.cross_entropy(acc(xm), ym) / n_micro).backward()
        o_acc.step()
    for p, q in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o_full.state[p]["pert"], o_acc.state[q]["pert"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 4. DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, steps):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = Net()
        ddp = DDP(model)
        opt = _lagged(model, trace_every=2, fisher0=_fisher0(model))
        data = _batches(steps, bs=16, seed=11)
        max_diff = 0.0
        for x, y in data:
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]       # each rank its own shard
            opt.zero_grad()
            F.cross_entropy(ddp(xs), ys).backward()                  # gradients all-reduced (mean)
            opt.step()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            max_diff = max(max_diff, max((g - flat).abs().max().item() for g in gathered))
        with opt.unperturbed():
            clean = [p.detach().clone() for p in model.parameters()]
        torch.save(dict(max_diff=max_diff, params=[p.detach().clone() for p in model.parameters()], clean=clean,
                        pert=[opt.state[p]["pert"].clone() for p in model.parameters()]),
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()                       # both ranks' results are on disk
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing down: torch's gloo process group can deadlock in its destructor (seen once in CI: the
    # main thread, holding the GIL while the DDP reducer frees the group, joins a gloo thread that waits for the GIL
    # to free the last all_gather's tensors).  The results are saved and both ranks passed the barrier.
    os._exit(0)


@in_fresh_process
def test_ddp_two_process_gloo_perturbation_identical_on_ranks():
    import torch._dynamo  # noqa: F401  (DDP() imports it: ~5 s; done once here, inherited by the forked workers)
    import torch.multiprocessing as mp
    steps, world = 6, 2
    with tempfile.TemporaryDirectory() as d:
        # fork: the workers inherit the imported torch (spawn re-imports it: ~10 s more on a loaded machine);
        # each worker runs with one torch thread, as DataLoader workers forked from a torch process do.
        ctx = mp.start_processes(_ddp_worker, args=(world, _free_port(), d, steps), nprocs=world, join=False,
                                 start_method="fork")
        started = time.monotonic()   # ~8 s on an idle 2-core machine
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > started + HANG_S:
                    hung("the DDP workers", started)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        r = [torch.load(os.path.join(d, f"rank{i}.pt")) for i in range(world)]
    assert r[0]["max_diff"] == 0.0 and r[1]["max_diff"] == 0.0    # params bit-identical after every step
    for a, b in zip(r[0]["params"] + r[0]["pert"], r[1]["params"] + r[1]["pert"]):
        assert torch.equal(a, b)
    assert any(e.abs().sum() > 0 for e in r[0]["pert"])           # ended on a perturbed point (call 5 → 6)
    # Same trajectory as one process on the whole batch (DDP averages the shard gradients).
    model = Net()
    opt = _lagged(model, trace_every=2, fisher0=_fisher0(model))
    for x, y in _batches(steps, bs=16, seed=11):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), r[0]["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 5. compile
def _compile_run(backend, steps=6):
    data = _batches(steps, seed=13)
    eager, comp = Net(), Net()
    cmodel = torch.compile(comp, backend=backend)
    oe, oc = _lagged(eager, trace_every=2), _lagged(comp, trace_every=2)
    for x, y in data:
        for m, o in ((eager, oe), (cmodel, oc)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    # Between steps both hold θ (call 5 stored e for call 6, not applied yet): same weights, same outputs.
    for p, q in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    x = data[0][0]
    with torch.no_grad():
        clean = cmodel(x)
        torch.testing.assert_close(clean, eager(x), rtol=1e-5, atol=1e-6)
    assert not oc.is_perturbed
    # The next training forward applies e, and the compiled graph reads the parameters as they are now …
    out = cmodel(x)
    assert oc.is_perturbed
    torch.testing.assert_close(out, comp(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(clean, out.detach())
    with oc.unperturbed():                          # … and sees the unperturbed ones inside the context.
        torch.testing.assert_close(cmodel(x), clean, rtol=1e-5, atol=1e-6)


def test_torch_compile_aot_eager():
    """Dynamo + AOT autograd (the graph capture inductor also uses), fast to compile on CPU."""
    _compile_run("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    """CPU inductor: compiles C++ (slow on a loaded machine), hence marked slow."""
    _compile_run("inductor")


# ------------------------------------------------------------------------------------------------ 6. HF Trainer
def _hf_setup(out_dir, max_steps=4, **args_kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fip_fast.integrations import FIPCallback
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)                 # random init, nothing downloaded
    g = torch.Generator().manual_seed(0)
    ds = []
    for _ in range(48):
        ids = torch.randint(0, 32, (12,), generator=g)
        ds.append({"input_ids": ids, "labels": ids})
    opt = FIP(model.parameters(), lr=0.05, momentum=0.9, trace_estimator="lagged", eta_F=0.05, rho=0.05,
              trace_every=2)
    kw = dict(output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=4, eval_strategy="steps",
              eval_steps=2, save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
              dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0)
    kw.update(args_kw)
    args = transformers.TrainingArguments(**kw)
    return transformers, model, opt, ds, args, FIPCallback


def test_hf_trainer_lagged_fip_end_to_end():
    with tempfile.TemporaryDirectory() as d:
        transformers, model, opt, ds, args, FIPCallback = _hf_setup(d, gradient_accumulation_steps=2)
        init = [p.detach().clone() for p in model.parameters()]
        seen = dict(step_end_clean={}, eval={}, perturbed_steps=0)

        class Spy(transformers.TrainerCallback):     # runs before FIPCallback in every event
            def on_step_end(self, args, state, control, **kw):
                seen["step_end_clean"][state.global_step] = _clean(model, opt)
                seen["perturbed_steps"] += int(any(opt.state[p]["pert"].abs().sum() > 0
                                                   for p in model.parameters()))

            def on_evaluate(self, args, state, control, **kw):
                seen["eval"][state.global_step] = [p.detach().clone() for p in model.parameters()]

        cb = FIPCallback(opt)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds[:8],
                                       optimizers=(opt, None), callbacks=[Spy(), cb])
        out = trainer.train()
        assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
        assert seen["perturbed_steps"] == 2          # global steps 2, 4 (calls 1, 3) set e
        # Evaluation saw the unperturbed weights of that step.
        assert sorted(seen["eval"]) == [2, 4]
        for step, params in seen["eval"].items():
            for p, c in zip(params, seen["step_end_clean"][step]):
                assert torch.equal(p, c)
        # Checkpoints hold unperturbed weights (steps 2 and 4 set e before the save).
        for step in (2, 4):
            ck = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(d, f"checkpoint-{step}"))
            for (n, p), c in zip(ck.named_parameters(), seen["step_end_clean"][step]):
                assert torch.equal(p, c), n
        # The end of training leaves unperturbed weights, e = 0, and a model that moved.
        for p, c, p0 in zip(model.parameters(), seen["step_end_clean"][4], init):
            assert torch.equal(p.detach(), c)
            assert opt.state[p]["pert"].abs().sum() == 0
        assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), init))
        assert not cb.suspended and not opt._suspended
        # evaluate() after training sees the same (final) weights and works.
        assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_hf_trainer_resume_from_checkpoint_continues_the_trajectory():
    with tempfile.TemporaryDirectory() as d:
        transformers, model, opt, ds, args, FIPCallback = _hf_setup(d, eval_strategy="no")
        transformers.Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                             callbacks=[FIPCallback(opt)]).train()
        full = [p.detach().clone() for p in model.parameters()]
        # A fresh model/optimizer resumed from checkpoint-2: saved unperturbed with e ≠ 0 (call 1 set it); the
        # Trainer loads the model, then the optimizer, whose load_state_dict re-applies e.
        _, m2, o2, _, args2, _ = _hf_setup(d, eval_strategy="no")
        transformers.Trainer(model=m2, args=args2, train_dataset=ds, optimizers=(o2, None),
                             callbacks=[FIPCallback(o2)]).train(resume_from_checkpoint=os.path.join(d,
                                                                                                      "checkpoint-2"))
        for p, q in zip(full, m2.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 7. drop-in
def test_plain_loop_without_any_helper_ends_unperturbed():
    """No drop_perturbation, no callback: after every step — and so at the end — the model holds θ, and what a
    user saves is θ.  The trajectory is the lagged one (e applied at the next training forward)."""
    batches = _batches(6, seed=21)
    model = Net()
    opt = _lagged(model, trace_every=2)
    twins = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert not opt.is_perturbed
        twins.append([p.detach().clone() for p in model.parameters()])
        with torch.no_grad():
            model(x)                         # evaluation between steps leaves θ alone
        assert all(torch.equal(a, p) for a, p in zip(twins[-1], model.parameters()))
    sd = model.state_dict()
    for (k, v), p in zip(sd.items(), model.parameters()):
        assert torch.equal(v, p.detach())
    assert any(opt.state[p]["pert"].abs().sum() > 0 for p in model.parameters())   # call 5 stored e for call 6
    # Same trajectory as the pre-hook-free formulation: apply e by hand before each forward.
    m2 = Net()
    o2 = _lagged(m2, trace_every=2)
    for x, y in batches:
        o2.apply_perturbation()
        o2.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        o2.step()
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_forward_that_bypasses_modules_gets_a_plain_step_and_a_warning(caplog):
    model = Net()
    opt = _lagged(model, trace_every=1)
    x, y = _batches(1)[0]
    import logging
    with caplog.at_level(logging.WARNING, logger="fip_fast"):
        for _ in range(3):
            opt.zero_grad()
            h = torch.tanh(F.linear(x, model.l1.weight, model.l1.bias))    # no nn.Module.__call__
            F.cross_entropy(F.linear(h, model.l2.weight, model.l2.bias) * model.scale, y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any("not applied" in r.message for r in caplog.records)
    del before


def test_hf_trainer_without_callback_saves_and_evaluates_unperturbed_weights():
    with tempfile.TemporaryDirectory() as d:
        transformers, model, opt, ds, args, _ = _hf_setup(d)
        seen = dict(step_end={}, eval={})

        class Spy(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                assert not opt.is_perturbed
                seen["step_end"][state.global_step] = [p.detach().clone() for p in model.parameters()]

            def on_evaluate(self, args, state, control, **kw):
                seen["eval"][state.global_step] = [p.detach().clone() for p in model.parameters()]

        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds[:8],
                                       optimizers=(opt, None), callbacks=[Spy()])
        trainer.train()
        assert sorted(seen["eval"]) == [2, 4]
        for step in (2, 4):
            for p, c in zip(seen["eval"][step], seen["step_end"][step]):
                assert torch.equal(p, c)
            ck = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(d, f"checkpoint-{step}"))
            for (n, p), c in zip(ck.named_parameters(), seen["step_end"][step]):
                assert torch.equal(p, c), n
        assert any(opt.state[p]["pert"].abs().sum() > 0 for p in model.parameters())   # step 4 stored e
        for p, c in zip(model.parameters(), seen["step_end"][4]):
            assert torch.equal(p.detach(), c)
