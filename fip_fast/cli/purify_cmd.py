"""``fip-fast purify``: purify a user's checkpoint with clean data — in one process, or data-parallel over the
processes of a torchrun launch (``--distributed ddp``) — then report and save the purified weights."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from fip_fast.cli.checks import (
    EXIT_NOT_SAVED,
    CLIError,
    accuracy_refusal,
    check_checkpoint_dir,
    check_out,
    check_purify_flags,
    check_save,
    device,
    divergence,
    lock_out,
    out_folder,
    parse_set,
)
from fip_fast.cli.inputs import PurifyInputs, purify_inputs
from fip_fast.cli.measure import lambda_max
from fip_fast.cli.render import (
    ModelOutput,
    Report,
    config,
    input_row,
    method_row,
    table,
    warn,
    warn_if_no_plots,
    write_outputs,
)

#: The environment a torchrun launch sets up (``--distributed`` refuses to run without it).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_CMD = "torchrun --nproc_per_node=N -m fip_fast.cli purify --distributed ddp ..."


@dataclass
class Rank:
    """This process in the run: its rank, the number of processes, its device; rank 0 reports and saves."""

    rank: int
    world: int
    device: Any
    distributed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------------------ torchrun
def _distributed_device(args: argparse.Namespace):
    """This rank's device: ``cpu`` for ``--device cpu``; ``cuda:LOCAL_RANK`` for ``--device cuda`` / ``auto`` on
    a CUDA machine."""
    import torch

    dev = device(args.device)
    local = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        if args.device not in ("cuda", "auto"):
            raise CLIError(f"--device {args.device}: with --distributed each rank uses cuda:LOCAL_RANK; pass "
                           "--device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise CLIError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise CLIError(f"--device {args.device} is not supported with --distributed (cpu, cuda or auto)")
    return dev


def init_distributed(args: argparse.Namespace):
    """``--distributed``: check the torchrun environment, initialize the process group, pick this rank's device.

    Returns the device: ``cpu`` (gloo) for ``--device cpu``; ``cuda:LOCAL_RANK`` (nccl) for ``--device cuda`` /
    ``auto`` on a CUDA machine."""
    if args.distributed == "fsdp":
        raise CLIError("--distributed fsdp is not supported by `fip-fast purify` (DDP only): the loop's clean-val "
                       "selection, evaluation and merge need the full weights.  Use --distributed ddp, or FSDP2 "
                       "through fip_fast.integrations.distributed as examples/torchrun_purify.py --parallel fsdp does")
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise CLIError(f"--distributed {args.distributed} needs the environment torchrun sets up ({', '.join(missing)} "
                       f"not set): launch with `{TORCHRUN_CMD}`, or drop --distributed for one process")
    if args.resume and not args.checkpoint_dir:
        raise CLIError("--resume needs --checkpoint-dir")
    dev = _distributed_device(args)
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        kw: Dict[str, Any] = dict(backend="nccl" if dev.type == "cuda" else "gloo",
                                  timeout=datetime.timedelta(seconds=args.dist_timeout))
        if dev.type == "cuda":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return dev


def cmd_purify(args: argparse.Namespace) -> int:
    check_purify_flags(args)          # before torchrun's process group exists: a usage error costs nothing
    if not getattr(args, "distributed", None):
        return _cmd_purify(args, None)
    dev = init_distributed(args)
    import torch.distributed as dist

    try:
        rc = _cmd_purify(args, dev)
        # Ranks > 0 return as soon as purify() does; rank 0 still measures, writes and saves.  Leave together,
        # so that no rank tears its connections down under another (gloo aborts on a closed peer).
        dist.barrier()
        return rc
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the run
def _rank(args: argparse.Namespace, dist_device) -> Rank:
    if dist_device is None:
        return Rank(0, 1, device(args.device), False)
    import torch.distributed as dist

    return Rank(dist.get_rank(), dist.get_world_size(), dist_device, True)


def _purify_outputs(args: argparse.Namespace, inputs: List[Path]) -> Tuple[Path, Path]:
    """--out, --save and --checkpoint-dir checked before any work (see :func:`check_out`, :func:`check_save`)."""
    out = out_folder(args)
    save_path = Path(args.save) if args.save else out / "purified.safetensors"
    if args.save:
        check_save(save_path, args.overwrite, inputs, out)
    check_out(out, args.overwrite, inputs)
    check_checkpoint_dir(args.checkpoint_dir)
    return out, save_path


def _metrics_fn(inp: PurifyInputs, target: Optional[int]) -> Optional[Callable]:
    """ACC on --test, ASR / RA on --triggered; None without either."""
    from fip_fast.evaluation import metrics

    test, trig = inp.test, inp.triggered
    if test is None and trig is None:
        return None

    def report_metrics(m) -> Dict[str, Any]:
        r: Dict[str, Any] = {}
        if test is not None:
            r["acc"] = metrics.accuracy(m, *test)
        if trig is not None:
            r["asr"] = metrics.attack_success_rate(m, *trig, target)
            r["ra"] = metrics.robust_accuracy(m, *trig, target)
        return r

    return report_metrics


def _run_purify(args: argparse.Namespace, model, clean, dev, progress: bool, eval_fn, distributed: bool):
    """:func:`fip_fast.pipeline.purify` with the CLI's options; its usage errors become one-line CLI errors."""
    from fip_fast.pipeline import ResumeMismatchError, purify

    kw = parse_set(args.set)
    for k in ("steps", "batch_size", "lr", "augment"):
        if getattr(args, k, None) is not None:
            kw[k] = getattr(args, k)
    if distributed:
        kw["distributed"] = "ddp"
    try:
        return purify(model, clean, method=args.method, eval_fn=eval_fn, eval_every=args.eval_every,
                      val_fraction=args.val_fraction, seed=args.seed, device=dev, progress=progress,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, retries=args.retries, **kw)
    except ResumeMismatchError as e:
        raise CLIError(f"--checkpoint-dir: {e}") from e
    except TypeError as e:
        raise CLIError(f"{'--augment' if 'augment=' in str(e) else '--set'}: {e}") from e
    except ValueError as e:
        if distributed and "distributed" in str(e):
            raise CLIError(f"--distributed: {e}") from e
        raise CLIError(f"purify: {e}") from e


