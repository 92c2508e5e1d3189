"""``fip_fast.pipeline``: the purification pipeline — one entry point for FIP, Fast FIP and the baselines.

::

    from fip_fast import purify
    model, report = purify(model, (x_clean, y_clean), method="fast_fip")   # or "fip", "ft", "ngf", …
    print(report.summary())

What :func:`purify` does for the built-in methods (``"fip"``, ``"fast_fip"``):

1. **Clean data.**  The clean set (a ``(x, y)`` pair of tensors, a ``Dataset`` or any iterable of ``(x, y)``
   batches — it is small by design, ≈1 % of the training data, and is materialized in memory once) is split,
   class-stratified and seeded, into a *purification* part and a *clean validation* part (``val_fraction``,
   default ``"auto"``: 0.2 when that part can resolve the selection margin — ≥ 334 clean samples at the default
   margin — and none below, where every sample trains and the last step is returned; or pass ``val_data=``).
   Mini-batches are drawn **with replacement** from the purification part
   (the authors' protocol: a fixed number of iterations sampled with replacement); batch ``t`` depends only on
   ``(seed, t)``, so a resumed run sees exactly the batches the uninterrupted one would have.
2. **F0** (only when the anchor is on, ``eta_r > 0``; the shipped defaults have it off — the fair protocol's
   development ablations found that it protects the trigger, ``bench/results/protocol_ablate.md``).  The diagonal
   empirical Fisher of the trainable parameters at θ0 on the purification part
   (:func:`fip_fast.estimate_fisher`, exact per-sample estimator, BatchNorm in eval mode), **normalized by its
   maximum** per parameter group, so that F0 ∈ [0, 1] and η_r ≈ 1 means the same on every model
   (docs/method.md "Stability": with SGD the anchor is stable while lr·η_r·max F0 < 2·(1+μ); max-normalization makes
   that lr·η_r < 3.9 at μ = 0.95, whatever the model).  Fast FIP normalizes the δ group and the group of biases /
   BatchNorm affine parameters separately: their raw Fisher magnitudes are on different scales.
3. **Optimizer.**  :class:`fip_fast.FIP` (SGD + momentum, suppressor ``"fd"`` by default with a closure, or
   ``trace_estimator="lagged"``).  Fast FIP first calls :func:`fip_fast.spectral_reference.reparameterize` with
   ``relative=True`` (s = S·(1+δ): δ is dimensionless, one step size fits every singular value) and lets the
   biases and BatchNorm affine parameters train beside δ (``fast_fip_extra="bias_bn"``, as the authors' layers
   leave them trainable), each group with its own learning rate and radius.
4. **Loop** of ``steps`` iterations with a tqdm bar; the learning rate of every group follows a cosine decay to 0
   over the run (``lr_schedule="cosine"``, default; ``"constant"`` keeps it) — a decaying rate lets clean
   accuracy recover at the end of a run whose early, large steps did the purifying.  With ``augment=`` (e.g.
   ``"shift"``: random shifts by up to round(H/8) pixels, zero fill; ``"shift_flip"`` adds left-right flips) the
   batch of step ``t`` is augmented with a generator of ``(seed, t)`` only — a resumed or DDP run sees the same
   views — while F0 and clean validation always use the unaugmented data (default: no augmentation).  Every
   ``eval_every`` steps the clean-validation loss and accuracy are measured, and ``eval_fn(model)`` (if given —
   e.g. test ACC/ASR) is called.  **eval_fn results go into the history only; nothing is ever selected on them.**
5. **Selection / early stopping on clean validation data only.**  Starting accuracy a0 = clean-val accuracy
   of θ0.  The returned weights are those of the *latest* evaluation whose clean-val accuracy is
   ≥ a0 − ``val_margin`` (default 0.03) — purification keeps pushing toward a flatter minimum, so the latest
   acceptable point is the most purified one; choosing the *best* clean accuracy instead would typically choose
   θ0 itself, backdoor included.  θ0 is never a candidate: if no evaluation is acceptable, the evaluation with
   the highest clean-val accuracy is returned (``report.history[i]["acceptable"]`` says which were).  If the
   accuracy stays below a0 − 2·``val_margin`` for ``patience`` consecutive evaluations, the loop stops early
   (the run is degrading clean behaviour); ``patience=0`` never stops — the default of fip and fast_fip,
   whose large early steps first cost clean accuracy that the cosine decay then recovers (measured on the
   demo: clean-val 78–89 % mid-run, 94–99 % at the end).
6. **Finish.**  A lagged perturbation is removed (the returned weights are unperturbed); Fast FIP merges
   W(δ) back (:func:`fip_fast.spectral_reference.merge`): the returned model is an ordinary model of the original
   architecture with no ``SpectralLayer`` left, in eval mode, with its ``requires_grad`` flags as they were.
7. **Checkpoint / resume.**  With ``checkpoint_dir=``, the loop state (model, optimizer, step, history,
   selection) is saved every ``checkpoint_every`` steps through :class:`fip_fast.io.Checkpointer` (atomic,
   weights-only); ``resume=True`` continues from the latest checkpoint of that directory.  Pass the *same*
   original model θ0 and data when resuming (the reparameterization and the batch sequence are recomputed from
   them; Fisher estimation is skipped — F0 and θ0 come back with the optimizer state).

The returned :class:`PurifyReport` holds the configuration, the history, timings, the clean-val metrics of θ0
and of the returned model, ``eval_fn`` of both, the number of trainable scalars and the selected step.

Method registry
---------------
Two kinds of plug-ins share the ``purify(model, clean, method=NAME, …)`` entry:

``kind="loop"`` — ``builder(model, ctx: MethodContext, **options) -> Purifier``
    The builder prepares the model (e.g. reparameterizes it) and returns a :class:`Purifier`, an object with
    ``step(x, y) -> loss``, ``params`` (the trainable tensors), ``optimizer`` (for checkpoints, may be None),
    ``unperturbed()`` (a context manager) and ``finalize(model) -> model``.  The method then gets everything
    above for free: sampling, periodic evaluation, clean-val selection, early stopping, checkpoints, resume.
    :class:`OptimizerPurifier` wraps any ``torch.optim.Optimizer`` (closure-based or not), so a baseline that is
    "some optimizer on the clean loss" is a few lines::

        from fip_fast.pipeline import register_method, OptimizerPurifier

        @register_method("my_ft", kind="loop", defaults={"lr": 0.01})
        def build_my_ft(model, ctx, lr):
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
            return OptimizerPurifier(model, opt, loss_fn=ctx.loss_fn)

``kind="runner"`` (the default) — ``fn(model, clean, steps=…, *, batch_size, seed, device, loss_fn, progress,
**options) -> (model, info_dict)``
    The calling convention of :mod:`fip_fast.baselines` (``run_ft``, ``run_ngf``, …): the runner does its own
    loop on the purification part of the clean data (a ``(x, y)`` pair).  :func:`purify` measures clean-val
    metrics and ``eval_fn`` before and after, times it and wraps ``info`` into the report (``report.extra``);
    periodic evaluation, selection and checkpoints are the runner's business.  ``steps``, ``lr`` and
    ``batch_size`` are passed only when given (``lr`` only if the runner accepts it), so each runner's own
    defaults apply otherwise; ``augment`` is passed when asked for (resolved by
    :func:`fip_fast.augment.make_augment`) — to a runner without an ``augment`` argument that is a TypeError.

``register_method(name, fn, kind=…, defaults=…, description=…, overwrite=False)`` registers (also usable as a
decorator); :func:`available_methods` lists the names.  The built-in methods and :mod:`fip_fast.baselines` are
lazy references in :mod:`fip_fast.pipeline.registry` (imported on their first lookup); plug-in packages register
through an entry point of the group ``"fip_fast.methods"`` (a callable, called with no arguments, that calls
``register_method``), loaded on the first lookup of an unknown name.

The parts
---------
``data`` (clean set, split, sampler, clean-val metrics) · ``registry`` (methods) · ``methods`` (FIP, Fast FIP,
:data:`DEFAULTS`) · ``purifier`` (:class:`Purifier`, :class:`OptimizerPurifier`, :class:`MethodContext`) ·
``options`` (defaults < user options) · ``evaluator`` (clean-val + eval_fn, timed) · ``selection`` (the clean-val
selection / early stop) · ``checkpoint`` (save / resume, fingerprints) · ``strategy`` (one process or DDP) ·
``loop`` (steps, lr schedule, evaluations, checkpoints) · ``report`` (:class:`PurifyReport`) · ``run``
(:func:`purify` wiring them, and the runner path).

Defaults (how they were chosen)
-------------------------------
The learning rate (``lr`` for fip, ``lr_delta`` for fast_fip) and the anchor (off) come from the fair protocol,
``bench/protocol.py``: on its *development* task every method's grid is run at the same budget and the strongest
setting whose mean clean accuracy stays within 2 points of the backdoored model's is frozen; the evaluation suite
(other seeds, targets and attacks) then measures it without further tuning
(``bench/results/protocol_eval.md``).  The protocol compares every method at 100 steps; the shipped step counts
(fip 300, fast_fip 150), the suppressor radius and the weight decay are the earlier clean-data choices of
``docs/demo.md``.  The universal perturbation (``universal_perturbation="auto"``, both methods; ours, beyond the
paper: :mod:`fip_fast.pipeline.holding`, docs/holding.md) was chosen on the development cells' ablations, where it
lowered ASR and the re-tuned ASR for about a point of clean accuracy.  Test ASR was never used to choose anything.
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fip_fast._utils import model_device
from fip_fast.augment import make_augment
from fip_fast.pipeline.checkpoint import ResumeMismatchError, open_checkpoint, theta0_fingerprint
from fip_fast.pipeline.data import CleanSplit, LossFn, data_warnings, split_clean
from fip_fast.pipeline.evaluator import EvalFn, Evaluator, RunnerEvals
from fip_fast.pipeline.guard import AccuracyGuard, checked_retries, learning_rates
from fip_fast.pipeline.loop import PurifyLoop, loop_plan
from fip_fast.pipeline.options import LoopOptions, loop_config, resolve_options
from fip_fast.pipeline.purifier import MethodContext, OptimizerPurifier, Purifier
from fip_fast.pipeline.registry import MethodSpec, available_methods, get_method, register_method
from fip_fast.pipeline.report import ACCURACY_DROP_LIMIT, RETRIES, PurifyReport, Retry, _jsonable
from fip_fast.pipeline.selection import Selection
from fip_fast.pipeline.strategy import SingleProcess, make_strategy, sync

logger = logging.getLogger("fip_fast")

__all__ = ["purify", "check_options", "PurifyReport", "Purifier", "OptimizerPurifier", "MethodContext", "MethodSpec",
           "register_method", "available_methods", "get_method", "ResumeMismatchError", "_jsonable"]


def purify(model: nn.Module, clean_loader: Any, method: str = "fast_fip", steps: Optional[int] = None, *,
           eval_fn: Optional[EvalFn] = None, eval_every: Optional[int] = None, val_data: Any = None,
           val_fraction: Optional[Union[float, str]] = None, val_margin: Optional[float] = None,
           patience: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
           seed: int = 0, device: Optional[Union[str, torch.device]] = None, loss_fn: Optional[LossFn] = None,
           progress: bool = True, checkpoint_dir: Optional[str] = None, checkpoint_every: int = 50,
           resume: bool = False, distributed: Optional[str] = None, augment: Any = None,
           max_accuracy_drop: float = ACCURACY_DROP_LIMIT, retries: int = RETRIES,
           **options: Any) -> Tuple[nn.Module, PurifyReport]:
    """Purify ``model`` of a backdoor using the small clean set ``clean_loader``; return ``(model, report)``.

    Args:
        model: the suspected model θ0 (modified in place and returned; for Fast FIP its layers are
            reparameterized during the run and merged back at the end).
        clean_loader: the defender's clean data — ``(x, y)`` tensors, a ``Dataset`` or an iterable of batches.
        method: ``"fast_fip"`` (default), ``"fip"`` or any registered name (:func:`available_methods`).
        steps: optimizer steps (default: the method's, see :data:`DEFAULTS`).
        eval_fn: ``eval_fn(model) -> dict`` called every ``eval_every`` steps and on θ0 and the result; its
            results are recorded in ``report.history`` / ``initial`` / ``final`` only — never used for selection.
        eval_every: steps between evaluations (default: ``steps // 10``, at least 1).
        val_data: explicit clean validation data; default: hold out ``val_fraction`` of ``clean_loader``,
            class-stratified — ``"auto"`` (default): 0.2 when that part resolves ``val_margin`` (at least two
            samples wide: ≥ 334 clean samples at 0.03), else none
            (:func:`fip_fast.pipeline.data.resolve_val_fraction`; ``report.warnings`` says so).
            ``val_fraction=0`` disables validation (the last step is returned).
        val_margin: selection tolerance on clean-val accuracy (default 0.03); ``patience``: evaluations below
            a0 − 2·val_margin before stopping early (default: the method's — 0, never, for fip and
            fast_fip, whose cosine runs dip in clean accuracy mid-run and recover; 3 otherwise).
        batch_size: overrides the method's default.
        lr: overrides the method's default.
        seed: batch sampling (and runner) seed.
        device: where to purify (default: the model's device); data are moved per batch.
        loss_fn: ``loss_fn(output, y) -> scalar`` (default mean cross-entropy).  progress: tqdm bar.
        checkpoint_dir: folder of the periodic checkpoints (``kind="loop"`` methods).
        checkpoint_every: steps between checkpoints.
        resume: continue from the latest checkpoint of ``checkpoint_dir`` (see "Checkpoint / resume" above).
        augment: augmentation of the training batches (:func:`fip_fast.augment.make_augment`): ``"none"``,
            ``"shift"``, ``"shift_flip"``, an :class:`fip_fast.augment.Augment` or a callable ``(x, generator) ->
            x``; None: the method's default (none for every built-in method).  Loop methods augment batch ``t``
            with a generator of ``(seed, t)`` (F0 and clean validation stay unaugmented); a runner gets it as its
            ``augment=`` argument — a runner without one raises TypeError.  Recorded as ``config["augment"]``.
        distributed: ``None`` (one process) or ``"ddp"``: data-parallel purification over the ranks of an
            initialized default process group (``torchrun`` +
            :func:`fip_fast.integrations.distributed.init_from_env`), see
            "Distributed purification" below.  ``"fsdp"`` is refused (not implemented in ``purify``: use
            :mod:`fip_fast.integrations.distributed` directly, as ``examples/torchrun_purify.py --parallel fsdp`` does).
        max_accuracy_drop: the clean-accuracy loss (a fraction, default 0.10 = 10 points) beyond which the result
            is flagged: clean accuracy is measured on θ0 and on the returned model, on the clean-validation part
            when there is one, else on the purification part itself (``report.accuracy``, an
            :class:`~fip_fast.pipeline.report.AccuracyCheck`); a larger drop adds a warning to
            ``report.warnings`` (and the log).  The model is returned either way; ``fip-fast purify`` refuses to
            save it.
        retries: how many times a run whose clean accuracy fell by more than ``max_accuracy_drop`` is run again,
            from θ0, at half the learning rates of the try before (the options ``lr`` and ``lr_delta`` it names:
            FIP's and Fast FIP's, or a method called with ``lr=…``); default :data:`RETRIES`.  Each abandoned try
            is recorded in ``report.retries`` (a :class:`~fip_fast.pipeline.report.Retry`) and logged, and
            ``report.config`` holds the rates of the try returned.  θ0 is kept in host memory for this (one copy of
            the model's state); ``retries=0`` keeps no copy.  Off (0) with ``checkpoint_dir`` (the tries would share
            its checkpoints) and under ``distributed``.
        **options: method options, e.g. ``eta_F``, ``eta_r``, ``rho``, ``trace_estimator``, ``lr_delta``,
            ``rho_delta`` for FIP / Fast FIP (see :data:`DEFAULTS`), or a runner's own keyword arguments.

    Distributed purification (``distributed="ddp"``, ``kind="loop"`` methods only)
        Call it on every rank with the same model θ0, the same clean data and the same arguments.  It computes
        what the single-process call computes on the same global batches:

        * **F0**: each rank estimates the Fisher on its contiguous share of the purification part
          (:meth:`MethodContext.fisher_loader`); :func:`fip_fast.estimate_fisher` all-reduces sums and counts.
        * **Model**: after the method's builder has prepared it (Fast FIP: reparameterized, δ created) the
          training forward runs through ``DistributedDataParallel``
          (:func:`fip_fast.integrations.distributed.wrap_ddp`),
          which averages the gradients inside ``backward()`` — also in the second (perturbed) pass of the fd
          suppressor.  The FIP step then does identical arithmetic on identical numbers on every rank.
        * **Batches**: step ``t`` draws ONE global batch of ``batch_size`` indices from ``(seed, t)`` — the
          same on every rank — and rank r runs its contiguous slice of ``batch_size / world_size`` samples, so
          the averaged gradient is the global-batch gradient.  ``batch_size`` must be divisible by the world size.
        * **Validation / selection**: each rank evaluates its slice of the clean validation set and the sums
          are all-reduced, so every rank sees the same clean-val metrics and takes the same selection and
          early-stopping decisions; ``eval_fn`` runs on rank 0 only and its result is broadcast.  Every rank
          returns the same model and an identical report.
        * **BatchNorm**: on CUDA every BatchNorm is temporarily converted to ``nn.SyncBatchNorm`` (global-batch
          statistics, exact), and converted back at the end.  On CPU torch has no SyncBatchNorm: each rank
          normalizes with its *local* slice's statistics (the gradient then differs from a single-process run)
          and the running statistics are averaged over ranks before every evaluation; this is logged as a
          warning and recorded as ``report.config["batchnorm"] = "local"``.  Models without BatchNorm (or
          on CUDA) match the single-process run within float tolerance (``tests/test_distributed_purify.py``).
        * **Checkpoints**: rank 0 writes them (``checkpoint_dir`` must be visible to every rank, e.g. one
          node); all ranks resume from the same file.  The progress bar shows on rank 0 only.
    """
    t_total = time.perf_counter()
    spec = get_method(method)
    dev = torch.device(device) if device is not None else model_device(model)
    strategy = make_strategy(distributed, spec.kind, spec.name, dev)
    progress = bool(progress) and strategy.is_main
    # θ0's fingerprint, before anything touches the model: a resumed run must continue the same purification.
    theta0 = theta0_fingerprint(model) if checkpoint_dir is not None else ""
    model.to(dev)
    loss_fn = loss_fn or F.cross_entropy
    opts, loop_opts = resolve_options(spec, steps=steps, batch_size=batch_size, lr=lr, options=options,
                                      val_fraction=val_fraction, val_margin=val_margin, patience=patience,
                                      eval_every=eval_every, augment=augment)
    data = split_clean(clean_loader, val_data, loop_opts.val_fraction, seed, loop_opts.val_margin)
    augment_fn = make_augment(loop_opts.augment, data.x_train[0])      # checked before any work
    retries = checked_retries(retries, opts, checkpoint_dir, distributed)
    saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if retries else None
    val_requested = val_data is not None or bool(loop_opts.val_fraction)

    def run_once(model: nn.Module, opts: Dict[str, Any], log_warnings: bool) -> Tuple[nn.Module, PurifyReport]:
        """One try on the model as it is: its own report, evaluator (so its timings) and accuracy check."""
        opts = dict(opts)       # the run takes steps and batch_size out of its copy (loop_plan)
        report = _start_report(spec, model, data, opts, loop_opts, augment_fn, seed=seed, device=dev,
                               strategy=strategy, val_requested=val_requested, log_warnings=log_warnings)
        evaluator = Evaluator(data, loss_fn, dev, eval_fn, strategy)
        report.initial = evaluator(model)
        guard = AccuracyGuard(model, data, loss_fn, dev, strategy, float(max_accuracy_drop), report.initial)
        if spec.kind == "runner":
            return guard.check(*_run_runner(spec, model, data, opts, report, evaluator, seed=seed, progress=progress,
                                            t_total=t_total, augment=(loop_opts.augment, augment_fn),
                                            eval_every=loop_opts.eval_every))
        return guard.check(_run_loop(spec, model, data, opts, loop_opts, augment_fn, report, evaluator, seed=seed,
                                     progress=progress, t_total=t_total, checkpoint_dir=checkpoint_dir,
                                     checkpoint_every=checkpoint_every, resume=resume, theta0=theta0), report)

    abandoned: List[Retry] = []
    while True:
        model, report = run_once(model, opts, log_warnings=not abandoned)
        report.retries = abandoned
        if len(abandoned) == retries or report.accuracy is None or not report.accuracy.exceeded:
            return model, report
        abandoned.append(Retry(learning_rates(opts), report.accuracy))
        opts = {**opts, **{k: 0.5 * v for k, v in abandoned[-1].lrs.items()}}
        if strategy.is_main:
            logger.warning("fip_fast.pipeline: %s: purifying again from θ0 at half the learning rate (%s)",
                           report.accuracy.describe(), ", ".join(f"{k}={v:g}" for k, v in learning_rates(opts).items()))
        model.load_state_dict(saved)


def _start_report(spec: MethodSpec, model: nn.Module, data: CleanSplit, opts: Dict[str, Any], loop_opts: LoopOptions,
                  augment_fn: Any, *, seed: int, device: torch.device, strategy: SingleProcess,
                  val_requested: bool, log_warnings: bool = True) -> PurifyReport:
    """The report of a run: its configuration (recorded after ``strategy.configure`` has adapted the model, e.g.
    SyncBatchNorm, and noted its choices in it), the parameter count and the clean data's warnings (logged on the
    main rank)."""
    config = {"method": spec.name, "kind": spec.kind, **opts, **loop_config(loop_opts, augment_fn), "seed": seed,
              "device": str(device), "n_clean_train": int(data.x_train.shape[0]),
              "n_clean_val": int(data.x_val.shape[0])}
    strategy.configure(model, opts.get("batch_size"), config)
    report = PurifyReport(method=spec.name, config=config, total_params=sum(p.numel() for p in model.parameters()))
    report.warnings = data_warnings(data, opts.get("batch_size"), val_requested, loop_opts.val_fraction)
    for w in report.warnings if strategy.is_main and log_warnings else ():
        logger.warning("fip_fast.pipeline: %s", w)
    return report


def _run_loop(spec: MethodSpec, model: nn.Module, data: CleanSplit, opts: Dict[str, Any], loop_opts: LoopOptions,
              augment_fn: Any, report: PurifyReport, evaluator: Evaluator, *, seed: int, progress: bool,
              t_total: float, checkpoint_dir: Optional[str], checkpoint_every: int, resume: bool,
              theta0: str) -> nn.Module:
    """Run a ``kind="loop"`` method: open (or resume from) the checkpoints, build its :class:`Purifier`, run the
    :class:`PurifyLoop` with the clean-val :class:`Selection`; returns the finished model (``report`` filled in)."""
    strategy, dev = evaluator.strategy, evaluator.device
    plan = loop_plan(opts, loop_opts, seed, augment_fn)      # takes steps and batch_size out of the method options
    report.config["eval_every"] = plan.eval_every
    ckpt, resuming = open_checkpoint(checkpoint_dir, checkpoint_every, resume, spec.name, theta0, report.config,
                                     data.tensors())
    if ckpt is not None:
        resuming = bool(strategy.broadcast(resuming))
    ctx = MethodContext(data.x_train, data.y_train, dev, evaluator.loss_fn, seed, progress, resuming=resuming,
                        rank=strategy.rank, world_size=strategy.world)
    purifier = _build_purifier(spec, model, ctx, opts, strategy, report)
    selection = Selection(report.initial.get("val_acc", float("nan")), float(loop_opts.val_margin),
                          int(loop_opts.patience), data.has_val)
    loop = PurifyLoop(spec.name, model, purifier, data, plan, selection, evaluator, report, strategy=strategy,
                       checkpoint=ckpt, device=dev, progress=progress, t_total=t_total)
    if resuming:
        loop.resume()
    loop.run()
    return loop.finish()


def _probe_model() -> nn.Module:
    """A tiny model with the layer kinds the built-in methods handle (conv, BatchNorm, linear), for
    :func:`check_options`'s dry run."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 3))


#: purify()'s keyword-only arguments (not method options).
_PURIFY_KEYWORDS = frozenset(k for k, p in inspect.signature(purify).parameters.items() if p.kind is p.KEYWORD_ONLY)


def check_options(method: str = "fast_fip", *, steps: Optional[int] = None, batch_size: Optional[int] = None,
                  lr: Optional[float] = None, augment: Any = None, val_fraction: Any = None,
                  **options: Any) -> None:
    """Judge ``method``'s options — their names and their combinations — before any data are loaded: raise the
    ValueError / TypeError that :func:`purify` would raise only after loading the data and the model.

    A ``kind="loop"`` method's builder runs once on a tiny probe model (conv + BatchNorm + linear, 1×8×8 inputs,
    a few random samples), so every check it makes (e.g. Fast FIP's ``delta_optimizer='sgd'`` supports
    ``trace_estimator='fd'`` only) fires here; a runner's option names are checked against its signature.
    Options that depend on the user's model (``layer_types``, ``rank`` beyond the probe's layers) are not
    judged here."""
    spec = get_method(method)
    options = dict(options)
    # purify()'s own keyword arguments (val_margin, patience, …) may come in ``options`` too (the CLI's --set).
    own = {k: options.pop(k) for k in list(options) if k in _PURIFY_KEYWORDS}
    given = {"batch_size": batch_size, "lr": lr, "val_fraction": val_fraction, "augment": augment}
    kw = {k: own.get(k) if v is None else v for k, v in given.items()}
    opts, loop_opts = resolve_options(spec, steps=steps, options=options, val_margin=own.get("val_margin"),
                                      patience=own.get("patience"), eval_every=own.get("eval_every"), **kw)
    make_augment(loop_opts.augment, torch.zeros(1, 1, 8, 8))
    if spec.kind == "runner":
        params = inspect.signature(spec.fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(k for k in opts if k not in params and k != "lr")
            if unknown:
                raise TypeError(f"method {spec.name!r} does not accept option(s) {unknown}")
        return
    loop_plan(opts, loop_opts, 0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.arange(6) % 3
    ctx = MethodContext(x, y, torch.device("cpu"), F.cross_entropy, 0, False)
    _build_purifier(spec, _probe_model(), ctx, opts, SingleProcess(), PurifyReport(spec.name, {}))


def _build_purifier(spec: MethodSpec, model: nn.Module, ctx: MethodContext, opts: Dict[str, Any],
                    strategy: SingleProcess, report: PurifyReport) -> Purifier:
    """Call the method's builder (options checked against its signature), attach the strategy; times ``setup``."""
    sync(ctx.device)
    t0 = time.perf_counter()
    sig = inspect.signature(spec.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
        unknown = [k for k in opts if k not in sig]
        if unknown:
            raise TypeError(f"method {spec.name!r} does not accept option(s) {unknown}")
    purifier: Purifier = spec.fn(model, ctx, **opts)
    strategy.attach(model, purifier)
    sync(ctx.device)
    report.timings["setup"] = time.perf_counter() - t0
    # a masked parameter (Fast FIP's mixing band) says how many of its entries train
    report.trainable_params = int(sum(getattr(p, "trainable_entries", p.numel()) for p in purifier.params))
    return purifier


def _runner_evals(params: Any, kw: Dict[str, Any], model: nn.Module, evaluator: Evaluator,
                  eval_every: Optional[int], t_total: float) -> Optional[RunnerEvals]:
    """The runner's :class:`RunnerEvals` when its signature names ``on_step`` (not merely ``**kwargs``, which
    may pass it on to something that refuses it) and its step count is known; else None."""
    if "on_step" not in params or kw.get("on_step") is not None:      # the caller's own hook wins
        return None
    steps = kw.get("steps", params["steps"].default if "steps" in params else None)
    if not isinstance(steps, int) or steps < 1:
        return None
    return RunnerEvals(model, evaluator, int(eval_every or max(1, steps // 10)), steps, t_total)


def _run_runner(spec: MethodSpec, model: nn.Module, data: CleanSplit, opts: Dict[str, Any], report: PurifyReport,
                evaluator: Evaluator, *, seed: int, progress: bool, t_total: float,
                augment: Tuple[Any, Any] = (None, None), eval_every: Optional[int] = None
                ) -> Tuple[nn.Module, PurifyReport]:
    """Run a ``kind="runner"`` method (the :mod:`fip_fast.baselines` convention) and wrap its info.
    ``augment``: (the requested spelling, its resolved augmentation).  A runner with an ``on_step`` argument is
    evaluated every ``eval_every`` steps on the way (:class:`RunnerEvals`), like a loop method."""
    params = inspect.signature(spec.fn).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kw = dict(opts)
    common = dict(seed=seed, device=evaluator.device, loss_fn=evaluator.loss_fn, progress=progress)
    kw.update({k: v for k, v in common.items() if var_kw or k in params})
    if "lr" in kw and not (var_kw or "lr" in params):
        kw.pop("lr")
    if augment[0] is not None:          # asked for (explicitly or by the method's defaults): passed on, never dropped
        if var_kw or "augment" in params:
            kw["augment"] = augment[1]
        elif augment[1] is not None:
            raise TypeError(f"method {spec.name!r} does not accept augment= (its runner {spec.fn.__qualname__} has "
                            "no 'augment' argument): pass augment='none' or add augment to the runner")
    evals = _runner_evals(params, kw, model, evaluator, eval_every, t_total)
    if evals is not None:
        kw["on_step"] = evals
        report.config["eval_every"] = evals.every
    sync(evaluator.device)
    t0 = time.perf_counter()
    out = spec.fn(model, (data.x_train, data.y_train), **kw)
    sync(evaluator.device)
    report.timings["loop"] = time.perf_counter() - t0 - (evals.seconds if evals is not None else 0.0)
    model, info = out if isinstance(out, tuple) else (out, {})
    info = dict(info or {})
    report.extra.update(info)
    report.steps_run = int(info.get("steps", kw.get("steps", 0)) or 0)
    report.selected_step = report.steps_run
    report.trainable_params = int(info.get("trainable_params", 0) or 0)
    report.skipped_steps = int(info.get("skipped_steps", 0) or 0)
    model.eval()
    report.final = evaluator(model)
    # The evaluations on the way (a runner with on_step), then one record of the returned model at its last step,
    # so that the history (and the report's curves, which start at θ0 = report.initial) shows the result too.
    losses = [v for v in (info.get("loss_history") or []) if isinstance(v, (int, float))]
    last_loss = evals.pop_loss() if evals is not None else float(losses[-1]) if losses else float("nan")
    report.history = (evals.records if evals is not None else []) + [
        {"step": report.steps_run, "train_loss": last_loss, **report.final, "acceptable": True}]
    report.timings["eval"] = evaluator.seconds
    report.timings["total"] = time.perf_counter() - t_total
    return model, report
