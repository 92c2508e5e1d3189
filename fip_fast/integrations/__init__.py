"""FIP in other people's code: training loops (:mod:`.trainer` — Hugging Face ``Trainer`` callback,
``drop_perturbation``, ``find_fip``), transformers models (:mod:`.hf`) and distributed training
(:mod:`.distributed`: DDP, FSDP2, distributed checkpoints).  Submodules are imported on use."""
from fip_fast.integrations.trainer import drop_perturbation, find_fip, is_lagged

__all__ = ["FIPCallback", "drop_perturbation", "find_fip", "is_lagged"]


def __getattr__(name: str):
    if name == "FIPCallback":          # transformers is imported only when the callback is asked for
        from fip_fast.integrations.trainer import FIPCallback

        return FIPCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
