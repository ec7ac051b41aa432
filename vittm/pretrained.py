"""Fine-tuning starts: load weights from a pre-trained file into a (possibly differently sized) model.

Accepted files, all read with ``weights_only=True`` (vittm.checkpoints.load_checkpoint) or as ``.safetensors``:
- a Lightning checkpoint of this framework: its EMA weights (``ema.module.*``) when present, else ``net.*``;
- a plain state dict of the model (e.g. the exported ``ema_weights.pth``);
- a timm ViT state dict, converted for a ViTTM (vittm.models.from_vit).
Both classifier heads are always left fresh (a new task's class count); position tables are resampled when the
new model's grid differs; any other mismatch is an error naming the keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from timm.layers import resample_abs_pos_embed
from timm.models import clean_state_dict, load_state_dict
from torch import nn

from vittm.checkpoints import CheckpointError, load_checkpoint
from vittm.models import ViTTM, convert_vit_state_dict

HEAD_KEYS = ("head.", "process_head.")
# Where training scripts keep the weights inside a saved dict, EMA first (timm's load_state_dict order).
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_weights(path: str | Path, key: str = "finetune.from_ckpt") -> dict[str, torch.Tensor]:
    """The model weights inside ``path`` (see the module docstring for what is accepted); a file that is unreadable,
    or would run code when unpickled, raises a CheckpointError naming ``key``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pre-trained weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":  # no pickle at all
        try:
            return load_state_dict(str(path))
        except SafetensorError as err:
            raise CheckpointError(f"{key}={str(path)!r}: not a readable .safetensors file ({err})") from None
    ckpt = load_checkpoint(path, key=key)
    if path.suffix == ".ckpt":
        state = ckpt.get("state_dict", ckpt)
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "net."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    inner = next((k for k in WRAPPER_KEYS if isinstance(ckpt, dict) and ckpt.get(k) is not None), None)
    return clean_state_dict(ckpt[inner] if inner else ckpt)


def load_pretrained(net: nn.Module, path: str | Path) -> list[str]:
    """Load ``path`` into ``net`` except the classifier heads; returns the keys left at their fresh values."""
    state = read_weights(path)
    if isinstance(net, ViTTM) and "memory_embed.weight" not in state and "patch_embed.proj.weight" in state:
        state, _ = convert_vit_state_dict(state, net)
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    for key, value in list(state.items()):
        if key in own and key.endswith("pos_embed") and value.shape != own[key].shape and isinstance(net, ViTTM):
            grid = net.memory_grid if key.startswith("memory") else net.process_grid
            old = int(value.shape[1] ** 0.5)
            state[key] = resample_abs_pos_embed(value.float(), list(grid), old_size=(old, old), num_prefix_tokens=0)
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own
             and v.shape != own[k].shape]
    unexpected = sorted(set(state) - set(own))
    if wrong or unexpected:
        raise ValueError(
            f"pre-trained weights {str(path)!r} do not fit this model: shape mismatches {wrong[:5]}, "
            f"unknown keys {unexpected[:5]} (was it trained with another model config?)"
        )
    result = net.load_state_dict(state, strict=False)
    not_heads = [k for k in result.missing_keys if not k.startswith(HEAD_KEYS)]
    if not_heads:
        raise ValueError(f"pre-trained weights {str(path)!r} lack {not_heads[:5]} (and {len(not_heads)} keys in all)")
    return result.missing_keys
