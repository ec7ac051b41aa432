"""What a run's summary calls its model: the config option chosen, the timm model it builds, the shape and the
components, and why its parameter count differs from the README's table (channels and classes come from the data).

``model=vittm_fmnist`` builds timm's ``vittm_tiny`` entrypoint with D 64 instead of 192: printing only
``model.name`` would call the 0.29 M-parameter model by the 8 M-parameter model's name.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

SHAPE_KEYS = ("embed_dim", "depth", "num_heads", "img_size", "memory_ps", "process_ps", "patch_size")
COMPONENTS = ("rw_head", "read_head", "write_head", "fusion", "process_embed", "memory_block")


def config_choices() -> dict[str, str]:
    """Hydra's choice per config group (``{"model": "vittm_fmnist", ...}``); empty outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except ValueError:  # not under Hydra (tests calling train() directly)
        return {}


def components(model: DictConfig) -> dict[str, str]:
    """``{"rw_head": "lin", "fusion": "residual", ...}`` of a ViTTM config (empty for a ViT baseline)."""
    named = {}
    for key in COMPONENTS:
        node = model.get(key)
        if node is not None:
            named[key] = str(node.get("name") if hasattr(node, "get") else node)
    return named


def model_label(cfg: DictConfig) -> str:
    """One line: ``model=vittm_fmnist (timm vittm_tiny: embed_dim=64 depth=6 ...), rw_head=lin, fusion=residual``."""
    m = cfg.model
    choice = config_choices().get("model")
    shape = " ".join(f"{k}={m.get(k)}" for k in SHAPE_KEYS if m.get(k) is not None)
    head = f"model={choice} (timm {m.name}: {shape})" if choice else f"{m.name} ({shape})"
    return ", ".join([head, *(f"{k}={v}" for k, v in components(m).items())])


def params_note(cfg: DictConfig, num_classes: Any) -> str:
    """Why the count may differ from README tables, which count 3 channels and 1,000 classes (ImageNet)."""
    return f"for in_chans={cfg.data.in_chans}, num_classes={num_classes} from data={cfg.data.dataset}"
