"""The fair protocol: every defense tuned the same way on a development task, then frozen on an evaluation suite.

::

    python -m bench protocol dev            # grid of every method on the development cells, then the choice
    python -m bench protocol eval           # the frozen choices on the evaluation suite
    python -m bench protocol eval --quick   # a 4-cell subset
    python -m bench protocol holding        # FIP's choice with each holding mechanism (docs/holding.md), dev cells
    python -m bench protocol heldout        # the frozen choices on held-out data (digits on colour textures)
    python -m bench protocol report         # JSON -> markdown (also written after every stage)

**Development task** (``DEV_CELLS``): both architectures × the attacks ``badnets`` and ``blend`` at seed 100,
target class 5, 10 % poison, the 10 % clean set (``DEV_TINY_CELLS``: the same with the 2 % clean set, for our
methods' ablations only).  No evaluation cell shares its seed (split, trigger pattern,
poisoned samples, model initialization) or its target, and three of the five evaluation attacks (``sig``,
``trojan``, ``wanet``) never appear in it: the suite's *unseen* attacks are the held-out check of generalization.

**Grids.**  Every method has a grid of the same size (:data:`GRIDS`, six configurations), a path along its own
purification pressure (the knob its paper turns: the learning rate of fine-tuning, FST's α, SAM's ρ, …), weakest
first.  All runs get the same budget: :data:`STEPS` steps of batch :data:`BATCH`, through
:func:`fip_fast.pipeline.purify` (which holds out 20 % of the clean set for its own clean validation).

**The rule** (the same for every method, clean data only): the strongest configuration whose mean clean test
accuracy over the development cells stays within :data:`ACC_MARGIN` of the backdoored models' mean — i.e. the
most purification pressure a defender can afford.  ASR on the development cells is recorded and reported, never
used by the rule.  The chosen configurations are frozen in ``protocol_dev.json`` and used unchanged on every
evaluation cell.

**Evaluation suite** (``EVAL_CELLS``): 5 attacks × seeds 0 1 2 × 2 architectures × clean sets of 2 % and 10 % of
the training pool × poison rates 5 % and 10 % = 120 cells.  Per run: clean test ACC, ASR, RA, wall time of the
purification, the re-tuning attack's ASR (:class:`bench.protocol_tasks.Retune`; the benign model's under the same
attack is reported per cell) and the milder one's (PAM's, :class:`bench.protocol_tasks.MildRetune`), and λ_max
for the cells of seed 0 with the 10 % clean set and 10 % poison.  A cell
whose backdoored model has ASR < 50 % (the attack failed to implant) is reported and left out of the means.

**Held-out data** (``HELDOUT_CELLS``): the suite's attacks, architectures and clean-set sizes at 10 % poison, seeds
0 and 1, on data that no choice or default has seen: the same digits blended onto procedural colour textures
(:func:`fip_fast.evaluation.data.mnist_on_textures`, three channels, MNIST-M-like).  The frozen choices run there
unchanged; nothing is selected on it.

Resumable: every finished run is written to the JSON at once, and a run that is already there (same
configuration fingerprint) is skipped.  ``--jobs N`` runs N processes of one thread each.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.protocol_ablations import ABLATIONS, HOLDING_ABLATIONS, SEED_OFFSET, TINY_ABLATIONS
from bench.protocol_tasks import (
    ARCHS,
    ATTACKS,
    TRAIN_EPOCHS,
    Cell,
    MildRetune,
    Retune,
    config_fingerprint,
    default_cache,
)

ROOT = Path(__file__).resolve().parent / "results"
STEPS, BATCH = 100, 64
ACC_MARGIN = 0.02
METHODS = ("fip", "fast_fip", "ft", "superft", "fst", "sau", "ft_sam")
SEEN_ATTACKS = ("badnets", "blend")

#: The universal perturbation of FIP's and Fast FIP's grids (the option's defaults, named in full so the run keys
#: say what ran).
#: Its bound calibrated from the data (``calibrate`` 0.5, the option's default since the held-out data: on the
#: development cells it keeps 0.2, so those runs are the uncalibrated ones bit for bit; docs/holding.md).
_UP = dict(eps=0.2, fraction=0.5, gradient="separate", schedule="lr", calibrate=0.5)
#: ... with the distillation and augmentation of the rebuild (the options' defaults; docs/holding.md)
_HOLD = dict(universal_perturbation=_UP, distill=dict(weight=1.0, temperature=2.0, schedule="late"), augment="auto")
#: ... Fast FIP's: the perturbed share constant through the rebuild (protocol_holding.md: lower ASR and re-tuned ASR
#: than the share following the lr, at the same accuracy, on the development cells)
_HOLD_FAST = dict(_HOLD, universal_perturbation=dict(_UP, schedule="constant"))
#: ... FIP's: the patch surrogate beside δ (budget 0.02) with weight decay 0.02 instead of the recipe's 0.03
#: (protocol_holding.md, three purification seeds: better than without on every pooled measure)
_HOLD_FIP = dict(_HOLD, universal_perturbation=dict(_UP, patch=0.02), weight_decay=0.02)

#: Each method's grid: a path along its purification pressure, weakest first (same size for every method).
GRIDS: Dict[str, List[dict]] = {
    # FIP and Fast FIP without the anchor (eta_r 0): the development ablations (protocol_ablate.md) found that
    # the anchor protects the trigger (development ASR 10 % with it, 4 % without, at equal ACC).
    # FIP with a one-cycle schedule (warm-up, then cosine; 2026-12-02): on the development ablations it kept the
    # accuracy of the cosine schedule at lower ASR and re-tuned ASR (protocol_ablate.md, "fip, no anchor, onecycle").
    # With the universal perturbation (docs/holding.md; 2026-12-07): the holding ablations on the development cells
    # (protocol_holding.md) found it the one mechanism that lowers ASR and both re-tuned ASRs at about the same
    # clean accuracy, for 1.3–1.5× the loop time; its eval-mode "separate" gradient lost less accuracy than "shared",
    # and its share following the learning rate ("lr" schedule) one point less with the 2 % clean set.
    # With the starting model distilled into the rebuild as the learning rate decays, on clean batches shifted by
    # up to H/16 pixels (docs/holding.md, "Where the accuracy goes"; 2026-12-07): the development cells lost
    # 2.2 points instead of 4.8 with the 2 % clean set and 0.7 instead of 1.6 with the 10 % set.
    # With the patch surrogate beside δ and weight decay 0.02 (docs/holding.md, "The patch with less weight decay";
    # 2026-12-07): on the development cells, three purification seeds, more accuracy (also on the 2 % clean set),
    # lower ASR and re-tuned ASRs than without; the rule kept lr 0.05 with them (with weight decay 0.01 and patch
    # 0.04 it took lr 0.1, which cost the 2 % cells 6.5 points there and 5.4 on the suite: not kept).
    "fip": [dict(lr=v, eta_r=0.0, lr_schedule="onecycle", **_HOLD_FIP) for v in (0.02, 0.05, 0.08, 0.1, 0.15, 0.2)],
    # Fast FIP as SVFT-style spectral fine-tuning (ours): clipped SGD on δ plus a band of 8 trainable
    # off-diagonal core entries per layer (U, V mix inside the top-k subspace).  The development ablations
    # (protocol_ablate.md, docs/fast_fip_variants.md) found that δ alone purifies only by collapsing singular
    # values (lr_delta ≥ 1: ACC 57 ± 44 %); the path here is that variant's lr_delta.
    "fast_fip": [dict(lr_delta=v, delta_optimizer="sgd", clip_norm=0.3, mix_band=8, eta_r=0.0, **_HOLD_FAST)
                 for v in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)],
    "ft": [dict(lr=v) for v in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)],
    "superft": [dict(lr=v) for v in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4)],
    "fst": [dict(lr=lr, alpha=a) for lr, a in ((0.01, 0.05), (0.01, 0.1), (0.01, 0.2), (0.02, 0.2), (0.05, 0.2),
                                               (0.1, 0.2))],
    # SAU at two PGD steps (the authors use five): its cost is ≈ (2·pgd_steps + 2) fine-tuning steps per step.
    "sau": [dict(lr=v, pgd_steps=2) for v in (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2)],
    "ft_sam": [dict(lr=v) for v in (0.002, 0.005, 0.01, 0.02, 0.03, 0.05)],
}


DEV_CELLS = [Cell(a, atk, 100, 0.1, 0.1, target=5) for a, atk in product(ARCHS, SEEN_ATTACKS)]
DEV_TINY_CELLS = [Cell(a, atk, 100, 0.02, 0.1, target=5) for a, atk in product(ARCHS, SEEN_ATTACKS)]
EVAL_CELLS = [Cell(a, atk, s, c, p) for a, atk, s, c, p in product(ARCHS, ATTACKS, (0, 1, 2), (0.02, 0.1),
                                                                      (0.05, 0.1))]
HELDOUT_CELLS = [Cell(a, atk, s, c, 0.1, data="textures") for a, atk, s, c in product(ARCHS, ATTACKS, (0, 1),
                                                                                     (0.02, 0.1))]
QUICK_CELLS = [Cell(a, atk, 0, 0.1, 0.1) for a, atk in product(ARCHS, ("badnets", "wanet"))]
RETUNE = Retune()
#: PAM's milder re-tuning attack, reported beside :data:`RETUNE` (``retune_mild_asr``; not in the stage
#: fingerprint, so the runs made before it stay valid and show '–' there).
RETUNE_MILD = MildRetune()


# --------------------------------------------------------------------------------------------------- one run
def _lambda_cell(cell: Cell) -> bool:
    return cell.seed == 0 and cell.clean == 0.1 and cell.poison == 0.1


def _one_thread() -> None:
    """Worker initializer: one thread per process (N processes share N cores without oversubscription)."""
    import torch

    torch.set_num_threads(1)


def run_one(cell: Cell, method: Optional[str], cfg: dict, cache: str) -> dict:
    """Purify the cell's backdoored model with ``method`` at ``cfg`` (``method=None``: measure the backdoored
    and the benign model) and return the measurements.  Runs in a worker process (:func:`_one_thread`)."""
    from bench.protocol_tasks import benign_model, build_task, measure, model_digest, retune_asr, retune_mild_asr
    from fip_fast.pipeline import purify

    task = build_task(cell, Path(cache))
    lam = _lambda_cell(cell)
    digest = model_digest(task.model)
    if method is None:
        out = measure(task.model, task, lam=lam)
        out["model_sha"] = digest
        out["retune_asr"] = retune_asr(task.model, task, RETUNE)
        out["retune_mild_asr"] = retune_mild_asr(task.model, task, RETUNE_MILD)
        benign = benign_model(cell, Path(cache))
        out["benign"] = {**measure(benign, task), "retune_asr": retune_asr(benign, task, RETUNE),
                         "retune_mild_asr": retune_mild_asr(benign, task, RETUNE_MILD)}
        return out
    t0 = time.perf_counter()
    cfg = dict(cfg)
    seed = cell.seed + cfg.pop(SEED_OFFSET, 0)      # a bench-only key: the same cell, another purification seed
    retries = cfg.pop("retries", 0)     # 0: every method runs once, at the budget (bench/retries.py: more)
    model, rep = purify(task.model, task.clean, method=method, steps=STEPS, batch_size=BATCH, seed=seed,
                        progress=False, retries=retries, **cfg)
    wall = rep.timings.get("loop", time.perf_counter() - t0) + rep.timings.get("setup", 0.0)
    out = measure(model, task, lam=lam)
    out.update(model_sha=digest, wall_s=wall, val_acc0=rep.initial.get("val_acc"), val_acc=rep.final.get("val_acc"),
               selected_step=rep.selected_step, retune_asr=retune_asr(model, task, RETUNE),
               retune_mild_asr=retune_mild_asr(model, task, RETUNE_MILD),
               # what actually ran, the method's DEFAULTS included: runs are keyed by the options named in the
               # grid, so this is how a run made under older defaults can be told apart
               config=rep.config, retries=[{"lrs": r.lrs, "drop": r.accuracy.drop} for r in rep.retries])
    return out


# --------------------------------------------------------------------------------------------------- the JSON
def _open(path: Path, config: dict, fresh: bool) -> dict:
    if path.exists() and not fresh:
        doc = json.loads(path.read_text())
        if doc.get("fingerprint") != config_fingerprint(config):
            raise SystemExit(f"{path} was written with another configuration; pass --fresh to discard it, or "
                             "--out to write elsewhere")
        return doc
    return {"fingerprint": config_fingerprint(config), "config": config, "runs": {}}


def _save(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "cores": os.cpu_count()}
    doc["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)


def run_key(cell: Cell, method: Optional[str], cfg: dict) -> str:
    return f"{cell.key}|{method or 'before'}|{json.dumps(cfg, sort_keys=True)}"


def _execute(doc: dict, path: Path, jobs: List[Tuple[Cell, Optional[str], dict]], n_proc: int, cache: Path,
             budget_s: Optional[float]) -> None:
    """Run the ``jobs`` not yet in ``doc['runs']`` (in ``n_proc`` processes), saving after each one."""
    todo = [j for j in jobs if run_key(*j) not in doc["runs"]]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to go", flush=True)
    t0 = time.perf_counter()
    # Seed by seed (an interrupted suite holds whole seeds), and within a seed the "before" measurements first:
    # they train the backdoored models, which the methods then find cached.
    batches = [[j for j in todo if j[0].seed == s and (j[1] is None) == before]
               for s in sorted({j[0].seed for j in todo}) for before in (True, False)]
    for batch in (b for b in batches if b):
        with ProcessPoolExecutor(max_workers=n_proc, initializer=_one_thread) as pool:
            futs = {pool.submit(run_one, c, m, cfg, str(cache)): (c, m, cfg) for c, m, cfg in batch}
            for i, f in enumerate(as_completed(futs)):
                c, m, cfg = futs[f]
                doc["runs"][run_key(c, m, cfg)] = {"cell": c.key, "method": m or "before", "cfg": cfg,
                                                   **f.result()}
                _save(doc, path)
                print(f"[{time.perf_counter() - t0:7.0f} s] {c.key} {m or 'before'} {cfg}", flush=True)
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    for g in futs:
                        g.cancel()
                    print("time budget reached; rerun to continue", flush=True)
                    return


# --------------------------------------------------------------------------------------------------- the rule
def choose(dev: dict) -> Dict[str, dict]:
    """The rule: per method, the strongest grid point whose mean clean test ACC over the development cells is
    ≥ the backdoored models' mean − ACC_MARGIN (the weakest point if none is)."""
    runs = dev["runs"].values()
    acc0 = statistics.mean(r["acc"] for r in runs if r["method"] == "before")
    chosen = {}
    for m, grid in GRIDS.items():
        pick = 0
        for i, cfg in enumerate(grid):
            accs = [r["acc"] for r in runs if r["method"] == m and r["cfg"] == cfg]
            if len(accs) == len(DEV_CELLS) and statistics.mean(accs) >= acc0 - ACC_MARGIN:
                pick = i
        chosen[m] = {"cfg": grid[pick], "index": pick}
    return chosen


