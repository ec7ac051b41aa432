"""Argument and input checks of the ViTTM model, kept out of the traced code paths.

``check_input_size`` and ``grid_pos_table`` run inside ``forward``; they are registered with timm as functions
``torch.fx`` must not trace into (their Python ``if`` on a tensor shape would stop the tracer), so a traced graph
calls them as they are, and the checks are marked as having side effects, so that dead-code elimination keeps them
although nothing uses their result: a traced graph still checks every input. TorchScript compiles them too (hence
their plain types and formatting), so a scripted model checks its inputs as well.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import register_notrace_function, resample_abs_pos_embed
from torch.fx.node import has_side_effect

from vittm.core.registry import Spec

GLOBAL_POOLS = ("avg", "")  # mean over tokens, or none (timm's way to ask for unpooled tokens)


@register_notrace_function
@has_side_effect
def check_input_size(H: int, W: int, img_size: tuple[int, int], patch_sizes: dict[str, int],
                     size_bound_parts: list[str]) -> None:
    """An input must be cut evenly by every patch size; size-bound parts only run at the size they were built for."""
    if len(size_bound_parts) > 0 and (H != img_size[0] or W != img_size[1]):
        size = str(H) if H == W else "(" + str(H) + ", " + str(W) + ")"  # (written so that TorchScript compiles it)
        raise ValueError(
            f"input size {H}x{W} differs from img_size={img_size[0]}x{img_size[1]}, and this model uses "
            f"{size_bound_parts}, whose weights depend on the token counts; build the model with "
            f"img_size={size} (allowed for them: only the size they were built for)"
        )
    for key, ps in patch_sizes.items():
        if H % ps or W % ps:
            raise ValueError(f"input size {H}x{W} is not divisible by {key}={ps}; use a multiple of {ps}")


@register_notrace_function
def grid_pos_table(table: torch.Tensor, h: int, w: int, built: tuple[int, int]) -> torch.Tensor:
    """The (1, h·w, D) position table for an (h, w) token grid: as built, or resampled bicubically (no prefix)."""
    if (h, w) == tuple(built):
        return table
    return resample_abs_pos_embed(table, (h, w), old_size=built, num_prefix_tokens=0)


def check_config(
    img_size: tuple[int, int],
    embed_dim: int,
    num_heads: int,
    memory_ps: int,
    process_ps: int,
    global_pool: str,
    process_embed: Spec,
    process_tokens: int | None,
) -> None:
    """Errors a user can make in the model's own arguments, raised before anything is built."""
    for key, ps in (("memory_ps", memory_ps), ("process_ps", process_ps)):
        if not isinstance(ps, int) or ps < 1:
            raise ValueError(f"{key}={ps!r} must be a positive integer")
        if img_size[0] % ps or img_size[1] % ps:
            raise ValueError(
                f"img_size={img_size[0]}x{img_size[1]} is not divisible by {key}={ps} "
                f"(memory_ps={memory_ps}, process_ps={process_ps}); both patch sizes must divide the image size"
            )
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    check_global_pool(global_pool)
    if process_tokens is not None and isinstance(process_embed, Mapping):
        knob = process_embed.get("process_tokens")
        if knob is not None and knob != process_tokens:
            raise ValueError(
                f"process_tokens={process_tokens} disagrees with process_embed.process_tokens={knob}; set one of them"
            )


def check_global_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(
            f"global_pool={global_pool!r}: ViTTM pools by averaging tokens; choose 'avg', or '' for unpooled tokens"
        )
