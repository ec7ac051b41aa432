"""Memory blocks (SPEC §6): optional extra computation on the memory stream inside each layer.

A memory block has two hooks around the process block of its layer:
``encode(m)`` runs right after the read, and ``decode(m, skip)`` right after the write, where ``skip`` is the
memory as it was before ``encode``. ``none`` does nothing, ``mlp`` is a residual MLP after the write, ``conv``
is a ConvNeXt-style 1-D encoder/decoder pair over the memory token sequence.
"""

from __future__ import annotations

import torch
from timm.layers import GlobalResponseNormMlp, Mlp
from torch import nn

from vittm.core.registry import MEMORY_BLOCKS


@MEMORY_BLOCKS.register("none")
class NoMemoryBlock(nn.Module):
    """Identity (the published setting)."""

    def encode(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def decode(self, m: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return m


@MEMORY_BLOCKS.register("mlp")
class MlpMemoryBlock(NoMemoryBlock):
    """After the write: M + MLP(LN(M)), hidden width D·memory_mlp_ratio, GELU."""

    def __init__(self, dim: int, memory_mlp_ratio: float = 0.5) -> None:
        super().__init__()
        hidden = int(dim * memory_mlp_ratio)
        if hidden < 1:
            raise ValueError(
                f"memory_block 'mlp': memory_mlp_ratio={memory_mlp_ratio!r} gives no hidden units at D={dim}"
            )
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the authors' memory MLP (SPEC §6)
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU)

    def decode(self, m: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return m + self.mlp(self.norm(m))


class ConvNeXt1d(nn.Module):
    """One ConvNeXt-V2 block on a token sequence (B, N, C): depthwise conv k, LN, MLP with GRN, layer scale.

    timm's ConvNeXt block is 2-D; the memory here is treated as a 1-D sequence, so the depthwise conv is
    written out, while the MLP-with-GRN is timm's (run on a (B, 1, N, C) view: GRN pools over the tokens).
    """

    def __init__(self, channels: int, kernel_size: int, mlp_ratio: float = 4.0, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = GlobalResponseNormMlp(channels, int(channels * mlp_ratio), act_layer=nn.GELU)
        self.gamma = nn.Parameter(torch.full((channels,), ls_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        y = self.mlp(self.norm(y).unsqueeze(1)).squeeze(1)
        return x + self.gamma * y


class ConvStack(nn.Module):
    """D -> D/4 channels, ``depth`` ConvNeXt-1D blocks, back to D."""

    def __init__(self, dim: int, depth: int, kernel_size: int) -> None:
        super().__init__()
        channels = max(dim // 4, 1)
        self.down = nn.Linear(dim, channels)
        self.blocks = nn.Sequential(*(ConvNeXt1d(channels, kernel_size) for _ in range(depth)))
        self.up = nn.Linear(channels, dim)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.up(self.blocks(self.down(m)))


@MEMORY_BLOCKS.register("conv")
class ConvMemoryBlock(NoMemoryBlock):
    """ConvNeXt-style 1-D encoder after the read and decoder after the write, residual from before the encoder.

    Unlike the artifact's (which halved the token count inside the encoder) the token count is kept, so the write
    head and fusion see the same memory size whatever memory block is chosen.
    """

    def __init__(self, dim: int, depth: int = 1, kernel_size: int = 7) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"memory_block 'conv': depth={depth!r} must be a positive integer")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"memory_block 'conv': kernel_size={kernel_size!r} must be a positive odd integer")
        self.encoder = ConvStack(dim, depth, kernel_size)
        self.decoder = ConvStack(dim, depth, kernel_size)

    def encode(self, m: torch.Tensor) -> torch.Tensor:
        return self.encoder(m)

    def decode(self, m: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip + self.decoder(m)
