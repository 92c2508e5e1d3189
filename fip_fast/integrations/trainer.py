"""Closure-free FIP in other people's training loops.

``FIP(..., trace_estimator="lagged")`` needs no closure, so it drops into any loop that calls
``optimizer.step()`` — Hugging Face ``Trainer``, ``torch.amp.GradScaler``, gradient accumulation, DDP,
``torch.compile``d models.  The stored perturbation e is applied lazily, at the first training
forward after a step (:class:`fip_fast.optim.FIP`), so **between steps the model always holds the unperturbed θ**:
evaluation, checkpoints and the end of training need nothing from this module.  What it still provides:

:func:`find_fip`
    The :class:`~fip_fast.FIP` inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, …), or ``None``.
:func:`drop_perturbation`
    Discard the stored lagged perturbation (and take it off if it is applied): the next step is a plain one and the
    suppressor resumes at its next scheduled call.  Accepts wrappers.
:class:`FIPCallback` (a ``transformers.TrainerCallback``; ``transformers`` is imported lazily)
    Kept for code written when the model held θ + e between steps.  It takes an *applied* e off
    in ``on_step_end`` / ``on_epoch_end`` when an evaluation, a save or the end of training follows (or after every
    step with ``always=True``), puts it back in ``on_step_begin`` / ``on_epoch_begin``, and discards e at
    ``on_train_end``.  With the lazy perturbation nothing is applied at those points, so it changes nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

# FIPCallback is made on first access by the module __getattr__ below (transformers is imported lazily).
__all__ = ["FIPCallback", "drop_perturbation", "find_fip", "is_lagged"]  # noqa: F822


def find_fip(optimizer: Any) -> Any:
    """The :class:`fip_fast.FIP` behind ``optimizer`` (unwrapping ``.optimizer`` / ``._optimizer`` attributes of
    wrappers such as accelerate's ``AcceleratedOptimizer``), or ``None`` if there is none."""
    from fip_fast.optim import FIP

    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, FIP):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def is_lagged(opt: Any) -> bool:
    """Whether any parameter group of ``opt`` (a FIP, possibly wrapped) uses ``trace_estimator="lagged"``."""
    fip = find_fip(opt)
    return fip is not None and any(g.get("trace_estimator") == "lagged" for g in fip.param_groups)


@torch.no_grad()
def drop_perturbation(opt: Any) -> None:
    """Remove the lagged perturbation for good: θ ← θ − e and e ← 0 (``state["pert"]``) for every parameter.

    Use it where training *ends* (before evaluating, saving or returning the model of a hand-written loop).  The
    optimizer stays consistent: the next ``step()`` has nothing to restore, uses the plain gradient, and the
    suppressor resumes at its next scheduled call.  Idempotent; a no-op for the other estimators.  Inside
    ``opt.unperturbed()`` the parameters already hold θ, so only e is zeroed (leaving the block then re-applies
    nothing).  θ is recovered as (θ + e) − e, like every lagged restore (one rounding of the parameter dtype).
    """
    fip = find_fip(opt)
    if fip is None:
        raise TypeError(f"drop_perturbation needs a fip_fast.FIP (or a wrapper of one), got {type(opt).__name__}")
    fip.remove_perturbation()


class _FIPCallbackMixin:
    """The logic of :class:`FIPCallback`, independent of ``transformers`` (see the module docstring)."""

    def __init__(self, optimizer: Any = None, *, always: bool = False):
        self._given = optimizer
        self.always = always
        self._stack: Optional[contextlib.ExitStack] = None
        self.suspensions = 0          # how many times the perturbation was taken off (for tests / logging)

    # -- helpers
    def _fip(self, kwargs: dict) -> Any:
        fip = find_fip(self._given) if self._given is not None else find_fip(kwargs.get("optimizer"))
        return fip if fip is not None and is_lagged(fip) else None

    @property
    def suspended(self) -> bool:
        """Whether the callback currently holds the perturbation off the parameters."""
        return self._stack is not None

    def _suspend(self, kwargs: dict) -> None:
        fip = self._fip(kwargs)
        if fip is None or self._stack is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(fip.unperturbed())
        self._stack = stack
        self.suspensions += 1

    def _resume(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()             # re-applies θ + e

    @staticmethod
    def _pending(state: Any, control: Any) -> bool:
        max_steps = getattr(state, "max_steps", 0) or 0
        return bool(control.should_evaluate or control.should_save or control.should_training_stop
                    or (max_steps > 0 and state.global_step >= max_steps))

    # -- events
    def on_train_begin(self, args, state, control, **kwargs):
        self._resume()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._resume()

    def on_step_begin(self, args, state, control, **kwargs):
        self._resume()

    def on_step_end(self, args, state, control, **kwargs):
        if self.always or self._pending(state, control):
            self._suspend(kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.always or self._pending(state, control):
            self._suspend(kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        fip = self._fip(kwargs)
        if fip is None:
            self._resume()
            return
        # Weights may have been reloaded meanwhile (load_best_model_at_end) — they are unperturbed if we are
        # suspended, so only e is zeroed; otherwise θ ← θ − e.  Either way the model ends unperturbed and the
        # optimizer consistent (e = 0), ready for another train() call.
        drop_perturbation(fip)
        self._resume()                # re-applies e = 0: a no-op on the values, clears FIP's suspended flag


_CLASS = None


def _callback_class():
    global _CLASS
    if _CLASS is None:
        try:
            from transformers import TrainerCallback
        except ImportError as exc:    # pragma: no cover - depends on the environment
            raise ImportError("fip_fast.integrations.FIPCallback needs transformers (pip install transformers)"
                              ) from exc

        class FIPCallback(_FIPCallbackMixin, TrainerCallback):
            """``transformers.TrainerCallback`` keeping a lagged :class:`fip_fast.FIP`'s perturbation out of
            evaluation, checkpoints and the final weights.

            Args:
                optimizer: the FIP (or a wrapper); default: the ``optimizer`` the ``Trainer`` passes to events.
                always: take the perturbation off after *every* optimizer step (so that any other callback's
                    ``on_step_end`` / ``on_log`` sees θ), not only before an evaluation, a save or the end —
                    two extra element-wise passes over the parameters per suppressor step.
            """

            def __init__(self, optimizer: Any = None, *, always: bool = False):
                _FIPCallbackMixin.__init__(self, optimizer, always=always)

        FIPCallback.__module__ = __name__
        _CLASS = FIPCallback
    return _CLASS


def __getattr__(name: str):
    if name == "FIPCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