def stage_jobs(stage: str, quick: bool, frozen: Optional[Dict[str, dict]]) -> List[Tuple[Cell, Optional[str], dict]]:
    if stage == "dev":
        return [(c, None, {}) for c in DEV_CELLS] + [(c, m, cfg) for c in DEV_CELLS for m in METHODS
                                                    for cfg in GRIDS[m]]
    if stage == "ablate":
        return ([(c, None, {}) for c in DEV_CELLS + DEV_TINY_CELLS]
                + [(c, m, cfg) for c in DEV_CELLS for m, cfg in ABLATIONS.values()]
                + [(c, m, cfg) for c in DEV_TINY_CELLS for m, cfg in TINY_ABLATIONS.values()])
    if stage == "holding":
        return ([(c, None, {}) for c in DEV_CELLS + DEV_TINY_CELLS]
                + [(c, m, cfg) for cells in (DEV_CELLS, DEV_TINY_CELLS) for c in cells
                   for m, cfg in HOLDING_ABLATIONS.values()])
    cells = HELDOUT_CELLS if stage == "heldout" else QUICK_CELLS if quick else EVAL_CELLS
    return [(c, None, {}) for c in cells] + [(c, m, frozen[m]["cfg"]) for c in cells for m in METHODS]


def _paths(args) -> Tuple[Path, Path]:
    dev = Path(args.dev_json)
    out = Path(args.out) if args.out else ROOT / ("protocol_quick.json" if args.quick else "protocol_eval.json")
    return dev, out


