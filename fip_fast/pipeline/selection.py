"""The clean-validation selection policy and early stop of the purify loop (clean data only, never eval_fn).

Starting accuracy a0 = clean-val accuracy of θ0.  An evaluation is *acceptable* when its clean-val accuracy is
≥ a0 − ``margin``.  The selection is the *latest* acceptable evaluation — purification keeps pushing toward a
flatter minimum, so the latest acceptable point is the most purified one (choosing the best clean accuracy would
typically choose θ0, backdoor included).  θ0 is never a candidate: while no evaluation is acceptable, the one with
the highest clean-val accuracy so far is selected.  ``patience`` consecutive evaluations below a0 − 2·``margin``
stop the loop (``patience=0`` never stops).  Without a validation part every evaluation is acceptable (the last
step is returned) and the loop never stops early.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["Selection"]


def _state_copy(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Selection:
    """What the loop asks after every evaluation: :meth:`observe`, then :meth:`should_stop`.

    Attributes:
        a0: clean-val accuracy of θ0.  margin, patience, has_val: the policy (see the module docstring).
        step: the selected step (0 before any evaluation).
        weights: a copy of the selected step's ``state_dict``; ``None`` means "the current weights" (the
            selection is the last step, or nothing was evaluated yet) — no copy of the last step is made.
        acceptable: whether the selection is acceptable.  acc: its clean-val accuracy (−1 before any).
        below: consecutive evaluations below a0 − 2·margin.
    """

    a0: float
    margin: float
    patience: int
    has_val: bool
    step: int = 0
    weights: Optional[Dict[str, Tensor]] = None
    acceptable: bool = False
    acc: float = -1.0
    below: int = 0

    def observe(self, step: int, val_acc: float, model: nn.Module, last: bool) -> bool:
        """Take the evaluation of ``step`` (``last``: the final step of the run); returns whether it is acceptable."""
        ok = not self.has_val or val_acc >= self.a0 - self.margin
        # The latest acceptable evaluation; while none is, the best clean-val accuracy so far.
        if ok or (not self.acceptable and val_acc >= self.acc):
            self.weights = None if last else _state_copy(model)
            self.step, self.acceptable, self.acc = step, bool(ok), float(val_acc)
        if ok:
            self.below = 0
        elif val_acc < self.a0 - 2 * self.margin:
            self.below += 1
        else:
            self.below = 0
        return bool(ok)

    def should_stop(self) -> bool:
        return self.has_val and int(self.patience) > 0 and self.below >= int(self.patience)

    def state_dict(self) -> Dict[str, Any]:
        """The selection part of a checkpoint (the keys are those of existing checkpoint files)."""
        return {"selected_step": self.step, "below": self.below, "sel_ok": self.acceptable, "sel_acc": self.acc,
                "selected": self.weights}

    def load_state_dict(self, state: Dict[str, Any], device: torch.device) -> None:
        self.step = int(state.get("selected_step", 0))
        self.below = int(state.get("below", 0))
        self.acceptable, self.acc = bool(state.get("sel_ok", False)), float(state.get("sel_acc", -1.0))
        sel = state.get("selected")
        self.weights = {k: v.to(device) for k, v in sel.items()} if sel is not None else None
