"""Why does FIP leave SIG on the demo CNN?  Where each attack's trigger lives, and how much of it FIP removes.

::

    python -m bench trigger_probe                       # → bench/results/trigger_probe_cpu.json + .md
    python -m bench trigger_probe --cells cnn/sig cnn/badnets

For each protocol cell (seed 0, 10 % clean set, 10 % poison — the models of ``bench.protocol``'s cache) and each
defense (``--methods``, default FIP) at its frozen protocol choice (``bench/results/protocol_dev.json``) with the
protocol's budget (100 steps of batch 64):

* **Input space** — the trigger's mean perturbation u = mean(x_triggered − x) over the test images: its norm, and
  the variance of the defender's clean images along û relative to their mean variance per pixel ("clean spread":
  0 means no clean image varies there, a blind spot of the clean data).
* **Feature space** — at the input of the last Linear layer (the features the head reads): the trigger's mean
  feature shift d = mean h(x_triggered) − mean h(x) and its norm before and after FIP; the defender's clean
  spread along d̂; the target logit's gain along d, (w_target − mean_c w_c)·d; the share of the defender's
  clean images on which the 8 units the trigger raises most are active; and the cosine between d and the target
  class's own direction among the defender's clean features (how much the trigger looks like the class).
* ASR before and after (test set; measured, never used to choose anything).

The question is a diagnosis, not a selection: nothing here feeds back into a default.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import RESULTS_DIR, environment, write_json

DEFAULT_CELLS = ("cnn/sig", "cnn/badnets", "cnn/blend", "cnn/trojan", "cnn/wanet", "resnet/sig")
TOP_UNITS = 8


@dataclass
class Probe:
    """One cell's measurements (norms in input / feature units, spreads relative to the mean direction)."""

    cell: str
    method: str
    input_norm: float              # mean ‖x_triggered − x‖
    input_spread: float            # clean variance along û / mean clean variance per pixel
    feature_shift_before: float    # ‖d‖ before FIP
    feature_shift_after: float     # ‖d‖ after FIP
    feature_spread: float          # clean variance along d̂ / mean clean variance per feature (before)
    logit_gain_before: float       # (w_target − mean w)·d
    logit_gain_after: float
    top_units_active_clean: float  # share of (clean image, top unit) pairs with the unit active
    target_alignment: float        # cos(d, mean clean feature of the target class − mean clean feature), before
    asr_before: float
    asr_after: float
    acc_before: float
    acc_after: float


def relative_spread(X: Tensor, u: Tensor) -> float:
    """Variance of the rows of ``X`` (n, d) along the unit vector of ``u`` (d,), over their mean variance per
    coordinate: 1 for an isotropic cloud, 0 where the rows never vary along u."""
    un = u / u.norm().clamp_min(1e-12)
    return ((X @ un).var() / X.var(0).mean().clamp_min(1e-12)).item()


