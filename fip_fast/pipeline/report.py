"""The purification report: :class:`PurifyReport` (what :func:`fip_fast.pipeline.purify` returns beside the model)
and :func:`_jsonable`, the JSON conversion it and the CLI use."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import Tensor

__all__ = ["PurifyReport", "AccuracyCheck", "Retry", "ACCURACY_DROP_LIMIT", "RETRIES"]

#: The largest fall of clean accuracy (absolute, as a fraction: 0.10 = 10 points) that :func:`purify` accepts
#: silently; beyond it ``report.warnings`` says so and ``fip-fast purify`` refuses to save the model (exit 3)
#: unless ``--accept-accuracy-drop``.  Why 10 points: the honest costs measured so far stay below it (FIP on the
#: demo: 3.6 points; the fair protocol's hardest cells, 80 clean images: 4.7–5.8 points, docs/protocol.md), while
#: the failures it exists to catch are far beyond it (a diverged learning rate left 7.6 % ACC; a warm-up spike that
#: never recovered, 33 %).  On a 20-image hold-out one error is 5 points, so a tighter limit would
#: refuse good runs on noise.  See docs/own-model.md.
ACCURACY_DROP_LIMIT = 0.10

#: How many times :func:`purify` runs a purification again, from θ0 at half the learning rate, when its clean
#: accuracy fell by more than the limit (``purify(retries=…)``).  Why: the runs that lose that much are mostly a
#: learning rate too large for the model (a warm-up spike it never recovers from: docs/purify.md, "Retries"), and
#: two halvings reach a quarter of the rate.
RETRIES = 2


@dataclass
class AccuracyCheck:
    """Clean accuracy of θ0 and of the returned model on the defender's own data.

    Attributes:
        data: ``"validation"`` (the held-out clean-validation part) or ``"purification"`` (no hold-out: the
            clean samples the purification trained on — optimistic for the result, so it catches a collapse,
            not a small loss).
        n: samples measured.  before / after: accuracies in [0, 1].  drop: before − after (a fraction; > 0 is a
        loss).  limit: the accepted drop (:data:`ACCURACY_DROP_LIMIT` unless ``purify(max_accuracy_drop=…)``).
        exceeded: drop > limit.
    """

    data: str
    n: int
    before: float
    after: float
    limit: float = ACCURACY_DROP_LIMIT
    drop: float = field(init=False)
    exceeded: bool = field(init=False)

    def __post_init__(self) -> None:
        self.drop = float(self.before) - float(self.after)
        self.exceeded = bool(self.drop > self.limit) or math.isnan(self.after)

    def describe(self) -> str:
        """One sentence, e.g. "clean accuracy on the 200 clean purification samples (no validation hold-out)
        went from 98.0 % to 7.6 % (90.4 points lost, more than the accepted 10.0)"."""
        where = (f"the {self.n}-sample clean-validation part" if self.data == "validation"
                 else f"the {self.n} clean purification samples (no validation hold-out)")
        lost = f"{100 * self.drop:.1f} points lost" if self.drop > 0 else "no loss"
        s = (f"clean accuracy on {where} went from {100 * self.before:.1f} % to {100 * self.after:.1f} % "
             f"({lost}")
        return s + (f", more than the accepted {100 * self.limit:.1f})" if self.exceeded else ")")


@dataclass
class Retry:
    """A purification try that lost more clean accuracy than accepted and was abandoned: ``lrs``, the learning
    rates it ran with (the next try ran at half of each), and ``accuracy``, its :class:`AccuracyCheck`."""

    lrs: Dict[str, float]
    accuracy: AccuracyCheck


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
            the batch size, an empty validation part…) and a clean-accuracy drop beyond the limit; each was also
            logged as a warning.
        accuracy: the clean-accuracy check of the result (:class:`AccuracyCheck`; None when the labels are not
            class indices).  ``accuracy.drop`` is the accuracy lost; ``accuracy.exceeded`` says that it is more
            than ``accuracy.limit`` — the model should not be used without a look.
        retries: the abandoned tries (:class:`Retry`, in order), when the first ones lost more clean accuracy
            than accepted (``purify(retries=…)``); the returned model is the last try's.
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
    accuracy: Optional[AccuracyCheck] = None
    retries: List[Retry] = field(default_factory=list)

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

