"""Markdown of the fair protocol (``bench/protocol.py``): the development grid and choice, the evaluation suite.

Means are over the cells whose backdoored model has ASR ≥ :data:`MIN_ASR` (the attack implanted); ± is the
standard deviation over those cells.  *Dominates*: lower ASR by more than :data:`TIE` and clean ACC not lower by
more than :data:`TIE` (half a point ≈ the resolution of a 1000-image test set); *Pareto*: no worse on either, better
on one by more than :data:`TIE`.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from itertools import product
from pathlib import Path
from typing import Dict, List, Tuple

MIN_ASR = 0.5
TIE = 0.005


def _ms(xs: List[float], scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.mean(xs) * scale
    if len(xs) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ± {fmt.format(statistics.stdev(xs) * scale)}"


def _mild(rs: List[dict]) -> str:
    """Mean ± sd of the milder re-tuning attack's ASR (``retune_mild_asr``) over the runs that have it ('–' for runs
    made before it existed), with how many when not all."""
    xs = [r.get("retune_mild_asr") for r in rs if r.get("retune_mild_asr") is not None]
    cell = _ms(xs)
    return cell if not xs or len(xs) == len(rs) else f"{cell} (n={len(xs)})"


def _by_cell(doc: dict) -> Dict[str, Dict[str, dict]]:
    """``{cell: {method (or run key for several configs of one method): run}}``."""
    cells: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for k, r in doc.get("runs", {}).items():
        name = r["method"] if r["method"] not in cells[r["cell"]] else k
        cells[r["cell"]][name] = r
    return cells


def dev_md(dev: dict) -> List[str]:
    from bench.protocol import GRIDS

    runs = list(dev.get("runs", {}).values())
    before = [r for r in runs if r["method"] == "before"]
    out = ["## Development task: grids and the choice", "",
           f"Backdoored models: ACC {_ms([r['acc'] for r in before])} %, ASR {_ms([r['asr'] for r in before])} % "
           f"({len(before)} cells).  Rule: the strongest grid point with mean clean ACC ≥ backdoored mean − margin."
           "  ASR is shown, never used.", "",
           "| method | grid point | ACC % | ASR % | RA % | chosen |", "|---|---|---|---|---|---|"]
    chosen = dev.get("chosen", {})
    for m, grid in GRIDS.items():
        for i, cfg in enumerate(grid):
            rs = [r for r in runs if r["method"] == m and r["cfg"] == cfg]
            mark = "**←**" if chosen.get(m, {}).get("index") == i else ""
            out.append(f"| {m} | {json.dumps(cfg)} | {_ms([r['acc'] for r in rs])} | {_ms([r['asr'] for r in rs])} "
                       f"| {_ms([r['ra'] for r in rs])} | {mark} |")
    return out + [""]


def ablate_md(doc: dict, holding: bool = False) -> List[str]:
    """The development ablations: per variant, architecture and clean-set size, mean ACC / ASR / RA / re-tuned
    ASR over the development cells (``TINY_ABLATIONS`` on the 2 % ones).  ``holding``: the table of
    ``HOLDING_ABLATIONS`` (both clean-set sizes) instead."""
    from bench.protocol_ablations import ABLATIONS, HOLDING_ABLATIONS, TINY_ABLATIONS

    cells = _by_cell(doc)
    title = ("## Holding mechanisms on the development cells (docs/holding.md)" if holding else
             "## Development ablations (our methods' variants; development ASR read to design the method)")
    out = [title, "",
           "| variant | arch | clean | ACC % | ASR % | RA % | re-tuned ASR % | re-tuned (mild) ASR % | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]

    def group(arch: str, clean: str) -> List[Dict[str, dict]]:
        return [v for k, v in cells.items() if k.startswith(arch + "/") and f"/c{clean}/" in k]

    for arch, clean in product(("cnn", "resnet"), ("0.1", "0.02")):
        b = [c["before"] for c in group(arch, clean) if "before" in c]
        if b:
            out.append(f"| backdoored | {arch} | {clean} | {_ms([r['acc'] for r in b])} | "
                       f"{_ms([r['asr'] for r in b])} | {_ms([r['ra'] for r in b])} | "
                       f"{_ms([r['retune_asr'] for r in b])} | {_mild(b)} | – |")
    tables = (("0.1", HOLDING_ABLATIONS), ("0.02", HOLDING_ABLATIONS)) if holding else \
        (("0.1", ABLATIONS), ("0.02", TINY_ABLATIONS))
    for clean, table in tables:
        for name, (m, cfg) in table.items():
            for arch in ("cnn", "resnet"):
                rs = [r for v in group(arch, clean) for r in v.values() if r["method"] == m and r["cfg"] == cfg]
                if rs:
                    out.append(f"| {name} | {arch} | {clean} | {_ms([r['acc'] for r in rs])} | "
                               f"{_ms([r['asr'] for r in rs])} | {_ms([r['ra'] for r in rs])} | "
                               f"{_ms([r['retune_asr'] for r in rs])} | {_mild(rs)} | "
                               f"{_ms([r['wall_s'] for r in rs], 1.0)} |")
    return out + [""]


def seeds_md(doc: dict) -> List[str]:
    """The holding variants run with several purification seeds (``bench.protocol_ablations._seeds``), pooled: per
    variant, architecture and clean-set size, the mean over cells × seeds of ΔACC (against the backdoored model),
    ASR and both re-tuned ASRs, and the same over all the development cells."""
    from bench.protocol_ablations import HOLDING_ABLATIONS, SEED_SUFFIX

    runs = list(doc.get("runs", {}).values())
    before = {r["cell"]: r for r in runs if r["method"] == "before"}
    variants: Dict[str, List[Tuple[str, dict]]] = {}
    for name, (m, cfg) in HOLDING_ABLATIONS.items():
        variants.setdefault(name.split(SEED_SUFFIX.split("{")[0])[0], []).append((m, cfg))
    out = ["## Holding variants over three purification seeds (pooled)", "",
           "Mean over cells × purification seeds (n runs); ΔACC against the backdoored model.", "",
           "| variant | arch | clean | n | ΔACC (pt) | ASR % | re-tuned ASR % | re-tuned (mild) ASR % |",
           "|---|---|---|---|---|---|---|---|"]
    for base, configs in ((b, c) for b, c in variants.items() if len(c) > 1):
        mine = [r for r in runs if r["cell"] in before and (r["method"], r["cfg"]) in configs]
        for arch, clean in [(a, c) for a in ("cnn", "resnet") for c in ("0.1", "0.02")] + [("all", "both")]:
            rs = [r for r in mine if arch == "all" or (r["cell"].startswith(arch + "/") and f"/c{clean}/" in r["cell"])]
            if rs:
                def mean(f) -> float:
                    return 100 * sum(f(r) for r in rs) / len(rs)
                out.append(f"| {base} | {arch} | {clean} | {len(rs)} | "
                           f"{mean(lambda r: r['acc'] - before[r['cell']]['acc']):+.2f} | "
                           f"{mean(lambda r: r['asr']):.2f} | {mean(lambda r: r['retune_asr']):.2f} | "
                           f"{mean(lambda r: r.get('retune_mild_asr', float('nan'))):.2f} |")
    return out + [""]


def _implanted(cells: Dict[str, Dict[str, dict]]) -> Dict[str, Dict[str, dict]]:
    return {k: v for k, v in cells.items() if "before" in v and v["before"]["asr"] >= MIN_ASR}


def _summary_rows(cells: Dict[str, Dict[str, dict]], methods, label: str) -> List[str]:
    rows = []
    for m in ("before",) + tuple(methods):
        rs = [c[m] for c in cells.values() if m in c]
        if not rs:
            continue
        d_acc = [c[m]["acc"] - c["before"]["acc"] for c in cells.values() if m in c]
        wall = [r.get("wall_s") for r in rs if r.get("wall_s") is not None]
        rows.append(f"| {label} | {m} | {len(rs)} | {_ms([r['acc'] for r in rs])} | {_ms(d_acc)} | "
                    f"{_ms([r['asr'] for r in rs])} | {_ms([r['ra'] for r in rs])} | "
                    f"{_ms([r['retune_asr'] for r in rs])} | {_mild(rs)} | {_ms(wall, 1.0) if wall else '–'} |")
    return rows


def _dominates(a: dict, b: dict) -> bool:
    return a["asr"] < b["asr"] - TIE and a["acc"] >= b["acc"] - TIE


def _pareto(a: dict, b: dict) -> bool:
    """Pareto dominance at the resolution TIE: a is no worse than b on ASR and on ACC, and better on at least one
    (unlike :func:`_dominates`, a cell where both ASRs are near zero is won by the higher clean accuracy)."""
    no_worse = a["asr"] <= b["asr"] + TIE and a["acc"] >= b["acc"] - TIE
    return no_worse and (a["asr"] < b["asr"] - TIE or a["acc"] > b["acc"] + TIE)


def _winnable(b: dict) -> bool:
    """Whether any run could :func:`_dominates` ``b``: only if b's ASR is above TIE (an ASR cannot go below 0)."""
    return b["asr"] > TIE


