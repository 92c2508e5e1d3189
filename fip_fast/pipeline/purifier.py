"""What the purify loop drives: :class:`Purifier` (the interface of ``kind="loop"`` methods), the
:class:`OptimizerPurifier` made of a model + optimizer + loss, and the :class:`MethodContext` a builder gets."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fip_fast.pipeline.data import LossFn

__all__ = ["MethodContext", "Purifier", "OptimizerPurifier", "SpectralAdamW"]


@dataclass
class MethodContext:
    """What a ``kind="loop"`` builder gets besides the model and its options."""

    x_train: Tensor                 # the purification part of the clean data (CPU or device)
    y_train: Tensor
    device: torch.device
    loss_fn: LossFn
    seed: int
    progress: bool
    resuming: bool = False          # True when the optimizer state will be loaded from a checkpoint
    rank: int = 0                   # this process's rank and the number of processes (purify(distributed=…))
    world_size: int = 1

    def fisher_loader(self, batch_size: int = 128) -> List[Tuple[Tensor, Tensor]]:
        """The purification data as a list of batches (no replacement), for Fisher estimation.

        In a distributed run (``world_size > 1``) only this rank's contiguous share of the samples
        (:func:`fip_fast.integrations.distributed.shard_indices`): :func:`fip_fast.estimate_fisher` all-reduces the
        sums and sample counts, so every rank gets F0 of the whole purification part."""
        lo, hi = 0, self.x_train.shape[0]
        if self.world_size > 1:
            from fip_fast.integrations.distributed import shard_indices

            r = shard_indices(hi, self.rank, self.world_size)
            lo, hi = r.start, r.stop
        return [(self.x_train[i:min(i + batch_size, hi)], self.y_train[i:min(i + batch_size, hi)])
                for i in range(lo, hi, batch_size)]


class Purifier:
    """What the purify loop drives (``kind="loop"`` methods).  Subclass or use :class:`OptimizerPurifier`."""

    params: List[Tensor] = []
    optimizer: Optional[torch.optim.Optimizer] = None

    def step(self, x: Tensor, y: Tensor) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def unperturbed(self) -> ContextManager:
        """Inside the block the model holds its true (unperturbed) weights."""
        return contextlib.nullcontext()

    def finalize(self, model: nn.Module) -> nn.Module:
        """Called once at the end with unperturbed weights: e.g. merge a reparameterization back."""
        return model

    def distribute(self, wrap: Optional[Callable[[nn.Module], nn.Module]]) -> None:
        """Run the training forward/backward of :meth:`step` through ``wrap(model)`` from now on (``purify``
        passes a ``DistributedDataParallel`` wrapper under ``distributed="ddp"``); ``wrap=None`` goes back to the
        plain model.  A purifier that cannot do this does not support distributed purification."""
        raise NotImplementedError(f"{type(self).__name__} does not implement distribute(): this method cannot run "
                                  "under purify(distributed=…); use OptimizerPurifier or implement distribute()")

    @property
    def skipped_steps(self) -> int:
        return int(getattr(self.optimizer, "skipped_steps", 0) or 0)

    def info(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """What the purifier holds beyond the model's and the optimizer's state (written into checkpoints; tensors
        and plain values only, for ``torch.load(weights_only=True)``)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when the loop resumes (``state`` is ``{}`` for a checkpoint that holds none)."""


def _bn_stats_snapshot(model: nn.Module) -> List[Tuple[Tensor, Tensor]]:
    """Copies of every BatchNorm running statistic (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    from torch.nn.modules.batchnorm import _NormBase

    out: List[Tuple[Tensor, Tensor]] = []
    for m in model.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name, None)
                if buf is not None:
                    out.append((buf, buf.detach().clone()))
    return out


