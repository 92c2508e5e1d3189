"""What ``fip-fast`` shows and writes: the result table, result rows, report.md / report.json (and the purified
weights), all staged so that a failed write keeps the previous outputs; console warnings."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fip_fast.cli.checks import extra_hint, missing_modules

#: What the plots need (the extra ``fip_fast[demo]``); without it the report says so and has no plots.
PLOT_EXTRA = ("matplotlib",)


@dataclass
class Report:
    """One report folder's content: report.md's title and intro lines, the input model's row and the result
    rows (table, plots, per-method sections), and report.json's payload."""

    title: str
    intro: List[str]
    before_row: Dict[str, Any]
    rows: List[Dict[str, Any]]
    payload: Dict[str, Any]


@dataclass
class ModelOutput:
    """The purified weights to save beside the report: where, the model, the safetensors metadata."""

    path: Path
    model: Any
    metadata: Dict[str, str]


_WARNED: set = set()


def warn(message: str, key: Optional[str] = None) -> None:
    """``fip-fast: warning: …`` on stderr, once per ``key`` (default: the message) and command: the pipeline's
    logged warnings (:class:`WarnOnce`) and their repetition beside the result share the key, so each is shown
    once.  :func:`reset_warnings` starts a new command."""
    k = key if key is not None else message
    if k in _WARNED:
        return
    _WARNED.add(k)
    print(f"fip-fast: warning: {message}", file=sys.stderr, flush=True)


def reset_warnings() -> None:
    _WARNED.clear()


class WarnOnce(logging.Handler):
    """Shows the ``fip_fast`` loggers' warnings through :func:`warn` (once each, in fip-fast's format); the key
    is the message without its ``fip_fast.pipeline: `` prefix — the text the report's warnings hold."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        key = msg.split(": ", 1)[1] if msg.startswith("fip_fast.") and ": " in msg else msg
        warn(key, key=key)


def fmt_pct(v: Optional[float]) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def fmt(v: Optional[float], spec: str = ".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def warn_if_no_plots() -> None:
    """Say before the work that the report will have no plots (matplotlib missing)."""
    if missing_modules(PLOT_EXTRA):
        warn(f"matplotlib is not installed: the report will have no plots ({extra_hint()})")


def _has_retune(rows: List[Dict[str, Any]]) -> bool:
    return any("retune_asr" in r for r in rows)


def table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of the result rows (also readable on a terminal); the "re-tuned ASR %" column when the rows
    carry ``retune_asr`` (the demo's re-tuning attack)."""
    retune = _has_retune(rows)
    head = ["method", "ACC %", "ASR %"] + (["re-tuned ASR %"] if retune else []) + [
        "RA %", "λ_max", "wall s", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], fmt_pct(r.get("acc")), fmt_pct(r.get("asr"))]
            + ([fmt_pct(r.get("retune_asr"))] if retune else []) + [fmt_pct(r.get("ra")),
            fmt(r.get("lambda_max"), ".3g"), fmt(r.get("wall_s"), ".1f"),
            f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "—"]) + " |")
    return "\n".join(lines)


def input_row(method: str, metrics: Dict[str, Any], lam: float, wall_s: Optional[float], model) -> Dict[str, Any]:
    """The table row of the model before purification."""
    return {"method": method, **metrics, "lambda_max": lam, "wall_s": wall_s,
            "trainable_params": sum(p.numel() for p in model.parameters())}


def method_row(name: str, report, metrics: Dict[str, Any], lam: float, diverged: Optional[str] = None
               ) -> Dict[str, Any]:
    """The table / report.json row of one purification (``report``: its :class:`PurifyReport`)."""
    return {
        "method": name, "acc": metrics.get("acc"), "asr": metrics.get("asr"), "ra": metrics.get("ra"),
        "lambda_max": lam, "wall_s": report.timings.get("setup", 0.0) + report.timings.get("loop", 0.0)
        + report.timings.get("finalize", 0.0),
        "trainable_params": report.trainable_params, "selected_step": report.selected_step,
        "steps_run": report.steps_run, "skipped_steps": report.skipped_steps,
        "initial_val_acc": report.initial.get("val_acc"), "final_val_acc": report.final.get("val_acc"),
        "warnings": list(getattr(report, "warnings", []) or []), "diverged": diverged,
        "accuracy_check": _accuracy_check(report),
        "retries": [{"lrs": dict(t.lrs), "text": t.accuracy.describe()} for t in getattr(report, "retries", [])],
        "history": [{k: v for k, v in h.items()} for h in report.history],
    }


def _accuracy_check(report) -> Optional[Dict[str, Any]]:
    """The clean-accuracy check of the result (:class:`fip_fast.pipeline.report.AccuracyCheck`) with its
    sentence, or None when it was not measured."""
    import dataclasses

    acc = getattr(report, "accuracy", None)
    return None if acc is None else {**dataclasses.asdict(acc), "text": acc.describe()}


def config(args) -> Dict[str, Any]:
    """The command's flags for report.json."""
    return {k: v for k, v in vars(args).items() if k != "func"}


# ---------------------------------------------------------------------------------------------- report.md
_LEGEND = ("ACC: clean test accuracy.  ASR: triggered non-target test inputs classified as the target.  "
           "RA: the same inputs classified as their true class.  λ_max: top Hessian eigenvalue of the clean "
           "loss (power iteration, one fixed clean batch, eval mode).  wall s: purification time (Fisher "
           "estimation and setup included, evaluation excluded).  Selection used clean validation data "
           "only.")

