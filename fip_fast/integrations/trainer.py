"""Closure-free FIP in other people's training loops (GitHub issue 9).

``FIP(..., trace_estimator="lagged")`` needs no closure, so it drops into any loop that calls
``optimizer.step()`` — Hugging Face ``Trainer``, ``torch.amp.GradScaler``, gradient accumulation, DDP,
``torch.compile``d models.  The one thing such loops do not know is that, between two steps, the model may hold
*perturbed* weights θ + e (METHOD.md "Closure-free suppressor").  This module provides what removes e at the
right moments:

:class:`FIPCallback` (a ``transformers.TrainerCallback``; ``transformers`` is imported lazily)
    Takes the perturbation off before the ``Trainer`` evaluates, saves a checkpoint or stops, puts it back before
    the next training forward pass, and at the end of training removes it for good.  Usage::

        opt = FIP(model.parameters(), trace_estimator="lagged", lr=1e-3, eta_F=1e-3, rho=0.05)
        trainer = Trainer(model, args, train_dataset=ds, eval_dataset=ev, optimizers=(opt, None),
                          callbacks=[FIPCallback(opt)])
        trainer.train()          # weights are unperturbed afterwards; checkpoints hold unperturbed weights

:func:`drop_perturbation`
    Remove the lagged perturbation *permanently* (θ ← θ − e, e ← 0): call it at the end of a hand-written loop
    before using or saving the model.  The optimizer stays consistent — a later ``step()`` restores nothing and
    the suppressor resumes at its next scheduled call.  (``with opt.unperturbed():`` is the *temporary* version,
    for evaluating or saving in the middle of training.)

:func:`find_fip`
    The :class:`~fip_fast.FIP` inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, …), or ``None``.

Why hooks rather than ``on_evaluate`` / ``on_save``: in the ``Trainer`` (transformers 4.4x–5.x) those two events
fire *after* the evaluation / the checkpoint was written.  The order after an optimizer step is::

    optimizer.step() → on_optimizer_step → lr_scheduler.step() → on_step_end
        → [log] → [evaluate → on_evaluate] → [save checkpoint → on_save]
    (end of epoch: on_epoch_end → [log] → [evaluate] → [save];   end of training: [load best] → on_train_end)
    next step: on_step_begin → forward/backward of each micro-batch → …

so :class:`FIPCallback` removes the perturbation in ``on_step_end`` / ``on_epoch_end`` when the control flags say
that an evaluation, a save or the end of training follows (``should_evaluate``, ``should_save``,
``should_training_stop``, or ``global_step ≥ max_steps``; with ``always=True`` after every step), and puts it
back in ``on_step_begin`` / ``on_epoch_begin``, which come before the next forward pass.  Checkpoints therefore
hold the unperturbed model and an optimizer state dict marked perturbed: on ``resume_from_checkpoint`` the
``Trainer`` loads the model first and then the optimizer, whose ``load_state_dict`` re-applies e — the
uninterrupted trajectory continues.  Removing and re-applying e is (θ + e) − e + e, so weights may differ from an
uninterrupted run by one rounding of the parameter dtype at each evaluation or save.
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