def _bn_stats_restore(snapshot: List[Tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buf, saved in snapshot:
            buf.copy_(saved)


class OptimizerPurifier(Purifier):
    """A purifier made of a model, an optimizer and a loss: ``optimizer.step(closure)`` per batch.

    The closure zeroes the gradients, runs the model in train mode and back-propagates ``loss_fn`` (mean
    cross-entropy by default) — the FIP optimizer calls it a second time on ``"fd"`` suppressor steps.

    A step the optimizer skips (non-finite gradients: its ``skipped_steps`` count goes up) leaves the
    parameters untouched; :meth:`step` then also restores the BatchNorm running statistics, which the forward
    pass of the closure already updated with the very batch statistics (often NaN / Inf) that caused the skip.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Optional[LossFn] = None,
                 finalize: Optional[Callable[[nn.Module], nn.Module]] = None,
                 penalty: Optional[Callable[[], Tensor]] = None):
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or F.cross_entropy
        self.penalty = penalty
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._finalize = finalize
        self._out_loss: Optional[Callable[[Tensor], Tensor]] = None   # a term of the outputs (holding: distill)

    def _closure(self, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        """The closure :meth:`step` hands ``optimizer.step`` (a subclass may wrap it: see
        :class:`fip_fast.pipeline.holding.HoldingPurifier`, which takes the gradients at a shifted point)."""
        from fip_fast.optim import frozen_running_stats

        model, opt, loss_fn = self.model, self.optimizer, self.loss_fn

        def closure():
            opt.zero_grad(set_to_none=True)
            # The perturbed (second) pass must not fold θ + e's statistics into BatchNorm's running estimates.
            with frozen_running_stats(model) if getattr(opt, "perturbed_pass", False) else contextlib.nullcontext():
                out = model(x)
            loss = loss_fn(out, y)
            if self._out_loss is not None:
                loss = loss + self._out_loss(out)
            if self.penalty is not None:
                loss = loss + self.penalty()
            if hasattr(opt, "backward"):
                opt.backward(loss)
            else:
                loss.backward()
            return loss
        return closure

    def step(self, x: Tensor, y: Tensor) -> float:
        model, opt = self.model, self.optimizer
        closure = self._closure(x, y)
        model.train()
        skipped0 = self.skipped_steps
        bn = _bn_stats_snapshot(model)
        loss = opt.step(closure)
        if bn and self.skipped_steps > skipped0:
            _bn_stats_restore(bn)
        return float(loss.detach()) if isinstance(loss, Tensor) else (float(loss) if loss is not None else float("nan"))

    def unperturbed(self) -> ContextManager:
        fn = getattr(self.optimizer, "unperturbed", None)
        return fn() if fn is not None else contextlib.nullcontext()

    def finalize(self, model: nn.Module) -> nn.Module:
        return self._finalize(model) if self._finalize is not None else model

    def distribute(self, wrap: Optional[Callable[[nn.Module], nn.Module]]) -> None:
        """The closure calls ``wrap(model)`` (e.g. DDP) instead of the model; ``wrap=None`` undoes it."""
        base = getattr(self, "_base_model", None)
        if wrap is None:
            if base is not None:
                self.model, self._base_model = base, None
            return
        if base is not None:
            raise RuntimeError("distribute() was already called; call distribute(None) first")
        self._base_model = self.model
        self.model = wrap(self.model)



class SpectralAdamW(torch.optim.Optimizer):
    r"""The optimizer of Fast FIP's ``delta_optimizer="adamw"`` variant (see
    :func:`fip_fast.pipeline.methods.build_fast_fip`): the FIP objective's direction, stepped by AdamW for the δ
    groups and by FIP's SGD + momentum for the others.

    Per step, for every group (pure PyTorch, no fused kernels — the groups are small: δ and biases / BN affine):

    * g = the gradient of the closure's loss at θ;
    * on suppressor calls (``eta_F > 0``, every ``trace_every``-th call), the fd suppressor (docs/method.md):
      e = ρ·g/‖g‖ (the group's global norm, ρ its own ``rho``), g' = the gradient at θ + e (second closure call,
      :attr:`perturbed_pass` True so the purifier freezes BatchNorm's running statistics), θ = (θ + e) − e,
      d = g + c·(g' − g) with c = min(2·η_F·‖g‖/ρ, max_mix) (at the cap: a SAM step of radius ρ);
      otherwise d = g;
    * d += η_r·F0·(θ − θ0) where ``fisher0`` has an entry;
    * d is clipped to global norm ``clip_norm`` over the group (0, the default, disables);
    * ``kind="adamw"`` groups: one AdamW step: m = β1·m + (1 − β1)·d, v = β2·v + (1 − β2)·d²,
      θ ← θ − lr·(m̂/(√v̂ + eps) + wd·θ) (bias-corrected; decoupled weight decay, 0 on δ by default — it would pull
      δ toward 0, i.e. toward θ0);
    * ``kind="sgd"`` groups: d += wd·θ, buf = μ·buf + d, θ ← θ − lr·buf (FIP's update without the anchor's fused
      kernel).

    The normalized update is what working spectral fine-tuning methods use (SVDiff: Adam at 1e-3, SVFT: AdamW
    with warm-up and cosine): raw δ-gradients differ by orders of magnitude between layers and between the
    singular values of one layer (∂ℓ/∂δ_i scales with S_i when s = S·(1 + δ)), so one SGD rate either leaves most
    δ unmoved or blows up the largest.  AdamW moves every δ_i by ≈ lr per step whatever its gradient's scale.

    A step whose gradients (at θ or at θ + e) contain NaN/Inf changes nothing (parameters, moments) and is counted
    in :attr:`skipped_steps`.
    """

    def __init__(self, params, *, lr: float, kind: str = "adamw", momentum: float = 0.9, weight_decay: float = 0.0,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip_norm: float = 0.0,
                 eta_F: float = 0.0, rho: float = 0.05, max_mix: float = 1.0, trace_every: int = 1,
                 eta_r: float = 0.0, fisher0: Optional[Dict[Tensor, Tensor]] = None):
        defaults = dict(lr=lr, kind=kind, momentum=momentum, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        clip_norm=clip_norm, eta_F=eta_F, rho=rho, max_mix=max_mix, trace_every=int(trace_every),
                        eta_r=eta_r)
        self.perturbed_pass = False
        self._skipped = 0
        self._calls = 0
        super().__init__(params, defaults)
        for p, f0 in (fisher0 or {}).items():
            st = self.state[p]
            st["anchor"] = p.detach().clone()
            st["fisher0"] = f0.detach().to(device=p.device, dtype=torch.float32).clone()

    def add_param_group(self, param_group: dict) -> None:
        g = {**self.defaults, **param_group}
        _validate_group(g)
        super().add_param_group(param_group)

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["spectral_adamw"] = {"calls": self._calls, "skipped": self._skipped}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("spectral_adamw", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "spectral_adamw"})
        self._calls, self._skipped = int(extra.get("calls", 0)), int(extra.get("skipped", 0))

    @staticmethod
    def _grads(group: dict) -> List[Tensor]:
        return [p.grad.detach().to(_acc(p)) if p.grad is not None else torch.zeros_like(p, dtype=_acc(p))
                for p in group["params"]]

    @staticmethod
    def _finite(gs: List[Tensor]) -> bool:
        return all(bool(torch.isfinite(g).all()) for g in gs)

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        if closure is None:
            raise ValueError("SpectralAdamW.step needs a closure (the fd suppressor evaluates the loss twice)")
        with torch.enable_grad():
            loss = closure()
        groups = self.param_groups
        g = [self._grads(h) for h in groups]
        call, self._calls = self._calls, self._calls + 1
        if not all(self._finite(x) for x in g):
            self._skipped += 1
            return loss
        sup = [h["eta_F"] > 0 and call % h["trace_every"] == 0 for h in groups]
        d = g
        if any(sup):
            d = self._suppressed(closure, g, sup)
            if d is None:
                self._skipped += 1
                return loss
        with torch.no_grad():
            for h, dh in zip(groups, d):
                self._update(h, dh)
        return loss

    @torch.no_grad()
    def _suppressed(self, closure, g, sup) -> Optional[List[List[Tensor]]]:
        """The fd-suppressed directions d of every group (None: the perturbed gradient was not finite)."""
        groups = self.param_groups
        es, mixes = [], []
        for h, gh, s in zip(groups, g, sup):
            if not s:
                es.append(None)
                mixes.append(0.0)
                continue
            norm = torch.sqrt(sum((x * x).sum() for x in gh)) if gh else torch.zeros(())
            scale = h["rho"] / float(norm.clamp_min(1e-12))
            e = [x * scale for x in gh]
            for p, ei in zip(h["params"], e):
                p.add_(ei.to(p.dtype))
            es.append(e)
            mixes.append(min(2.0 * h["eta_F"] * float(norm) / h["rho"], h["max_mix"]))
        self.perturbed_pass = True
        try:
            with torch.enable_grad():
                closure()
            gp = [self._grads(h) for h in groups]
        finally:
            self.perturbed_pass = False
            for h, e in zip(groups, es):
                if e is not None:
                    for p, ei in zip(h["params"], e):
                        p.sub_(ei.to(p.dtype))
        if not all(self._finite(x) for x in gp):
            return None
        return [[gi + c * (gpi - gi) for gi, gpi in zip(gh, gph)] if e is not None else gh
                for gh, gph, e, c in zip(g, gp, es, mixes)]

    @torch.no_grad()
    def _update(self, h: dict, d: List[Tensor]) -> None:
        ps = h["params"]
        if h["eta_r"] > 0:
            for i, p in enumerate(ps):
                st = self.state[p]
                if "fisher0" in st:
                    d[i] = d[i] + h["eta_r"] * st["fisher0"] * (p.detach().to(d[i].dtype) - st["anchor"].to(d[i].dtype))
        if h["clip_norm"] > 0 and d:
            norm = float(torch.sqrt(sum((x * x).sum() for x in d)))
            if norm > h["clip_norm"]:
                d = [x * (h["clip_norm"] / norm) for x in d]
        if h["kind"] == "sgd":
            for p, di in zip(ps, d):
                st = self.state[p]
                di = di + h["weight_decay"] * p.detach().to(di.dtype)
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = di.clone()
                else:
                    buf.mul_(h["momentum"]).add_(di)
                p.sub_((h["lr"] * buf).to(p.dtype))
            return
        b1, b2 = h["betas"]
        for p, di in zip(ps, d):
            st = self.state[p]
            if "exp_avg" not in st:
                st["adam_step"] = 0
                st["exp_avg"] = torch.zeros_like(di)
                st["exp_avg_sq"] = torch.zeros_like(di)
            st["adam_step"] += 1
            t = st["adam_step"]
            st["exp_avg"].mul_(b1).add_(di, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(di, di, value=1 - b2)
            denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(h["eps"])
            upd = (st["exp_avg"] / (1 - b1 ** t)) / denom
            if h["weight_decay"] > 0:
                upd = upd + h["weight_decay"] * p.detach().to(upd.dtype)
            p.sub_((h["lr"] * upd).to(p.dtype))


def _acc(p: Tensor) -> torch.dtype:
    """The dtype of the optimizer's math for ``p``: fp32, fp64 for an fp64 parameter."""
    return torch.promote_types(p.dtype, torch.float32)


def _validate_group(g: dict) -> None:
    """ValueError naming the first bad hyper-parameter of a :class:`SpectralAdamW` group."""
    import math

    def bad(name: str, why: str) -> None:
        raise ValueError(f"SpectralAdamW: {name} {why}, got {g[name]!r}")

    if g["kind"] not in ("adamw", "sgd"):
        bad("kind", "must be 'adamw' or 'sgd'")
    for name in ("lr", "weight_decay", "eps", "clip_norm", "eta_F", "eta_r", "max_mix"):
        v = g[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            bad(name, "must be a finite number ≥ 0")
    if not g["rho"] > 0 or not math.isfinite(g["rho"]):
        bad("rho", "must be a finite number > 0")
    if not 0 <= g["momentum"] < 1:
        bad("momentum", "must lie in [0, 1)")
    b = g["betas"]
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        bad("betas", "must be two numbers in [0, 1)")
    if int(g["trace_every"]) < 1:
        bad("trace_every", "must be ≥ 1")
