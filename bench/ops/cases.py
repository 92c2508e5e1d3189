"""What ``python -m bench ops`` measures: the parameter lists and spectral shapes per device, the bytes each op
moves per element, the optimizer hyper-parameters."""
from __future__ import annotations

from typing import Any, Optional

import torch

#: op/variant → (bytes per element of the list ops, the accounting in words)
BYTES_ACCOUNTING: dict[str, tuple[Optional[int], str]] = {
    "fisher_accumulate_": (12, "read F, read g, write F"),
    "global_norm": (4, "read g (one scalar out)"),
    "perturb_": (12, "read θ, read g, write θ"),
    "fip_step_/plain": (36, "read θ, g, F0, θ0, buf, F; write θ, buf, F"),
    "fip_step_/fd_mix": (40, "plain + read g′ (restore θ −= s·g uses the g already read)"),
    "fip_step_/lagged": (44, "plain + read pert, write pert"),
    "spectral_weight": (None, "read U (m·r), Vh (r·n), S, δ (2r); write W (m·n); FLOPs 2·m·r·n + m·r"),
    "spectral_linear_grad": (None, "read x (NT·n), g_out (NT·m), U (m·r), Vh (r·n); write grad (r), per-sample "
                                   "(N·r); FLOPs 2·NT·r·(n+m) + 2·NT·r"),
}

HYPER = dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0, eta_r=1.0, beta=0.95, precondition=False,
             damping=1e-3)


# ------------------------------------------------------------------------------------------------ parameter lists
def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2 (Hugging Face layout, tied LM head counted once): 148 tensors, 124.4 M
    elements for GPT-2 small (the defaults)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama7b_delta_shapes(n_layer: int = 32, d: int = 4096, ff: int = 11008) -> list[tuple[int, ...]]:
    """Fast FIP's δ tensors for a 7B Llama-style transformer: 7 projections per layer (q, k, v, o: d×d;
    gate, up: ff×d; down: d×ff), r = min(out, in) singular values each — which is d = 4096 for all seven."""
    mats = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)]
    return [(min(m, n),) for _ in range(n_layer) for (m, n) in mats]


def model_shapes(name: str) -> list[tuple[int, ...]]:
    from fip_fast.evaluation.models import build_model
    in_ch = 3 if "resnet" in name else 1
    return [tuple(p.shape) for p in build_model(name, 10, in_ch).parameters()]


def list_cases(device: torch.device, quick: bool, flat_numel: Optional[int] = None) -> dict[str, dict[str, Any]]:
    gpu = device.type == "cuda"
    if quick:
        cases = {
            "flat": dict(shapes=[(flat_numel or 65536,)], desc="one flat tensor (quick)"),
            "demo_cnn": dict(shapes=model_shapes("demo_cnn"), desc="DemoCNN parameter list (quick stand-in for "
                                                                   "ResNet-18)"),
            "gpt2_tiny": dict(shapes=gpt2_shapes(1, 64, 1000, 128), desc="GPT-2 layout, 1 layer, d=64 (quick)"),
            "deltas_small": dict(shapes=llama7b_delta_shapes(2, 64, 172), desc="δ of a 2-layer d=64 "
                                                                               "transformer (quick)"),
        }
    else:
        n = flat_numel or (128 * 2**20 if gpu else 4 * 2**20)
        cases = {
            "flat": dict(shapes=[(n,)], desc=f"one flat tensor of {n / 2**20:g} Mi elements"
                                            + ("" if gpu else " (CPU size: runs in seconds)")),
            "resnet18": dict(shapes=model_shapes("resnet18"),
                             desc="ResNet-18 (CIFAR, fip_fast.evaluation.models) parameters"),
            "gpt2": dict(shapes=gpt2_shapes() if gpu else gpt2_shapes(n_layer=2),
                         desc="GPT-2 small parameter shapes (124 M)" if gpu else
                         "GPT-2 small shapes, 2 of 12 blocks + embeddings (CPU size; --gpt2-layers 12 for all)"),
            "deltas_7b": dict(shapes=llama7b_delta_shapes(), desc="Fast FIP δ of a 7B transformer: 32 layers × 7 "
                                                                  "projections, r = 4096"),
        }
    for c in cases.values():
        c["numel"] = sum(_numel(s) for s in c["shapes"])
        c["ntensors"] = len(c["shapes"])
    return cases


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def spectral_cases(device: torch.device, quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"weight": [dict(name="tiny 48×64", m=48, n=64)],
                "linear_grad": [dict(name="tiny N=4,T=2, 48×64", N=4, T=2, m=48, n=64)]}
    if device.type == "cuda":
        return {"weight": [dict(name="7B attn proj 4096×4096", m=4096, n=4096),
                           dict(name="7B MLP up 11008×4096", m=11008, n=4096),
                           dict(name="ResNet-18 layer4 conv 512×4608", m=512, n=4608)],
                "linear_grad": [dict(name="7B attn proj, N=8, T=512, 4096×4096", N=8, T=512, m=4096, n=4096),
                                dict(name="DemoCNN fc, N=128, 256×1024", N=128, T=1, m=256, n=1024)]}
    return {"weight": [dict(name="ResNet-18 layer4 conv 512×4608", m=512, n=4608),
                       dict(name="GPT-2 MLP 3072×768", m=3072, n=768)],
            "linear_grad": [dict(name="GPT-2 attn proj, N=8, T=64, 768×768", N=8, T=64, m=768, n=768),
                            dict(name="DemoCNN fc, N=128, 256×1024", N=128, T=1, m=256, n=1024)]}