def _head(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def head_features(model: nn.Module, x: Tensor, batch: int = 500) -> Tensor:
    """Features at the input of the model's last Linear layer, (n, d), in eval mode and without gradients."""
    from fip_fast.evaluation.metrics import eval_mode

    feats: list[Tensor] = []
    hook = _head(model).register_forward_hook(lambda m, a, o: feats.append(a[0].detach().flatten(1)))
    try:
        with torch.no_grad(), eval_mode(model):
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        hook.remove()
    return torch.cat(feats)


def frozen_choice(method: str) -> dict:
    """The method's configuration frozen by the protocol's development stage."""
    import json

    from bench.protocol import ROOT

    chosen = json.loads((ROOT / "protocol_dev.json").read_text())["chosen"]
    if method not in chosen:
        raise ValueError(f"no frozen protocol choice for {method!r}; choose from {sorted(chosen)}")
    return chosen[method]["cfg"]


def probe(arch: str, attack: str, cache: Path, method: str = "fip", seed: int = 0) -> Probe:
    from bench.protocol import BATCH, STEPS
    from bench.protocol_tasks import Cell, build_task, measure
    from fip_fast.pipeline import purify

    cell = Cell(arch, attack, seed, 0.1, 0.1)
    task = build_task(cell, cache)
    (xt, yt), (xtr, _), (xc, yc) = task.test, task.triggered, task.clean
    keep = yt != cell.target                       # triggered_test keeps the non-target images, in order
    if len(xtr) != int(keep.sum()):
        raise RuntimeError(f"{cell.key}: {len(xtr)} triggered images for {int(keep.sum())} non-target test images; "
                           "the probe pairs each triggered image with its clean original")
    dx = (xtr - xt[keep]).flatten(1)
    model0 = task.model
    model1, _ = purify(copy.deepcopy(model0), task.clean, method=method, steps=STEPS, batch_size=BATCH, seed=seed,
                       progress=False, **frozen_choice(method))    # in place: keep θ0 for the "before" column
    out = {}
    for tag, m in (("before", model0), ("after", model1)):
        hc, ht = head_features(m, xt), head_features(m, xtr)
        d = ht.mean(0) - hc[keep].mean(0)
        W = _head(m).weight.detach()
        out[tag] = dict(d=d, hc=hc, ht=ht, gain=((W[cell.target] - W.mean(0)) @ d).item(), **measure(m, task))
    b, a = out["before"], out["after"]
    hd = head_features(model0, xc)
    own = hd[yc == cell.target].mean(0) - hd.mean(0)
    hck = b["hc"][keep]
    z = (b["ht"].mean(0) - hck.mean(0)) / (hck.std(0) + 1e-3)
    top = z.argsort(descending=True)[:TOP_UNITS]
    return Probe(cell=cell.key, method=method, input_norm=dx.norm(dim=1).mean().item(),
                 input_spread=relative_spread(xc.flatten(1), dx.mean(0)),
                 feature_shift_before=b["d"].norm().item(), feature_shift_after=a["d"].norm().item(),
                 feature_spread=relative_spread(hd, b["d"]), logit_gain_before=b["gain"], logit_gain_after=a["gain"],
                 top_units_active_clean=(hd[:, top] > 0).float().mean().item(),
                 target_alignment=torch.nn.functional.cosine_similarity(b["d"], own, dim=0).item(),
                 asr_before=b["asr"], asr_after=a["asr"], acc_before=b["acc"], acc_after=a["acc"])


def markdown(d: dict) -> str:
    env = d["env"]
    lines = ["# Where each trigger lives, and how much of it FIP removes — CPU", "",
             f"* **Date**: {env['date']}; torch {env['versions']['torch']}; git {env['versions']['git_commit']}",
             f"* **Command**: `{d['command']}`", "",
             "| cell | method | ‖Δx‖ | clean spread along Δx | ‖d‖ before → after (÷) | clean spread along d | "
             "target-logit gain along d | top units active on clean | cos(d, target class) | "
             "ASR % before → after | ACC % before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in d["probes"]:
        ratio = p["feature_shift_before"] / max(p["feature_shift_after"], 1e-12)
        lines.append(f"| {p['cell']} | {p['method']} | {p['input_norm']:.2f} | {p['input_spread']:.2f} | "
                     f"{p['feature_shift_before']:.1f} → {p['feature_shift_after']:.1f} (÷{ratio:.1f}) | "
                     f"{p['feature_spread']:.1f} | {p['logit_gain_before']:.1f} → {p['logit_gain_after']:.1f} | "
                     f"{100 * p['top_units_active_clean']:.0f} % | {p['target_alignment']:.2f} | "
                     f"{100 * p['asr_before']:.1f} → "
                     f"{100 * p['asr_after']:.1f} | {100 * p['acc_before']:.1f} → {100 * p['acc_after']:.1f} |")
    if d.get("conclusion"):
        lines += ["", d["conclusion"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    from bench.protocol_tasks import default_cache

    ap = argparse.ArgumentParser(prog="python -m bench trigger_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="arch/attack, e.g. cnn/sig")
    ap.add_argument("--methods", nargs="+", default=["fip"], help="defenses, each at its frozen protocol choice")
    ap.add_argument("--cache", type=Path, default=None, help="backdoored-model cache (default: the protocol's)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "trigger_probe_cpu.json")
    ap.add_argument("--conclusion", default="")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    for c in a.cells:
        if c.count("/") != 1:
            ap.error(f"--cells takes arch/attack (e.g. cnn/sig), got {c!r}")
    torch.set_num_threads(1)
    cache = a.cache or default_cache()
    probes = [asdict(probe(*c.split("/"), cache, method=m)) for c in a.cells for m in a.methods]
    d = dict(env=environment(torch.device("cpu")), command=" ".join(["python -m bench trigger_probe"] + argv),
             probes=probes, conclusion=a.conclusion)
    write_json(d, a.out)
    a.out.with_suffix(".md").write_text(markdown(d))
    print(markdown(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
