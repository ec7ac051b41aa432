"""One way to build every model the framework trains or benchmarks: the ViTTM sizes and timm's ViT/DeiT baselines.

Both go through ``timm.create_model``; this only adds a clear error when ViTTM-only options reach a baseline, and
a uniform way to get every head's logits.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import nn

from vittm.models.vittm import ViTTM

# Keyword arguments that only a ViTTM understands (timm's ViT would reject them with a bare TypeError).
VITTM_ONLY_ARGS = frozenset(
    {"memory_ps", "process_ps", "rw_head", "read_head", "write_head", "fusion", "process_embed", "process_tokens",
     "memory_block", "eval_head"}
)


def is_vittm(name: str) -> bool:
    return name.startswith("vittm_")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` for ViTTM and baselines alike; ``None`` values mean "not set"."""
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(
            f"model={name!r} is not a registered timm model (did you mean {close}?); ViTTM models: "
            f"{timm.list_models('vittm*')}, baselines e.g. vit_base_patch16_224, deit_small_patch16_224"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not is_vittm(name):
        extra = sorted(VITTM_ONLY_ARGS & kwargs.keys())
        if extra:
            raise ValueError(f"{extra} are ViTTM options; model={name!r} is a timm baseline and takes none of them")
    return timm.create_model(name, **kwargs)


def forward_heads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every head's logits by name: ``{"memory", "process"}`` for a ViTTM, ``{"logits"}`` for a baseline."""
    if isinstance(model, ViTTM):
        memory, process = model.forward_both(x)
        return {"memory": memory, "process": process}
    return {"logits": model(x)}