def _wins_table(cells: Dict[str, Dict[str, dict]], title: str, rule, ceiling=None) -> List[str]:
    """``rule(row's run, column's run)`` counted over the cells both methods ran, as a markdown table; with
    ``ceiling(column's run)``, a last row counts the cells the rule lets any row win against each column."""
    from bench.protocol import METHODS

    out = [f"### {title}", "", "| | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for a in METHODS:
        row = []
        for b in METHODS:
            both = [c for c in cells.values() if a in c and b in c]
            row.append("–" if a == b else f"{sum(rule(c[a], c[b]) for c in both)}/{len(both)}")
        out.append(f"| {a} | " + " | ".join(row) + " |")
    if ceiling is not None:
        cols = [[c[b] for c in cells.values() if b in c] for b in METHODS]
        out.append("| *at most* | " + " | ".join(f"{sum(map(ceiling, rs))}/{len(rs)}" for rs in cols) + " |")
    return out


def _model_check(cells: Dict[str, Dict[str, dict]]) -> List[str]:
    """A line saying whether every run of each cell purified the same backdoored model (``model_sha``)."""
    shas = {k: {r.get("model_sha") for r in v.values()} for k, v in cells.items()}
    mixed = sorted(k for k, s in shas.items() if len(s - {None}) > 1)
    unknown = sum(None in s for s in shas.values())
    if mixed:
        return [f"**Mixed models**: in {len(mixed)} cells the runs purified different backdoored models (the cache "
                f"was retrained between them): {', '.join(mixed)}.", ""]
    if unknown:
        return [f"{unknown} cells hold runs without a model digest (made before runs recorded one).", ""]
    return ["Every run of a cell purified the same backdoored model (the runs' `model_sha` agree).", ""]


def eval_md(doc: dict, title: str = "Evaluation suite (frozen choices)") -> List[str]:
    from bench.protocol import METHODS, SEEN_ATTACKS

    chosen = doc.get("chosen")
    if chosen:      # runs of an earlier frozen choice stay in the JSON; only the current choice is reported
        doc = {"runs": {k: r for k, r in doc["runs"].items() if r["method"] == "before"
                        or r["cfg"] == chosen.get(r["method"], {}).get("cfg")}}
    all_cells = _by_cell(doc)
    complete = {k: v for k, v in all_cells.items() if all(m in v for m in ("before",) + tuple(METHODS))}
    cells = _implanted(complete)
    failed = sorted(k for k, v in complete.items() if v["before"]["asr"] < MIN_ASR)
    out = [f"## {title}", "",
           f"{len(complete)} cells complete (every method run; {len(all_cells) - len(complete)} in progress); "
           f"{len(cells)} with an implanted backdoor (ASR ≥ {MIN_ASR:.0%}) enter the means; the attack failed in "
           f"{len(failed)}: {', '.join(failed) or '–'}.", "", *_model_check(complete),
           "| cells | method | n | ACC % | ΔACC (pt) | ASR % | RA % | re-tuned ASR % | re-tuned (mild) ASR % "
           "| wall s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups = [("all", cells)]
    for arch in ("cnn", "resnet"):
        groups.append((arch, {k: v for k, v in cells.items() if k.startswith(arch + "/")}))
    for clean in ("0.02", "0.1"):
        groups.append((f"clean {float(clean):.0%}", {k: v for k, v in cells.items() if k.split("/")[3] == "c" + clean}))
    groups.append(("seen attacks", {k: v for k, v in cells.items() if k.split("/")[1] in SEEN_ATTACKS}))
    groups.append(("unseen attacks", {k: v for k, v in cells.items() if k.split("/")[1] not in SEEN_ATTACKS}))
    for label, cs in groups:
        out += _summary_rows(cs, METHODS, label)
    benign = [c["before"]["benign"]["retune_asr"] for c in complete.values()]
    out += ["", f"Re-tuning attack on the **benign** models (same architecture and training, no poison): ASR "
            f"{_ms(benign)} % over {len(benign)} cells (the calibration: a benign model must stay low); the milder "
            f"attack: {_mild([c['before']['benign'] for c in complete.values()])} %.", ""]
    out += _wins_table(cells, "Cells won: row dominates column (lower ASR, ACC not lower, ± 0.5 pt)", _dominates,
                       ceiling=_winnable)
    out += ["", "*At most*: the cells where the column's ASR is above 0.5 %, the only ones this rule lets any row win "
            "(where the column has removed the trigger too, the higher clean accuracy wins nothing here; the Pareto "
            "table below counts it)."]
    out += [""] + _wins_table(cells, "Cells won, Pareto: row no worse on ASR and ACC (± 0.5 pt), better on one by "
                                     "more than 0.5 pt", _pareto)
    lam = [(m, c["before"].get("lambda_max"), c[m].get("lambda_max")) for c in cells.values() for m in METHODS
           if m in c and c[m].get("lambda_max") is not None]
    if lam:
        out += ["", "### λ_max of the Hessian (256 clean test images), before → after", "",
                "| method | n | before | after |", "|---|---|---|---|"]
        for m in METHODS:
            ls = [(b, a) for mm, b, a in lam if mm == m]
            if ls:
                out.append(f"| {m} | {len(ls)} | {_ms([b for b, _ in ls], 1.0)} | {_ms([a for _, a in ls], 1.0)} |")
    return out + [""]


def _command(stage: str, doc: dict) -> str:
    """The command that (re)runs ``doc``'s stage: each report names its own, whichever stage wrote it last."""
    quick = " --quick" if doc.get("config", {}).get("quick") else ""
    return f"`python -m bench protocol {stage}{quick} --jobs 2`"


def write_report(dev_path: Path, eval_path: Path) -> Path:
    """Write ``<eval_path>.md`` (and ``<dev_path>.md``) from the JSON files that exist."""
    from bench.protocol import BATCH, STEPS

    head = ["# Fair protocol: FIP vs the strongest fine-tuning defenses", "",
            "Generated by `bench/protocol.py` (see its docstring for the task, the grids and the rule).  "
            f"Budget: {STEPS} steps of batch {BATCH} for every method; MNIST-5k, CPU, one thread per run.", ""]
    out_path = None
    if dev_path.exists():
        dev = json.loads(dev_path.read_text())
        lines = head + dev_md(dev) + [f"Updated {dev.get('updated')}; machine {dev.get('machine')}; command: "
                                      f"{_command('dev', dev)}."]
        out_path = dev_path.with_suffix(".md")
        out_path.write_text("\n".join(lines) + "\n")
    abl = dev_path.with_name("protocol_ablate.json")
    if abl.exists():
        doc = json.loads(abl.read_text())
        abl.with_suffix(".md").write_text("\n".join(head + ablate_md(doc) + [f"Updated {doc.get('updated')}."]) + "\n")
    hold = dev_path.with_name("protocol_holding.json")
    if hold.exists():
        doc = json.loads(hold.read_text())
        hold.with_suffix(".md").write_text("\n".join(head + ablate_md(doc, holding=True) + seeds_md(doc) + [
            f"Updated {doc.get('updated')}; machine {doc.get('machine')}."]) + "\n")
    heldout = dev_path.with_name("protocol_heldout.json")
    if heldout.exists():
        doc = json.loads(heldout.read_text())
        lines = ([h.replace("MNIST-5k", "MNIST-5k on colour textures") for h in head]
                 + eval_md(doc, title="Held-out data (frozen choices)")
                 + [f"Updated {doc.get('updated')}; machine {doc.get('machine')}; command: "
                    f"{_command('heldout', doc)}."])
        heldout.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if eval_path.exists():
        doc = json.loads(eval_path.read_text())
        lines = head + eval_md(doc) + [f"Updated {doc.get('updated')}; machine {doc.get('machine')}; command: "
                                       f"{_command('eval', doc)}."]
        out_path = eval_path.with_suffix(".md")
        out_path.write_text("\n".join(lines) + "\n")
    return out_path
