"""The purification report: :class:`PurifyReport` (what :func:`fip_fast.pipeline.purify` returns beside the model)
and :func:`_jsonable`, the JSON conversion it and the CLI use."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

from torch import Tensor

__all__ = ["PurifyReport"]


@dataclass
class PurifyReport:
    """What :func:`purify` returns beside the model.  ``to_dict()`` gives a JSON-serializable dict.

    Attributes:
        method: the method name.  config: every option used (defaults merged with the user's).
        steps_run: optimizer steps actually taken (≤ ``config["steps"]``; fewer after early stopping).
        selected_step: the step whose weights were returned (see the module docstring, selection rule).
        stopped_early: whether the clean-val early stop fired.
        trainable_params / total_params: scalars updated by the method / in the model.
        initial / final: clean-val metrics (``val_loss``, ``val_acc``) and ``eval_fn`` results (under
            ``"eval"``) of θ0 and of the returned model.
        history: one dict per evaluation: ``step``, ``train_loss`` (mean since the last evaluation),
            ``val_loss``, ``val_acc``, ``eval`` (eval_fn results or absent), ``elapsed_s``.
        timings: seconds: ``setup`` (Fisher, reparameterization), ``loop`` (steps only), ``eval`` (validation +
            eval_fn), ``finalize``, ``total``.
        skipped_steps: steps skipped for non-finite gradients.  resumed_from: checkpoint step (0 if none).
        extra: method-specific information (e.g. a runner's ``info`` dict).
        warnings: silent degradations found in the inputs (a single-class clean set, fewer clean samples than
            the batch size, an empty validation part…); each was also logged as a warning.
    """

    method: str
    config: Dict[str, Any]
    steps_run: int = 0
    selected_step: int = 0
    stopped_early: bool = False
    trainable_params: int = 0
    total_params: int = 0
    initial: Dict[str, Any] = field(default_factory=dict)
    final: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    resumed_from: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def summary(self) -> str:
        f = self.final
        a0 = self.initial.get('val_acc', float('nan'))
        return (f"{self.method}: {self.steps_run} steps (selected {self.selected_step}"
                f"{', stopped early' if self.stopped_early else ''}), val_acc {a0:.4f}"
                f" -> {f.get('val_acc', float('nan')):.4f}, trainable {self.trainable_params:,} / "
                f"{self.total_params:,}, {self.timings.get('total', float('nan')):.1f} s")


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else (1e308 if o > 0 else -1e308)
    if isinstance(o, (bool, int, float, str)) or o is None:
        return o
    if isinstance(o, type):
        return o.__name__
    return repr(o)