_RETUNE_LEGEND = ("re-tuned ASR: the ASR of a copy of the model after the re-tuning attack (a few SGD steps on the "
                  "defender's clean set with one triggered, target-labelled sample per batch; settings above): a "
                  "backdoor that was hidden rather than removed comes back.  Its time is not in wall s.")

NO_PLOTS = "No plots: matplotlib is not installed (an optional dependency of fip_fast[demo]; {hint})."
NO_CURVES = ("No accuracy plot: there is neither test data (--test / --triggered) nor a clean-validation part to "
             "follow over the steps; give --test (and --triggered) to see clean accuracy and ASR over the run.")


def _history_md(history: List[Dict[str, Any]]) -> List[str]:
    has_eval = "eval" in history[0]
    md = ["| step | train loss | val loss | val ACC % |" + (" test ACC % | ASR % | RA % |" if has_eval else ""),
          "|---|---|---|---|" + ("---|---|---|" if has_eval else "")]
    for h in history:
        line = (f"| {h['step']} | {fmt(h.get('train_loss'), '.4f')} | {fmt(h.get('val_loss'), '.4f')}"
                f" | {fmt_pct(h.get('val_acc'))} |")
        if has_eval:
            e = h.get("eval") or {}
            line += f" {fmt_pct(e.get('acc'))} | {fmt_pct(e.get('asr'))} | {fmt_pct(e.get('ra'))} |"
        md.append(line)
    return md + [""]


def _method_md(r: Dict[str, Any]) -> List[str]:
    md = [f"## {r['method']}", ""]
    if r.get("diverged"):
        md += [f"**DIVERGED: {r['diverged']}.  This result must not be used (no purified model was "
               "written).**", ""]
    elif r.get("refused"):
        md += [f"**NOT SAVED: {r['refused']}.  No purified model was written.**", ""]
    md += [f"steps run {r['steps_run']} ({r.get('skipped_steps', 0)} skipped for non-finite gradients), "
           f"returned weights of step {r['selected_step']}; clean-val accuracy "
           f"{fmt_pct(r.get('initial_val_acc'))} % → {fmt_pct(r.get('final_val_acc'))} %", ""]
    for t in r.get("retries") or []:
        lrs = ", ".join(f"{k} {v:g}" for k, v in t["lrs"].items())
        md += [f"Abandoned try ({lrs}): {t['text']}; purified again from the input model at half the rate.", ""]
    if r.get("accuracy_check"):
        md += [f"Accuracy check: {r['accuracy_check']['text']}.", ""]
    md += [f"* warning: {w}" for w in r.get("warnings") or []] + ([""] if r.get("warnings") else [])
    if r.get("history"):
        md += _history_md(r["history"])
    return md


def report_md(report: Report, plots: Optional[List[str]]) -> str:
    """report.md; ``plots``: the plot files to show, None when matplotlib is missing (said in the report)."""
    md = [f"# {report.title}", "", *report.intro, "", table([report.before_row] + report.rows), ""]
    md += [_LEGEND + ("  " + _RETUNE_LEGEND if _has_retune([report.before_row] + report.rows) else ""), ""]
    if plots is None:
        md += [NO_PLOTS.format(hint=extra_hint()), ""]
    elif "asr_acc.png" not in plots:
        md += [NO_CURVES, ""]
    for p in plots or []:
        md += [f"![{p}]({p})", ""]
    for r in report.rows:
        md += _method_md(r)
    return "\n".join(md)


# ---------------------------------------------------------------------------------------------- writing
def _stage_report(staged, out: Path, report: Report) -> None:
    from fip_fast.pipeline import _jsonable

    if missing_modules(PLOT_EXTRA):
        plots = None                  # said in report.md (and, before the work, by the command)
    else:
        from fip_fast.cli.plots import stage_plots

        plots = stage_plots(staged, out, report.rows, report.before_row)
    with staged.path(out / "report.md") as tmp:
        tmp.write_text(report_md(report, plots), encoding="utf-8")
    with staged.path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(_jsonable(report.payload), indent=2) + "\n", encoding="utf-8")


def _save_weights(model_out: ModelOutput, tmp: Path) -> None:
    """The purified weights in the format ``model_out.path``'s suffix names: safetensors, or (``.pt`` / ``.pth``)
    a plain state dict that ``torch.load(weights_only=True)`` reads."""
    import torch

    from fip_fast.io import _plain_tensors, save_model

    if model_out.path.suffix.lower() in (".pt", ".pth"):
        torch.save(_plain_tensors(model_out.model.state_dict()), tmp)
    else:
        save_model(model_out.model, tmp, metadata=model_out.metadata)


def write_outputs(out: Path, inputs: Sequence[Optional[Path]], report: Report,
                  model_out: Optional[ModelOutput] = None) -> None:
    """Write the report files (and the purified weights) so that no user file is lost: each output is staged
    as a temporary beside its destination (never an input: ``inputs`` are protected), and all of them replace
    the previous results only once every one is complete — a run that fails while writing keeps the old ones.
    Nothing is ever deleted but the tool's own temporaries (and --out itself when this call created it and it
    is still empty)."""
    from fip_fast.io import StagedOutputs

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with StagedOutputs(protect=list(inputs)) as staged:
            _stage_report(staged, out, report)
            if model_out is not None:
                model_out.path.parent.mkdir(parents=True, exist_ok=True)
                with staged.path(model_out.path) as tmp:
                    _save_weights(model_out, tmp)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()           # only succeeds while empty: never removes anything else
        raise