#: ``--threads`` default: one torch thread below this many model parameters, torch's choice above.
SMALL_MODEL_PARAMS = 1_000_000


def set_threads(args: argparse.Namespace, model) -> None:
    """``--threads``: as given (0: torch's choice), or — by default — 1 for a model under
    :data:`SMALL_MODEL_PARAMS` parameters and torch's choice above.  A small model's ops are too small for
    intra-op threads to pay, and several threads per process oversubscribe a shared machine's cores (the example
    CNN of docs/own-model.md: see its "Threads" section).  ``args.threads`` becomes the count used (report.json)."""
    import torch

    if args.threads is None:
        args.threads = 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else 0
    if args.threads:
        torch.set_num_threads(args.threads)


def _cmd_purify(args: argparse.Namespace, dist_device) -> int:
    """``fip-fast purify``; ``dist_device`` is this rank's device under ``--distributed`` (else None).

    Under ``--distributed`` every rank loads the same checkpoint and data (every error is raised on every rank,
    before any collective), :func:`fip_fast.pipeline.purify` runs with ``distributed="ddp"``, and only rank 0
    measures the test metrics and λ_max, prints, writes the report folder and saves the weights.  A diverged
    result (:func:`fip_fast.cli.checks.divergence`) is reported but not saved, and the exit status is 3."""
    me = _rank(args, dist_device)
    if me.main:
        warn_if_no_plots()
    inp = purify_inputs(args, me.device)
    set_threads(args, inp.model)
    out, save_path = _purify_outputs(args, inp.paths)
    lock = lock_out(out) if me.main else None      # a second run into --out fails now, not after its work
    try:
        return _purify_and_report(args, me, inp, out, save_path)
    finally:
        if lock is not None:
            lock.release()


