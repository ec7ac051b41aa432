"""Fusion (SPEC §5): how a read/write head's output ``rw`` replaces or joins the target stream.

``fuse(rw, target)`` with both (B, N_target, D). The model builds one fusion per direction (read into the
process stream, write into the memory stream) of the same kind; it passes ``dim`` and ``num_tokens`` (N_target).
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_function
from torch import nn
from torch.fx.node import has_side_effect

from vittm.core.registry import FUSIONS


@register_notrace_function  # torch.fx calls it as it is instead of tracing its shape test,
@has_side_effect  # and keeps the call although nothing uses its result
def check_target_tokens(num_tokens: int, target: torch.Tensor) -> None:
    if target.shape[1] != num_tokens:
        raise ValueError(
            f"fusion 'add_erase' was built for {num_tokens} target tokens but got {target.shape[1]}: its gate has "
            f"one output per token, so it only runs at the img_size it was built for"
        )


@FUSIONS.register("residual")
class ResidualFusion(nn.Module):
    """target + rw (the paper's "Add"; the published setting)."""

    def forward(self, rw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return target + rw


@FUSIONS.register("erase")
class EraseFusion(nn.Module):
    """rw replaces the target outright."""

    def forward(self, rw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return rw


@FUSIONS.register("add_erase")
class AddEraseFusion(nn.Module):
    """A per-token gate from the mean of rw: g = σ(W mean(rw)) (B, N_target, 1); (1 − g)·target + g·rw.

    The gate predicts one value per target token, so the module is tied to the token count it was built for.
    """

    size_bound = True

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.gate = nn.Linear(dim, num_tokens)

    def forward(self, rw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_target_tokens(self.num_tokens, target)
        g = torch.sigmoid(self.gate(rw.mean(dim=1))).unsqueeze(-1)  # (B, N_target, 1)
        return torch.lerp(target, rw, g)  # (1 - g) * target + g * rw
