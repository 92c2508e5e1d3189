"""The records, the timing and the checks every group of :mod:`bench.peers` shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .. import percentile, time_interleaved


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Spread:
    """Seconds (or a ratio) over rounds."""
    median: float
    min: float
    max: float
    p25: float
    p75: float

    @classmethod
    def of(cls, xs: list[float]) -> "Spread":
        return cls(percentile(xs, 50), min(xs), max(xs), percentile(xs, 25), percentile(xs, 75))


@dataclass
class Row:
    """One line of the table: fip_fast's side against one peer, or why the peer was skipped."""
    group: str
    work: str
    ours: str
    peer: str
    peer_version: Optional[str]
    unit: str                                  # what one timed call is, e.g. "per step", "per probe"
    goal: str
    status: str = "ok"                         # "ok" | "skipped"
    reason: str = ""
    ours_cpu_s: Optional[Spread] = None
    peer_cpu_s: Optional[Spread] = None
    ours_wall_s: Optional[Spread] = None
    peer_wall_s: Optional[Spread] = None
    ratio_cpu: Optional[Spread] = None         # ours / peer, paired per round
    ratio_wall: Optional[Spread] = None
    check: dict[str, Any] = field(default_factory=dict)   # correctness of the pair on these inputs


@dataclass
class Side:
    """A timed callable; ``per`` divides its time (e.g. the number of probes one call makes)."""
    name: str
    fn: Callable[[], Any]
    per: int = 1


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _missing(module: str, dist: str) -> Optional[str]:
    """Why the peer ``module`` cannot be used here, or None; ``dist``: what to ``pip install --no-deps``."""
    try:
        __import__(module)
    except Exception as exc:       # not installed, or broken by its own imports
        return (f"{module} not importable ({type(exc).__name__}: {exc}); install with "
                f"`pip install --no-deps {dist}` (docs/peers.md)")
    return None


def _synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)       # the work, not its launch
    return call


def measure(sides: list[Side], cfg: "Config", steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Per side: ``{"cpu": [...], "wall": [...]}`` seconds per call / ``per``, one value per interleaved round."""
    dev = torch.device(cfg.device)
    w, c = time_interleaved([_synced(s.fn, dev) for s in sides], min_rounds=cfg.rounds, max_rounds=cfg.rounds,
                            steps=steps, warmup=warmup)
    return {s.name: dict(wall=[x / s.per for x in wi], cpu=[x / s.per for x in ci]) for s, wi, ci in zip(sides, w, c)}


def fill(row: Row, t: dict, ours: str, peer: str) -> Row:
    a, b = t[ours], t[peer]
    row.ours_cpu_s, row.peer_cpu_s = Spread.of(a["cpu"]), Spread.of(b["cpu"])
    row.ours_wall_s, row.peer_wall_s = Spread.of(a["wall"]), Spread.of(b["wall"])
    row.ratio_cpu = Spread.of([x / y for x, y in zip(a["cpu"], b["cpu"])])
    row.ratio_wall = Spread.of([x / y for x, y in zip(a["wall"], b["wall"])])
    return row


def _max_rel(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """max |a − b| / max |b| over all tensors (one scale for the whole model)."""
    scale = max(float(b.abs().max()) for b in theirs) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) / scale


@dataclass
class Config:
    quick: bool = False
    rounds: int = 9
    steps: int = 1              # calls per side per round (the optimizer group makes 4× as many: a step is short)
    warmup: int = 2
    probes: int = 16            # Hutchinson products per call
    threads: int = 1
    device: str = "cpu"
