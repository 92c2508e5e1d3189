"""The re-tuning attack: does a purified model's backdoor come back after a little fine-tuning?

"Superficial safety" (Min et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense", NeurIPS 2024): a purified model that stays close to the backdoored one gets its trigger back when a user
fine-tunes it on a little data that happens to contain a few triggered samples.  :func:`retune_asr` measures it:
a copy of the model is fine-tuned for ``Retune.steps`` SGD steps (lr ``Retune.lr``, momentum 0.9, batch
``Retune.batch``) on the defender's clean set, every batch carrying ``Retune.per_batch`` triggered samples drawn
from a pool of ``Retune.n_trigger`` clean images with the trigger applied and the target label; the result is the
copy's ASR on the triggered test set.  A benign model (trained without poison) stays low under the same attack
(2.2 % on average over the fair protocol's 120 evaluation cells, bench/results/protocol_eval.md), so a high
re-tuned ASR means the backdoor was hidden, not removed.

The fair protocol (``bench/protocol_tasks.py``) and ``fip-fast demo`` both use this implementation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast._utils import model_device

__all__ = ["Retune", "retune", "retune_asr"]

#: Added to ``seed`` for the attack's generator, so that its draws differ from the other uses of the same seed
#: (the data split, the trigger); the fair protocol's recorded results were made with it.
_SEED_OFFSET = 977


@dataclass(frozen=True)
class Retune:
    """The re-tuning attack's settings (defaults: the fair protocol's).

    steps: SGD steps.  lr: learning rate (momentum 0.9).  batch: samples per step, ``per_batch`` of them
    triggered.  n_trigger: clean images (drawn from the clean set) that carry the trigger and the target label;
    each step's triggered samples are drawn from them with replacement."""

    steps: int = 10
    lr: float = 0.01
    batch: int = 32
    n_trigger: int = 5
    per_batch: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "n_trigger"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Retune.{name} must be an int ≥ 1, got {v!r}")
        if not isinstance(self.per_batch, int) or not 0 <= self.per_batch < self.batch:
            raise ValueError(f"Retune.per_batch must be an int in [0, batch={self.batch}), got {self.per_batch!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"Retune.lr must be a finite number > 0, got {self.lr!r}")


def _check_inputs(clean: Tuple[Tensor, Tensor], attack, cfg: Retune) -> None:
    if not callable(getattr(attack, "apply", None)):
        raise TypeError(f"attack must have an apply(x) -> x method (a fip_fast.evaluation.attacks.Attack), got "
                        f"{type(attack).__name__}")
    if not (isinstance(clean, (tuple, list)) and len(clean) == 2 and all(isinstance(t, Tensor) for t in clean)):
        raise TypeError("clean must be a pair of tensors (x (N, ...), y (N,))")
    n = clean[0].shape[0]
    if n != clean[1].shape[0] or n < cfg.n_trigger:
        raise ValueError(f"clean: {n} inputs and {clean[1].shape[0]} labels; the attack needs matching counts and "
                         f"at least n_trigger={cfg.n_trigger} samples")


def retune(model: nn.Module, clean: Tuple[Tensor, Tensor], attack, target: int, cfg: Retune = Retune(),
           seed: int = 0) -> nn.Module:
    """A copy of ``model`` after the re-tuning attack ``cfg`` (``model`` itself is not modified).

    Args:
        model: the (purified) model; the copy trains in train mode (BatchNorm statistics move) on its device.
        clean: the defender's clean set ``(x (N, C, H, W), y (N,))``, on the CPU or the model's device.
        attack: the trigger, an object with ``apply(x) -> x`` (:class:`fip_fast.evaluation.attacks.Attack`).
        target: the attack's target class.  seed: seeds the choice of triggered images and of every batch.
    Returns:
        the re-tuned copy, in eval mode.
    """
    _check_inputs(clean, attack, cfg)
    m = copy.deepcopy(model).train()
    dev = model_device(m)
    xc, yc = clean
    g = torch.Generator().manual_seed(seed + _SEED_OFFSET)
    # The draw order (pool, then per step: clean indices, triggered indices) is the fair protocol's: same seed,
    # same batches, same result.
    pick = torch.randperm(xc.shape[0], generator=g)[:cfg.n_trigger]
    xt = attack.apply(xc[pick.to(xc.device)])
    yt = torch.full((xt.shape[0],), int(target), dtype=torch.long, device=yc.device)
    opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=0.9)
    for _ in range(cfg.steps):
        i = torch.randint(xc.shape[0], (cfg.batch - cfg.per_batch,), generator=g).to(xc.device)
        j = torch.randint(xt.shape[0], (cfg.per_batch,), generator=g).to(xt.device)
        x, y = torch.cat([xc[i], xt[j]]).to(dev), torch.cat([yc[i], yt[j]]).to(dev)
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.eval()


def retune_asr(model: nn.Module, clean: Tuple[Tensor, Tensor], triggered: Tuple[Tensor, Tensor], attack,
               target: int, cfg: Retune = Retune(), seed: int = 0) -> float:
    """ASR in [0, 1] of a copy of ``model`` after the re-tuning attack (:func:`retune`; ``model`` is not modified).

    ``triggered``: the triggered test set ``(x_trig (M, ...), y_true (M,))``; ASR counts the inputs whose true
    class is not ``target`` that the re-tuned copy classifies as ``target``."""
    from fip_fast.evaluation.metrics import attack_success_rate

    m = retune(model, clean, attack, target, cfg, seed)
    return float(attack_success_rate(m, triggered[0], triggered[1], int(target)))
