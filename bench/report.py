"""Turn benchmark JSON files into markdown tables.

::

    python -m bench report                          # every bench/results/*.json → bench/results/*.md
    python -m bench report bench/results/ops_cpu.json --stdout
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from . import RESULTS_DIR


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    if x >= 1.0:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} µs"


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return "–" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _env_lines(d: dict) -> list[str]:
    dev, ver = d.get("device", {}), d.get("versions", {})
    name = dev.get("name", dev.get("type"))
    lines = [f"* **Device**: {dev.get('type')} — {name}"
             + (f", {dev.get('cpu_count')} logical CPUs, torch threads {dev.get('torch_threads')}"
                if dev.get("type") == "cpu" else f" (CPU host: {dev.get('cpu')})"),
             f"* **Date**: {d.get('date')}; host `{d.get('hostname')}`",
             f"* **Versions**: torch {ver.get('torch')}, python {ver.get('python')}, triton {ver.get('triton')}, "
             f"CUDA {ver.get('cuda')}, fip_fast {ver.get('fip_fast')} (git {str(ver.get('git_commit'))[:10]})",
             f"* **Machine load** (1/5/15-min load average): before {d.get('load_before')}, after "
             f"{d.get('load_after')}"]
    if d.get("quick"):
        lines.append("* **--quick** run (tiny sizes, smoke test only: these numbers mean nothing)")
    return lines


# ------------------------------------------------------------------------------------------------ ops
def ops_markdown(d: dict) -> str:
    cpu = d.get("device", {}).get("type") == "cpu"
    md = [f"# fip_fast op microbenchmarks — {d['device'].get('name', d['device']['type'])}", ""]
    md += _env_lines(d)
    md += _ops_setup_lines(d)
    ok = [r for r in d["results"] if r["status"] == "ok"]
    impls = [k for k in d["impls"] if any(r["impl"] == k for r in ok)]
    keys: list[tuple] = []
    for r in ok:
        k = (r["op"], r.get("variant"), r["case"])
        if k not in keys:
            keys.append(k)
    md += ["", "## Median time per call (20th–80th percentile), achieved GB/s and % of copy bandwidth", ""]
    md.append("Each cell: median [p20–p80] · GB/s · % of the copy bandwidth above (GFLOP/s for the spectral ops). "
              "Wall-clock time (`time.perf_counter`)" + (", which on a shared CPU includes waiting for a core"
                                                         if cpu else "") + ".")
    md.append("")
    md.append(_table(["op", "case"] + impls, _ops_rows(ok, impls, keys, _wall_cell)))
    md.append("")
    md.append("×N = speed-up over the reference (median / median).")
    if cpu and any(r.get("cpu_median_s") for r in ok):
        md += ["", "## Same, by process CPU time (`time.process_time`, median) — less sensitive to machine load", ""]
        md.append(_table(["op", "case"] + impls, _ops_rows(ok, impls, keys, _cpu_cell)))
    md += _ops_notes(d, ok)
    md += _whole_step_lines(d)
    md += _host_step_lines(d)
    return "\n".join(md) + "\n"


def _ops_setup_lines(d: dict) -> list[str]:
    """Copy bandwidth, timer, skipped implementations, the cases and the bytes accounting."""
    bw = d["copy_bandwidth"]
    md = [f"* **Copy bandwidth** (`dst.copy_(src)`, {bw['numel'] / 2**20:g} Mi fp32 elements, 8 B/element): "
          f"**{bw['gbps']:.1f} GB/s** (median {_ms(bw['median_s'])}, p20–p80 {_ms(bw['p20_s'])}–"
          f"{_ms(bw['p80_s'])})"
          + (f"; by CPU time {bw['gbps_cpu_time']:.1f} GB/s" if bw.get("gbps_cpu_time") else "")
          + (" — the better of the measurements at the start / end of the run: "
             + " / ".join(f"{b['gbps']:.1f}" for b in bw["runs"]) + " GB/s" if bw.get("runs") else "")]
    md.append(f"* **Timer**: {next((r.get('timer') for r in d['results'] if r.get('timer')), '–')}; "
              f"{d['config']['timing']}")
    md.append(f"* **compile**: {d['config'].get('compile_note')}")
    skipped = {k: v["reason"] for k, v in d["impls"].items() if not v["available"]}
    for k, why in skipped.items():
        md.append(f"* **{k}** skipped: {why}")
    md += ["", "## Cases", ""]
    md.append(_table(["case", "elements", "tensors", "what"],
                     [[k, f"{v['numel']:,}", str(v["ntensors"]), v["desc"]] for k, v in d["config"]["cases"].items()]))
    md += ["", "## Bytes moved per element (minimum traffic of a one-pass fused kernel, fp32)", ""]
    md.append(_table(["op", "B/elem", "accounting"],
                     [[k, _num(v["bytes_per_elem"], "{}"), v["what"]] for k, v in d["bytes_accounting"].items()]))
    return md


def _ops_rows(ok: list[dict], impls: list[str], keys: list[tuple], cell_fn) -> list[list[str]]:
    """One row per (op, variant, case), one cell per implementation (``cell_fn(r, ref, impl)``, None: "–")."""
    rows = []
    for op, var, case in keys:
        row = [f"{op}{'/' + var if var else ''}", case]
        by = {r["impl"]: r for r in ok if (r["op"], r.get("variant"), r["case"]) == (op, var, case)}
        ref = by.get("reference")
        for im in impls:
            r = by.get(im)
            cell = None if r is None else cell_fn(r, ref, im)
            row.append("–" if cell is None else cell)
        rows.append(row)
    return rows


def _wall_cell(r: dict, ref: Optional[dict], im: str) -> str:
    cell = f"{_ms(r['median_s'])} [{_ms(r['p20_s'])}–{_ms(r['p80_s'])}]"
    if r.get("gbps") is not None and r.get("bytes_per_elem"):
        cell += f" · {r['gbps']:.3g} GB/s · {r['pct_copy_bw']:.0f}%"
    elif r.get("gflops") is not None:
        cell += f" · {r['gflops']:.3g} GFLOP/s"
    if ref is not None and im != "reference":
        cell += f" · ×{ref['median_s'] / r['median_s']:.2g}"
    return cell


def _cpu_cell(r: dict, ref: Optional[dict], im: str) -> Optional[str]:
    if r.get("cpu_median_s") is None:
        return None
    cell = _ms(r["cpu_median_s"])
    if r.get("gbps_cpu_time") is not None and r.get("bytes_per_elem"):
        cell += f" · {r['gbps_cpu_time']:.3g} GB/s · {r['pct_copy_bw_cpu_time']:.0f}%"
    if ref is not None and im != "reference" and ref.get("cpu_median_s"):
        cell += f" · ×{ref['cpu_median_s'] / r['cpu_median_s']:.2g}"
    return cell


def _ops_notes(d: dict, ok: list[dict]) -> list[str]:
    """First calls of the compiled impls, the largest error against the reference, the errors."""
    md: list[str] = []
    first = [r for r in ok if r.get("first_call_s") and r["impl"].startswith("compile")]
    if first:
        md += ["", "First call of the compiled impl (compilation included): "
               + ", ".join(f"{r['op']}{'/' + r['variant'] if r.get('variant') else ''} {r['case']} "
                           f"{_ms(r['first_call_s'])}" for r in first[:8]) + (" …" if len(first) > 8 else "")]
    errs = [r for r in ok if r.get("max_abs_err_vs_reference") is not None and r["impl"] != "reference"]
    if errs:
        worst = max(errs, key=lambda r: r["max_abs_err_vs_reference"])
        md += ["", f"Checked against the reference on the cases up to {d['config'].get('verify_numel'):,} elements "
                   f"(and every spectral case): largest |difference| {worst['max_abs_err_vs_reference']:.2e} "
                   f"({worst['impl']}, {worst['op']} {worst['case']})."]
    bad = [r for r in d["results"] if r["status"] == "error"]
    if bad:
        md += ["", "Errors:", ""] + [f"* {r['op']} {r.get('variant') or ''} {r['case']} {r['impl']}: {r['reason']}"
                                     for r in bad]
    return md


def _whole_step_lines(d: dict) -> list[str]:
    if not d.get("whole_step"):
        return []
    md = ["", "## The whole `optimizer.step()` on the ResNet-18 list (same run)", ""]
    rows = []
    for w in d["whole_step"]:
        if "median_s" not in w:
            rows.append([w["optimizer"], w["impl"], "–", "–", w.get("error", "")])
            continue
        rows.append([w["optimizer"], w["impl"], f"{_ms(w['median_s'])} [{_ms(w['p20_s'])}–{_ms(w['p80_s'])}]",
                     f"×{w['vs_sgd']:.2f}" if w.get("vs_sgd") else "–", w.get("note", "")])
    md.append(_table(["optimizer", "impl", "median per step [p20–p80]", "vs SGD(foreach)", "note"], rows))
    return md


def _helper(status: str) -> str:
    """The host-helper column: C++ or Python (a row recorded before the helper existed: empty)."""
    return "C++" if status.startswith("C++") else ("Python" if status.startswith("Python") else status)


def _host_step_lines(d: dict) -> list[str]:
    if not d.get("host_step"):
        return []
    md = ["", "## Host time per `optimizer.step()` (tiny tensors of 4 elements: Python + dispatch overhead)", ""]
    rows, errors = [], []
    for h in d["host_step"]:
        if h.get("error"):
            errors.append(f"* {h['impl']}: {h['error']}")
            continue
        rows.append([h["optimizer"], h["impl"], _helper(h.get("host_helper", "")), str(h["ntensors"]),
                     f"{_ms(h['per_step_median_s'])} [{_ms(h['per_step_p20_s'])}–{_ms(h['per_step_p80_s'])}]",
                     _ms(h.get("per_step_cpu_median_s"))])
    md.append(_table(["optimizer", "impl", "host work", "tensors", "wall per step, median [p20–p80]",
                      "CPU time per step"], rows))
    md.append("")
    md.append("`fip_lagged` and `fip_fd` are means over a cycle of `trace_every` = 5 calls (one suppressor "
              "call; each lagged call preceded by the `apply_perturbation` of its training forward); the `fip_fd` "
              "closure only re-assigns stored gradients.  `triton (launch mocked)`: the Triton path under the "
              "interpreter with every kernel launch replaced by a no-op — the host work a GPU step pays.  "
              "`host work`: the step's per-tensor host work (reading the gradients, version bumps) in C++ "
              "(`fip_fast.backends.host`) or in its Python versions (the same step before the helper).")
    return md + ([""] + errors if errors else [])


# ------------------------------------------------------------------------------------------------ end to end
def end_to_end_markdown(d: dict) -> str:
    md = [f"# fip_fast end-to-end benchmark — {d['device'].get('name', d['device']['type'])}", ""]
    md += _env_lines(d)
    md.append(f"* **Task** for time-to-ASR: {d.get('task', {}).get('desc')}")
    for sec in d.get("step_time", []):
        md += ["", f"## Per-step time — {sec['model']} (batch {sec['batch_size']}, input {sec['input_shape']})", ""]
        md.append(sec.get("note", ""))
        md.append("")
        rows = []
        base = next((m for m in sec["methods"] if m["method"] == "sgd"), None)
        for m in sec["methods"]:
            rows.append([m["method"], m["desc"], str(m["trainable"]),
                         f"{_ms(m['mean_step_s'])}",
                         f"{_ms(m['cycle_median_s'] / m['cycle'])} [{_ms(m['cycle_p20_s'] / m['cycle'])}–"
                         f"{_ms(m['cycle_p80_s'] / m['cycle'])}]",
                         _ms(m.get("plain_step_median_s")), _ms(m.get("suppressor_step_median_s")),
                         _ms(m.get("cpu_mean_step_s")),
                         f"×{m['cycle_median_s'] / m['cycle'] / (base['cycle_median_s'] / base['cycle']):.2f}"
                         if base else "–"])
        md.append(_table(["method", "what", "trainable scalars", "mean per step", "per step (cycle median) "
                          "[p20–p80]", "plain step median", "suppressor step median", "CPU time per step",
                          "vs plain FT"], rows))
        if sec.get("targets"):
            md += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in sec["targets"].items())]
    if d.get("time_to_asr"):
        t = d["time_to_asr"]
        md += ["", f"## Wall time to ASR ≤ {t['asr_threshold'] * 100:g} % ({t['desc']})", ""]
        md.append(t.get("note", ""))
        md.append("")
        rows = []
        for m in t["methods"]:
            rows.append([m["method"], str(m["reached"]), str(m.get("steps")), _ms(m.get("train_time_s")),
                         _num(m.get("asr"), "{:.3f}"), _num(m.get("acc"), "{:.3f}"),
                         _num(m.get("asr0"), "{:.3f}"), _num(m.get("acc0"), "{:.3f}")])
        md.append(_table(["method", "reached", "steps", "training wall time", "ASR at stop", "ACC at stop",
                          "ASR before", "ACC before"], rows))
        if t.get("speedups"):
            md += [""] + [f"* {k}: {v}" for k, v in t["speedups"].items()]
    return "\n".join(md) + "\n"


def markdown_for(d: dict) -> str:
    schema = d.get("schema", "")
    if schema.startswith("fip_fast.bench.ops"):
        return ops_markdown(d)
    if schema.startswith("fip_fast.bench.end_to_end"):
        return end_to_end_markdown(d)
    return "```json\n" + json.dumps(d, indent=1)[:20000] + "\n```\n"


def write_markdown(path: Path, out: Optional[Path] = None) -> Path:
    path = Path(path)
    d = json.loads(path.read_text())
    out = Path(out) if out else path.with_suffix(".md")
    out.write_text(markdown_for(d))
    return out


def main(argv: Optional[list[str]] = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m bench report", description="benchmark JSON → markdown tables")
    p.add_argument("files", nargs="*", help="JSON files (default: bench/results/*.json)")
    p.add_argument("--stdout", action="store_true", help="print instead of writing .md files")
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted(RESULTS_DIR.glob("*.json"))
    written = []
    for f in files:
        if args.stdout:
            print(markdown_for(json.loads(f.read_text())))
        else:
            written.append(write_markdown(f))
            print(f"wrote {written[-1]}")
    return written


if __name__ == "__main__":
    main()
