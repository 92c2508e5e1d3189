"""fip_fast next to the libraries a user would otherwise reach for, on the same inputs (``docs/peers.md``).

::

    python -m bench peers                 # → bench/results/peers_cpu.json + .md
    python -m bench peers --quick         # smoke test (tiny sizes, 2 rounds; the numbers mean nothing)

Every group below builds fip_fast's side and each peer's side on the same inputs, then times them in
*interleaved rounds* in this one process on one torch thread (:func:`bench.time_interleaved`: every round calls
each side ``--steps`` times, in an order rotated from round to round, so that a drift of the machine's load hits
every side alike).  Each round gives one time per side and one *paired* ratio ours / peer; a row reports the
median and the spread (min–max and the 25th–75th percentiles) over rounds, of process CPU time (what the work
needed) and of wall time, plus the peer's version and the load average before and after.

Groups (one module each in this package):

* ``optimizer``: ``FIP.step()`` (impl ``auto``, no suppressor), the F0 anchor on (9 arrays per element) and off (7,
  as AdamW), vs ``torch.optim.AdamW(fused=True)``, vs ``torch.optim.SGD(momentum=0.9, fused=True)`` and vs an AdamW
  guarded against non-finite gradients as FIP is (one read of the gradients before the step, ``found_inf``), plus
  where FIP's time goes (the fused kernel alone; the finiteness pass and the kernel without the step's other host
  work), on the ResNet-18 (CIFAR) parameter list
  that ``python -m bench ops`` uses (``bench.ops.cases.model_shapes``), random gradients.  Each row's ``check``
  says which arrays each side reads and writes per element.
* ``fisher_cnn`` / ``fisher_tokens``: the per-sample diagonal Fisher Σ_n g_n² (``fip_fast.estimate_fisher``,
  estimator ``per_sample``) on a conv-BatchNorm(eval)-ReLU CNN with a Linear head, and on an Embedding + Linear
  token model (token losses summed per sequence), vs one ``torch.func`` ``vmap(grad)`` over all parameters and vs
  BackPACK (``SumGradSquared``, or ``BatchGrad`` squared where the former does not cover a layer).
* ``hutchinson``: Tr(H) by Hutchinson (``fip_fast.evaluation.smoothness.hessian_trace``, its default and with
  ``batch_size=16``) vs PyHessian's ``hessian(...).trace`` on a small PreAct-ResNet, per probe (each call builds
  its gradient graph once, then ``--probes`` products).
* ``fast_fip``: one purification step (the fd suppressor every step, the FIP loop of ``purify``) on a small
  PreAct-ResNet at full rank: Fast FIP in place vs the authors' Fast FIP (:class:`AuthorsSVDConv2d` /
  :class:`AuthorsSVDLinear`, their layer rewritten here; module swap, W rebuilt every forward) with the same
  optimizer, groups and options on δ; and the shipped Fast FIP in place vs full FIP.

A peer that is not installed is skipped, with the reason printed and kept in the JSON.
Install the optional peers without letting pip replace the CPU torch (BackPACK declares torchvision, which it
imports only in its examples)::

    pip install --no-deps backpack-for-pytorch einops unfoldNd pyhessian
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import RESULTS_DIR, device_tag, environment, loadavg, write_json
from ._records import Config, Row, Spread
from .authors import group_fast_fip
from .fisher import group_fisher_cnn, group_fisher_tokens
from .hutchinson import group_hutchinson
from .optimizer import group_optimizer

SCHEMA = "fip_fast.bench.peers/1"


# ------------------------------------------------------------------------------------------------ driver
GROUPS: dict[str, Callable[[Config], list[Row]]] = dict(
    optimizer=group_optimizer, fisher_cnn=group_fisher_cnn, fisher_tokens=group_fisher_tokens,
    hutchinson=group_hutchinson, fast_fip=group_fast_fip)


def _ms(s: Optional[Spread]) -> str:
    return "–" if s is None else f"{s.median * 1e3:.3g} ({s.min * 1e3:.3g}–{s.max * 1e3:.3g})"


def _ratio(s: Optional[Spread]) -> str:
    return "–" if s is None else f"**{s.median:.2f}×** ({s.min:.2f}–{s.max:.2f}; IQR {s.p25:.2f}–{s.p75:.2f})"


def describe(r: Row) -> str:
    """One printed line per row."""
    if r.status != "ok":
        return f"{r.group}: {r.ours} vs {r.peer}: skipped ({r.reason})"
    return (f"{r.group}: {r.ours} {_ms(r.ours_cpu_s)} ms vs {r.peer} {r.peer_version or ''} {_ms(r.peer_cpu_s)} ms "
            f"CPU {r.unit} → ratio {_ratio(r.ratio_cpu)} (wall {_ratio(r.ratio_wall)}), goal {r.goal}")


def markdown(d: dict) -> str:
    """The table: on the CPU the headline is process CPU time (a shared machine), on CUDA synchronized wall time."""
    env = d["env"]
    dev, ver = env["device"], env["versions"]
    cpu = d["config"]["device"] == "cpu"
    main, other = ("cpu", "wall") if cpu else ("wall", "cpu")
    md = [f"# fip_fast vs its peers — {dev.get('name') if not cpu else 'CPU'}", "",
          f"* **Date**: {env['date']}; **machine**: {dev.get('name')}, {dev.get('cpu_count')} logical CPUs, "
          f"torch threads {dev.get('torch_threads')}; load average before {env['load_before']}, after "
          f"{env['load_after']}" + (" (a shared machine: read the CPU-time ratios, and as ranges)" if cpu else ""),
          f"* **Versions**: torch {ver.get('torch')}, python {ver.get('python')}, "
          f"git {str(ver.get('git_commit'))[:10]}",
          f"* **Command**: `{d['command']}`",
          f"* Interleaved rounds ({d['config']['rounds']}), one process, {d['config']['threads']} torch thread(s); "
          f"time = {'process CPU time' if cpu else 'wall time, synchronized'}, median (min–max) over rounds; "
          "ratio = ours / peer paired per round, median (min–max; IQR)."]
    if d["quick"]:
        md.append("* **--quick** run: tiny sizes, smoke test only — these numbers mean nothing")
    md += ["", f"| work | ours | peer (version) | ours ms | peer ms | ours / peer ({main}) | {other} ratio | goal |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        peer = f"{r['peer']} ({r['peer_version'] or 'n/a'})"
        if r["status"] != "ok":
            md.append(f"| {r['work']} | {r['ours']} | {peer} | – | – | skipped: {r['reason']} | – | {r['goal']} |")
            continue
        sp = {k: Spread(**r[k]) for k in (f"ours_{main}_s", f"peer_{main}_s", f"ratio_{main}", f"ratio_{other}")}
        md.append(f"| {r['work']} ({r['unit']}) | {r['ours']} | {peer} | {_ms(sp[f'ours_{main}_s'])} | "
                  f"{_ms(sp[f'peer_{main}_s'])} | {_ratio(sp[f'ratio_{main}'])} | {_ratio(sp[f'ratio_{other}'])} | "
                  f"{r['goal']} |")
    checks = [(r["group"], r["peer"], r["check"]) for r in d["rows"] if r.get("check")]
    if checks:
        md += ["", "## Checks on these inputs (agreement; for the optimizer rows, the traffic and the sides timed "
               "together)", ""]
        md += [f"* {g} vs {p}: {c}" for g, p, c in checks]
    return "\n".join(md) + "\n"


def run(cfg: Config, groups: list[str]) -> dict:
    torch.set_num_threads(cfg.threads)
    env = environment(torch.device(cfg.device))
    rows: list[Row] = []
    for name in groups:
        print(f"[peers] {name} ...", flush=True)
        for r in GROUPS[name](cfg):
            print("  " + describe(r), flush=True)
            rows.append(r)
    env["load_after"] = loadavg()
    return dict(schema=SCHEMA, quick=cfg.quick, config=asdict(cfg), groups=groups, env=env,
                rows=[asdict(r) for r in rows])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=1, help="calls per side per round")
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson products per call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (CUDA: wall time after a synchronize)")
    ap.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS), help="run these groups only")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/peers_cpu[_quick].json); the "
                                                 "markdown goes beside it")
    a = ap.parse_args(argv)
    cfg = Config(quick=a.quick, rounds=a.rounds or (2 if a.quick else 9), steps=a.steps,
                 warmup=1 if a.quick else 2, probes=a.probes, threads=a.threads, device=a.device)
    d = run(cfg, a.only)
    d["command"] = "python -m bench peers " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = device_tag(torch.device(a.device)) + ("_quick" if a.quick else "")
    out = Path(a.out) if a.out else RESULTS_DIR / f"peers_{tag}.json"
    write_json(d, out)
    out.with_suffix(".md").write_text(markdown(d))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
