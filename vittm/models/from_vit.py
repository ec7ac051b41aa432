"""Start a ViTTM from a timm ViT checkpoint (a local file; nothing is ever fetched).

What carries over (ViT key -> ViTTM key):
  blocks.{i}.*            -> layers.{i}.block.*           the encoder blocks, unchanged
  patch_embed.proj.*      -> memory_embed.*               kernel resampled 16x16 -> memory_ps (FlexiViT PI-resize)
  patch_embed.proj.*      -> process_embed.proj.*         kernel resampled to process_ps (``patch`` embedder only)
  pos_embed (prefix dropped) -> memory_pos_embed, process_pos_embed   grid resampled bicubically
  norm.*                  -> process_norm.*               the final LayerNorm of the transformer stream
Everything else (read/write heads and their norms, memory blocks, both classifier heads) keeps its fresh init.
"""

from __future__ import annotations

import math
import re

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models._manipulate import adapt_input_conv


def convert_vit_state_dict(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(complete ViTTM state dict for ``model``, the ViTTM keys whose values came from the ViT, the ViT keys left
    out). Loading goes through vittm.models.loading.load_weights, which detects the format."""
    if "patch_embed.proj.weight" not in state_dict or not any(k.startswith("blocks.") for k in state_dict):
        raise ValueError(
            "checkpoint is neither a ViTTM nor a timm ViT state dict (expected 'patch_embed.proj.weight' and "
            f"'blocks.N.*' keys; found e.g. {sorted(state_dict)[:5]})"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    width = state_dict["patch_embed.proj.weight"].shape[0]
    if depth != len(model.layers) or width != model.embed_dim:
        raise ValueError(
            f"ViT checkpoint has {depth} blocks of width {width} but the ViTTM has {len(model.layers)} layers of "
            f"width {model.embed_dim}; start from the ViT of the same size (e.g. vit_base_patch16_224 for vittm_base)"
        )

    out = {k: v.clone() for k, v in model.state_dict().items()}
    loaded, skipped = [], []

    def put(key: str, value: torch.Tensor, source: str) -> None:
        if out[key].shape != value.shape:
            raise ValueError(f"{source} has shape {tuple(value.shape)}; the ViTTM's {key} has {tuple(out[key].shape)}")
        out[key] = value.to(out[key].dtype)
        loaded.append(key)

    for key, value in state_dict.items():
        match = re.match(r"blocks\.(\d+)\.(.+)", key)
        if match and f"layers.{match[1]}.block.{match[2]}" in out:
            put(f"layers.{match[1]}.block.{match[2]}", value, key)
        elif key.startswith("norm.") and f"process_{key}" in out:
            put(f"process_{key}", value, key)
        elif not key.startswith(("patch_embed.proj.", "pos_embed")):
            skipped.append(key)

    kernel = state_dict["patch_embed.proj.weight"].float()
    if kernel.shape[1] != model.in_chans:  # e.g. 1-channel Fashion-MNIST from an RGB ViT: timm's channel adaption
        kernel = adapt_input_conv(model.in_chans, kernel)
    bias = state_dict.get("patch_embed.proj.bias")
    targets = [("memory_embed", model.memory_ps)]
    if "process_embed.proj.weight" in out:
        targets.append(("process_embed.proj", model.process_ps))
    for name, ps in targets:
        put(f"{name}.weight", resample_patch_embed(kernel, [ps, ps]), "patch_embed.proj.weight")
        if bias is not None:
            put(f"{name}.bias", bias, "patch_embed.proj.bias")

    pos = state_dict.get("pos_embed")
    if pos is not None:
        n = pos.shape[1]
        prefix = n - math.isqrt(n) ** 2  # class / register tokens sit in front of the square grid
        side = math.isqrt(n - prefix)
        for key, grid in (("memory_pos_embed", model.memory_grid), ("process_pos_embed", model.process_grid)):
            if min(grid) > 1:  # a (1, n) grid (non-square latent tokens) has no spatial layout to resample to
                table = resample_abs_pos_embed(pos.float(), list(grid), old_size=(side, side), num_prefix_tokens=prefix)
                put(key, table[:, prefix:], "pos_embed")

    return out, loaded, skipped
