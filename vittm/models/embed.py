"""Process-stream embedders (SPEC §1): how the image becomes the few process tokens.

``forward(x, memory, patches)`` gets the image (B, C, H, W), the memory token grid (B, H/ps_m, W/ps_m, D) and the
memory stream's flattened patches (``patchify(x, memory_ps)``), and returns a token grid ``(B, h, w, D)`` (NHWC) so the
model can add, and if needed resample, the process position table. The model passes ``dim, in_chans, img_size,
memory_ps, process_ps``; ``process_tokens`` is the embedder's own knob (``None`` -> (H/process_ps)·(W/process_ps),
the count a ``patch`` embedder would make).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from vittm.core.registry import PROCESS_EMBEDS


def default_tokens(img_size: tuple[int, int], process_ps: int) -> int:
    return (img_size[0] // process_ps) * (img_size[1] // process_ps)


def patchify(x: torch.Tensor, ps: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/ps, W/ps, C·ps·ps): the non-overlapping ps × ps patches, each flattened in the (C, kh, kw)
    order of a Conv2d weight."""
    B, C, H, W = x.shape
    patches = x.reshape(B, C, H // ps, ps, W // ps, ps).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, ps, ps)
    return patches.reshape(B, H // ps, W // ps, C * ps * ps)


def embed_patches(weight: torch.Tensor, bias: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
    """A Conv2d (``weight``, ``bias``) with kernel = stride, applied to ``patchify``'s output as one GEMM:
    (B·h·w, C·ps²) @ (C·ps², D).

    Written by hand because on CPU MKL's GEMM beats oneDNN's convolution here (ViTTM-B, batch 8, both 28 x 28
    embeddings: 21.6 vs 23.8 ms), the tokens come out in (B, h, w, D) order with no permute, and two embedders that
    cut the image the same way share one ``patchify``. Same maths as ``conv(x).permute(0, 2, 3, 1)``.
    """
    return F.linear(patches, weight.flatten(1), bias)


def check_tokens(name: str, n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"process_embed {name!r}: process_tokens={n!r} must be a positive integer")
    return n


@PROCESS_EMBEDS.register("patch")
class PatchProcessEmbed(nn.Module):
    """Its own Conv2d with kernel = stride = process_ps (the published choice); xavier-uniform weight, zero bias."""

    def __init__(
        self, dim: int, in_chans: int, img_size: tuple[int, int], process_ps: int, memory_ps: int,
        process_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.reuse_memory_patches = process_ps == memory_ps  # the same cut: one patchify serves both streams
        self.grid_size = (img_size[0] // process_ps, img_size[1] // process_ps)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        if process_tokens is not None and process_tokens != self.num_tokens:
            raise ValueError(
                f"process_embed 'patch': process_tokens={process_tokens!r} disagrees with img_size={img_size} and "
                f"process_ps={process_ps}, which make {self.num_tokens} tokens; leave process_tokens unset (null) "
                f"or use process_embed 'downsample' or 'latent' to choose the count freely"
            )
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=process_ps, stride=process_ps)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.proj.weight)  # on the 4-D kernel, as the published artifact does
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        if not self.reuse_memory_patches:
            patches = patchify(x, self.proj.stride[0])
        return embed_patches(self.proj.weight, self.proj.bias, patches)  # (B, h, w, D)


@PROCESS_EMBEDS.register("downsample")
class DownsampleProcessEmbed(nn.Module):
    """Adaptive average pooling of the memory token grid to a √n × √n grid (no parameters of its own)."""

    def __init__(self, img_size: tuple[int, int], process_ps: int, process_tokens: int | None = None) -> None:
        super().__init__()
        n = check_tokens("downsample", process_tokens or default_tokens(img_size, process_ps))
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"process_embed 'downsample': process_tokens={n} must be a perfect square (it pools the memory grid "
                f"to a square grid), e.g. {side * side} or {(side + 1) ** 2}"
            )
        self.grid_size, self.num_tokens = (side, side), n

    def forward(self, x: torch.Tensor, memory: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(memory.permute(0, 3, 1, 2), self.grid_size)  # (B, D, √n, √n)
        return pooled.permute(0, 2, 3, 1)


@PROCESS_EMBEDS.register("latent")
class LatentProcessEmbed(nn.Module):
    """n learned tokens, the same for every image (they learn what to read from memory)."""

    def __init__(self, dim: int, img_size: tuple[int, int], process_ps: int, process_tokens: int | None = None) -> None:
        super().__init__()
        n = check_tokens("latent", process_tokens or default_tokens(img_size, process_ps))
        side = math.isqrt(n)
        self.grid_size = (side, side) if side * side == n else (1, n)  # only shapes the position table
        self.num_tokens = n
        self.tokens = nn.Parameter(torch.zeros(1, *self.grid_size, dim))

    def reset_parameters(self) -> None:
        trunc_normal_(self.tokens, std=0.02)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        # repeat, not expand: an expand of a parameter made under no_grad is a view with requires_grad but no
        # grad_fn, which PyTorch's FlopCounterMode (module tracker) rejects; the copy is B x n x D, negligible
        return self.tokens.repeat(x.shape[0], 1, 1, 1)