def _config(stage: str) -> dict:
    """What every run of a stage shares (its fingerprint guards the JSON).  The grids are not in it: a run is
    keyed by its cell, method and options, so a changed grid adds runs and leaves the others valid."""
    return {"stage": stage, "steps": STEPS, "batch": BATCH, "acc_margin": ACC_MARGIN, "retune": RETUNE.__dict__,
            "train_epochs": TRAIN_EPOCHS}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench protocol", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("dev", "ablate", "holding", "eval", "heldout", "report"))
    p.add_argument("--quick", action="store_true", help="eval: the 4-cell subset")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--dev-json", default=str(ROOT / "protocol_dev.json"))
    p.add_argument("--out", default=None, help="eval JSON (default bench/results/protocol_{eval,quick}.json)")
    p.add_argument("--cache", default=str(default_cache()), help="backdoored models (safetensors)")
    p.add_argument("--budget-min", type=float, default=None, help="stop after this many minutes (resumable)")
    p.add_argument("--fresh", action="store_true", help="discard the JSON of this stage first")
    args = p.parse_args(argv)
    from bench.protocol_report import write_report

    dev_path, eval_path = _paths(args)
    budget = args.budget_min * 60 if args.budget_min else None
    if args.stage == "dev":
        doc = _open(dev_path, _config("dev"), args.fresh)
        _execute(doc, dev_path, stage_jobs("dev", False, None), args.jobs, Path(args.cache), budget)
        if all(run_key(*j) in doc["runs"] for j in stage_jobs("dev", False, None)):
            doc["chosen"] = choose(doc)
            _save(doc, dev_path)
    elif args.stage in ("ablate", "holding"):
        path = dev_path.with_name(f"protocol_{args.stage}.json")
        doc = _open(path, _config(args.stage), args.fresh)
        _execute(doc, path, stage_jobs(args.stage, False, None), args.jobs, Path(args.cache), budget)
    elif args.stage in ("eval", "heldout"):
        dev = json.loads(dev_path.read_text()) if dev_path.exists() else {}
        if "chosen" not in dev:
            raise SystemExit(f"{dev_path} holds no frozen choice: run `python -m bench protocol dev` first")
        path = eval_path if args.stage == "eval" else dev_path.with_name("protocol_heldout.json")
        doc = _open(path, {**_config(args.stage), "quick": args.quick}, args.fresh)
        doc["chosen"] = dev["chosen"]
        _execute(doc, path, stage_jobs(args.stage, args.quick, dev["chosen"]), args.jobs, Path(args.cache), budget)
        _save(doc, path)            # the choice, also when every run it needs was already there
    write_report(dev_path, eval_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