def _purify_and_report(args: argparse.Namespace, me: Rank, inp: PurifyInputs, out: Path, save_path: Path) -> int:
    """Measure the input model, purify, measure the result, print the table; rank 0 then reports and saves."""
    measure = _metrics_fn(inp, args.target)
    before = measure(inp.model) if measure is not None and me.main else {}
    x, y = inp.clean
    probe = (x[:args.lambda_batch].to(me.device), y[:args.lambda_batch].to(me.device))
    lam0 = lambda_max(inp.model, *probe, args.lambda_iters) if me.main else float("nan")
    model, rep = _run_purify(args, inp.model, inp.clean, me.device, not args.no_progress and me.main, measure,
                             me.distributed)
    if not me.main:                   # every rank holds the same purified model; rank 0 reports and saves it
        return 0
    diverged = divergence(model, rep)
    after = measure(model) if measure is not None and not diverged else {}
    lam = lambda_max(model, *probe, args.lambda_iters) if not diverged else float("nan")
    before_row = input_row("input", before, lam0, None, model)
    row = method_row(args.method, rep, after, lam, diverged)
    row["refused"] = diverged or accuracy_refusal(rep, args.accept_accuracy_drop)
    print(table([before_row, row]), flush=True)
    return _finish(args, me, inp, out, save_path, model, rep, before_row, row)


def _purify_report(args: argparse.Namespace, me: Rank, inp: PurifyInputs, save_path: Path, rep,
                   before_row: Dict[str, Any], row: Dict[str, Any]) -> Report:
    refused = row["refused"]
    payload = {"config": config(args), "before": before_row,
               "results": [row], "reports": {args.method: rep.to_dict()}, "diverged": row["diverged"],
               "refused": refused, "purified_weights": None if refused else str(save_path)}
    intro = [f"`fip-fast purify --method {args.method}` on `{args.checkpoint}` ({args.arch}), clean data "
             f"`{args.clean}` ({inp.clean[0].shape[0]} samples), {time.strftime('%Y-%m-%d')}"
             + (f", DDP over {me.world} processes ({me.device.type})" if me.distributed else "") + ".",
             "Test/triggered data were used for reporting only."]
    return Report(f"fip-fast purify: {args.method}", intro, before_row, [row], payload)


def _finish(args: argparse.Namespace, me: Rank, inp: PurifyInputs, out: Path, save_path: Path, model, rep,
            before_row: Dict[str, Any], row: Dict[str, Any]) -> int:
    """Rank 0: the warnings, the report folder and (unless refused: diverged, or clean accuracy fell more than
    the accepted drop) the purified weights; the exit status."""
    diverged, refused = row["diverged"], row["refused"]
    for w in rep.warnings:            # each shown once: when found (logged), or here beside the result
        warn(f"{args.method}: {w}", key=w)
    if rep.skipped_steps and not diverged:
        warn(f"{args.method}: {rep.skipped_steps} of {rep.steps_run} steps were skipped for non-finite gradients")
    report = _purify_report(args, me, inp, save_path, rep, before_row, row)
    model_out = None if refused else ModelOutput(save_path, model, {"method": args.method, "arch": str(args.arch)})
    write_outputs(out, inp.paths, report, model_out)
    if refused:
        why = f"purification diverged: {diverged}" if diverged else f"the result was not saved: {refused}"
        print(f"fip-fast: error: {why}; no purified model was written (report: {out}/)", file=sys.stderr)
        return EXIT_NOT_SAVED
    if not args.quiet:
        print(f"purified weights: {save_path}\nreport: {out}/", flush=True)
    return 0
