"""``fast_fip``: Fast FIP in place against the authors' layer, rewritten here (:mod:`bench.peers`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._records import Config, Row, Side, fill, measure

# ------------------------------------------------------------------------------------------------ Fast FIP
#: the authors' code this layer is rewritten from (repository, commit, file)
AUTHORS = "nazmul-karim170/FIP@b787f04 src/networks/svd_layers.py, rewritten"


def _authors_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The authors' per-forward weight of both layers: U·diag(relu(S + scale·δ))·Vh, in x's device and dtype."""
    cast = dict(device=x.device, dtype=x.dtype)
    return layer.U.to(**cast) @ torch.diag(F.relu(layer.S.to(**cast) + layer.scale * layer.delta)) @ layer.Vh.to(**cast)


class AuthorsSVDConv2d(nn.Conv2d):
    """The authors' Fast FIP convolution, rewritten from nazmul-karim170/FIP (commit b787f04),
    ``src/networks/svd_layers.py`` (class ``SVDConv2d``): W = U·diag(relu(S + scale·δ))·Vh, from the thin SVD of
    the weight reshaped to ``co × (cin·h·w)``, rebuilt on *every* forward, then ``F.conv2d``.  Their
    ``einops.rearrange`` is the plain reshape here; the SVD is taken on the first forward after the weights are
    loaded, as theirs (``done_svd``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, scale: float = 1.0, **kwargs):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        assert type(kernel_size) is int
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight.reshape(out_channels, -1), full_matrices=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))        # initialized to 0 for smooth tuning
        self.weight.requires_grad = False
        self.done_svd = False
        self.scale = scale

    def perform_svd(self):
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight.reshape(self.weight.shape[0], -1),
                                                   full_matrices=False)
        self.done_svd = True

    def forward(self, x: torch.Tensor):
        if not self.done_svd:
            self.perform_svd()
        w = _authors_weight(self, x).reshape(self.weight.shape)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class AuthorsSVDLinear(nn.Linear):
    """The authors' ``SVDLinear`` (same file): W = U·diag(relu(S + scale·δ))·Vh every forward, then
    ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight, full_matrices=False)
        self.delta = nn.Parameter(torch.zeros_like(self.S))
        self.weight.requires_grad = False
        self.done_svd = False
        self.scale = scale

    def perform_svd(self):
        self.U, self.S, self.Vh = torch.linalg.svd(self.weight, full_matrices=False)
        self.done_svd = True

    def forward(self, x: torch.Tensor):
        if not self.done_svd:
            self.perform_svd()
        return F.linear(x, _authors_weight(self, x), bias=self.bias)


def authors_swap(model: nn.Module) -> list[nn.Parameter]:
    """Replace every Conv2d / Linear by the authors' layer holding the same weights (their model is built with
    the SVD layers and the checkpoint loaded into it); returns the δ parameters in module order."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (AuthorsSVDConv2d, AuthorsSVDLinear)) or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(m, nn.Conv2d):
            new = AuthorsSVDConv2d(m.in_channels, m.out_channels, m.kernel_size[0], stride=m.stride,
                                   padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
        else:
            new = AuthorsSVDLinear(m.in_features, m.out_features, bias=m.bias is not None)
        new.load_state_dict(m.state_dict(), strict=False)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    return [m.delta for m in model.modules() if isinstance(m, (AuthorsSVDConv2d, AuthorsSVDLinear))]


def _authors_purifier(model: nn.Module, ctx, *, relative=True, rank=None, **opts):
    """The δ-only Fast FIP of ``bench.fast_fip`` (FIP on δ; biases and norm affine as extras; the same F0, options
    and spectral penalty: :func:`bench.fast_fip.delta_fip_purifier`) on the authors' layers instead of fip_fast's."""
    from ..fast_fip import delta_fip_purifier

    if rank is not None:
        raise ValueError("the authors' layer is full rank only")

    def reparameterize(m: nn.Module):
        for p in m.parameters():
            p.requires_grad_(False)
        deltas = authors_swap(m)
        layers = [x for x in m.modules() if isinstance(x, (AuthorsSVDConv2d, AuthorsSVDLinear))]
        return deltas, lambda: (x.S + x.scale * x.delta for x in layers)
    return delta_fip_purifier(model, ctx, reparameterize, **opts)


def group_fast_fip(cfg: "Config") -> list[Row]:
    from dataclasses import fields

    from bench.fast_fip import DELTA_ONLY, SmallPreActResNet, _purifier
    from fip_fast.pipeline.holding import HOLDING_DEFAULTS
    from fip_fast.pipeline.methods import DEFAULTS
    from fip_fast.pipeline.options import LoopOptions
    from fip_fast.pipeline.purifier import MethodContext

    b, w = (4, 4) if cfg.quick else (32, 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
    x, y = x.to(cfg.device), y.to(cfg.device)
    ctx = MethodContext(x_train=x[:16], y_train=y[:16], device=torch.device(cfg.device), loss_fn=F.cross_entropy,
                        seed=0, progress=False)
    sides = []
    for v in ("fip", "inplace", "inplace_delta_only", "authors"):
        torch.manual_seed(0)
        model = SmallPreActResNet(w).to(cfg.device)
        if v == "authors":
            loop = {f.name for f in fields(LoopOptions)} | {"steps", "batch_size"}   # the loop's, as bench.fast_fip
            opts = {k: val for k, val in DEFAULTS["fast_fip"].items()
                    if k not in loop and k not in DELTA_ONLY and k not in HOLDING_DEFAULTS}
            pur = _authors_purifier(model, ctx, **opts)
        else:
            pur = _purifier(v, model, ctx, None)
        sides.append(Side(v, (lambda p: lambda: p.step(x, y))(pur)))
    t = measure(sides, cfg, cfg.steps, cfg.warmup)
    work = f"purification step (fd suppressor every step), SmallPreActResNet(width={w}), full rank, batch {b}"
    return [fill(Row("fast_fip", work, "Fast FIP in place, delta only (FIP on δ, no mixing band)",
                     "the authors' Fast FIP (module swap, W rebuilt every forward; FIP on δ)", AUTHORS, "per step",
                     "<= 0.8x"), t, "inplace_delta_only", "authors"),
            fill(Row("fast_fip", work, "Fast FIP in place (shipped defaults)",
                     "the authors' Fast FIP (module swap, W rebuilt every forward; FIP on δ)", AUTHORS, "per step",
                     "<= 0.8x"), t, "inplace", "authors"),
            fill(Row("fast_fip", work, "Fast FIP in place (shipped defaults)", "full FIP (fip_fast, fd suppressor)",
                     None, "per step", "<= 1.0x"), t, "inplace", "fip")]
