"""The report's PNG plots (needs matplotlib, an optional dependency of ``fip_fast[demo]``): asr_acc.png — clean
accuracy and attack success rate over the purification steps, per method — and lambda_max.png — the top Hessian
eigenvalue before / after."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


def _pct_list(vals: Sequence[Optional[float]]) -> List[float]:
    return [float("nan") if v is None else 100 * v for v in vals]


def _evals(r: Dict[str, Any], key: str) -> list:
    return [(e.get("eval") or {}).get(key) for e in r.get("history") or []]


def _stage_fig(staged, fig, path: Path) -> str:
    with staged.path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path.name


def _test_series(r: Dict[str, Any], before: Dict[str, Any], key: str):
    """(steps, %) of the test metric ``key`` ("acc" / "asr"): θ0 at step 0, then every evaluation; when no
    evaluation measured it (the demo's --no-history) θ0 and the result at its selected step; None without it."""
    h = r.get("history") or []
    vals = _evals(r, key)
    if any(v is not None for v in vals):
        return [0] + [e["step"] for e in h], _pct_list([before.get(key)] + vals)
    if r.get(key) is not None and before.get(key) is not None:
        return [0, r.get("selected_step") or r.get("steps_run") or 0], _pct_list([before[key], r[key]])
    return None


def _draw_curves(axes, r: Dict[str, Any], before: Dict[str, Any], have_acc: bool, have_asr: bool) -> None:
    """One method's curves: test ACC (or clean-val ACC when no evaluation has it) and, when known, ASR; the
    selected step (the weights returned) as a dotted line."""
    h = r.get("history") or []
    ax_acc, color, drawn = axes[0][0], None, []
    acc = _test_series(r, before, "acc") if have_acc else None
    if acc is None and not have_acc and h and "val_acc" in h[0]:
        acc = [0] + [e["step"] for e in h], _pct_list([r.get("initial_val_acc")] + [e.get("val_acc") for e in h])
    if acc is not None:
        color = ax_acc.plot(*acc, marker=".", label=r["method"])[0].get_color()
        drawn.append((ax_acc, acc[0]))
    asr = _test_series(r, before, "asr") if have_asr else None
    if asr is not None:
        color = axes[0][1].plot(*asr, marker=".", color=color, label=r["method"])[0].get_color()
        drawn.append((axes[0][1], asr[0]))
    sel = r.get("selected_step")
    for ax, steps in drawn:
        if sel is not None and sel in steps[1:]:
            ax.axvline(sel, color=color, linestyle=":", linewidth=1.2, label=f"{r['method']}: selected step {sel}")


def _label_axes(axes, have_acc: bool, have_asr: bool) -> None:
    ax_acc = axes[0][0]
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("clean test ACC %" if have_acc else "clean-val ACC %")
    ax_acc.set_title("Clean accuracy")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    if have_asr:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("ASR %")
        axes[0][1].set_title("Attack success rate")
        axes[0][1].set_ylim(-2, 102)
        axes[0][1].grid(alpha=0.3)


def _has_test(results: List[Dict[str, Any]], before: Dict[str, Any], key: str) -> bool:
    return any(_test_series(r, before, key) is not None for r in results)


def has_curves(results: List[Dict[str, Any]], before: Dict[str, Any]) -> bool:
    """Whether asr_acc.png has anything to draw: test ACC / ASR (--test, --triggered; over the evaluations, or
    θ0 → result) or clean-validation accuracy in some method's history (without them the plot would be an
    empty 0–1 frame)."""
    return _has_test(results, before, "acc") or _has_test(results, before, "asr") or any(
        e.get("val_acc") is not None for r in results for e in r.get("history") or [])


def _asr_acc_figure(plt, results: List[Dict[str, Any]], before: Dict[str, Any]):
    """ACC (and ASR) over the steps, per method, the selected step marked; None when there is nothing to draw."""
    if not has_curves(results, before):
        return None
    have_acc, have_asr = _has_test(results, before, "acc"), _has_test(results, before, "asr")
    fig, axes = plt.subplots(1, 2 if have_asr else 1, figsize=(10 if have_asr else 5.5, 3.6), squeeze=False)
    for r in results:
        _draw_curves(axes, r, before, have_acc, have_asr)
    _label_axes(axes, have_acc, have_asr)
    fig.tight_layout()
    return fig


def _lambda_figure(plt, results: List[Dict[str, Any]], before: Dict[str, Any]):
    """The λ_max bar chart, or None when λ_max was not measured (before, or for every method)."""
    lam = [(r["method"], r.get("lambda_max")) for r in results if r.get("lambda_max") is not None
           and not math.isnan(r["lambda_max"])]
    if not (lam and before.get("lambda_max") is not None and not math.isnan(before["lambda_max"])):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = ["before"] + [n for n, _ in lam]
    vals = [before["lambda_max"]] + [v for _, v in lam]
    bars = ax.bar(names, vals, color=["#888"] + ["C%d" % i for i in range(len(lam))])
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=8)   # the values, small bars included
    positive = [v for v in vals if v > 0]
    if len(positive) == len(vals) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")                   # a 100× flatter result would otherwise be an invisible bar
    ax.set_ylabel("λ_max (clean batch)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title("Top Hessian eigenvalue before / after")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def stage_plots(staged, out: Path, results: List[Dict[str, Any]], before: Dict[str, Any]) -> List[str]:
    """asr_acc.png (per method, over steps) and lambda_max.png (before/after), staged in ``staged``; returns
    the file names.  ACC and ASR curves are drawn only where the evaluations have them (``--test`` alone has
    no ASR, ``--triggered`` alone no ACC: clean-val accuracy is drawn instead)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    for name, make in (("asr_acc.png", _asr_acc_figure), ("lambda_max.png", _lambda_figure)):
        fig = make(plt, results, before)
        if fig is not None:
            written.append(_stage_fig(staged, fig, out / name))
            plt.close(fig)
    return written
