"""Read/write heads of ViTTM (SPEC §4): move information from a source stream into a destination stream.

Every head maps ``src (B, N, D)`` and ``dst (B, M, D)`` to an output shaped like ``dst``: ``(B, M, D)``.
A read is ``head(src=memory, dst=process)``, a write ``head(src=process, dst=memory)``. The fusion (fusion.py)
combines the output with the target stream; with the ``residual`` fusion the layer calls
``head(src, dst, residual=True)`` instead, which returns ``dst + head(src, dst)`` (same maths; ``lin`` does the add
inside its last kernel). A head of your own gets that call only if its ``forward`` takes ``residual``.

The model passes the dims it owns (``dim``, ``num_heads``, ``num_src``, ``num_dst``); everything else in a
constructor is a knob a config may set (``latent_size_scale``, ``reduced_dim``, ...).

Every LayerNorm inside a head keeps torch's default eps 1e-5, as the authors' code does (SPEC §4); only the stream
norms and the ViT blocks use 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, register_notrace_function
from torch import nn
from torch.fx.node import has_side_effect

from vittm.core.registry import RW_HEADS
from vittm.models.linear_attention import LinearAttention, autocast_dtype, fused_applies
from vittm.models.linear_attention import kernels as linear_attention_kernels
from vittm.models.linear_attention import reference as linear_attention_reference


def latent_width(dim: int, scale: int, name: str, num_heads: int | None = None) -> int:
    """c = D // latent_size_scale, checked to divide evenly (and to split over heads when multi-head)."""
    if not isinstance(scale, int) or scale < 1 or dim % scale:
        raise ValueError(f"rw_head {name!r}: latent_size_scale={scale!r} must be a positive integer dividing D={dim}")
    c = dim // scale
    if num_heads is not None and c % num_heads:
        raise ValueError(
            f"rw_head {name!r}: latent width c = D/latent_size_scale = {dim}/{scale} = {c} must be divisible by "
            f"num_heads={num_heads}; pick latent_size_scale so that (D/scale) % heads == 0"
        )
    return c


def check_heads(dim: int, num_heads: int, name: str) -> None:
    if dim % num_heads:
        raise ValueError(f"rw_head {name!r}: D={dim} must be divisible by num_heads={num_heads}")


@register_notrace_function  # torch.fx calls it as it is instead of tracing its shape test,
@has_side_effect  # and keeps the call although nothing uses its result
def check_tokens(name: str, num_src: int, num_dst: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Heads whose weights depend on token counts only work at the resolution they were built for."""
    if src.shape[1] != num_src or dst.shape[1] != num_dst:
        raise ValueError(
            f"rw_head '{name}' was built for {num_src} source and {num_dst} destination tokens but got "
            f"{src.shape[1]} and {dst.shape[1]}: its weights depend on the token counts, so it only runs at the "
            f"img_size it was built for (build the model with the new img_size instead)"
        )


@register_notrace_function  # torch.fx keeps the call as one node (its eager path is an autograd Function)
def linear_attention(src: torch.Tensor, dst: torch.Tensor, residual: bool, q_w: torch.Tensor, q_b: torch.Tensor,
                     kv_w: torch.Tensor, kv_b: torch.Tensor, consts: torch.Tensor, num_heads: int,
                     eps: float) -> torch.Tensor:
    if torch.jit.is_scripting():
        return linear_attention_reference(src, dst, residual, q_w, q_b, kv_w, kv_b, num_heads, eps)
    return eager_linear_attention(src, dst, residual, q_w, q_b, kv_w, kv_b, consts, num_heads, eps)


@torch.jit.unused  # eager only (TorchScript takes the branch above)
def eager_linear_attention(src: torch.Tensor, dst: torch.Tensor, residual: bool, q_w: torch.Tensor,
                           q_b: torch.Tensor, kv_w: torch.Tensor, kv_b: torch.Tensor, consts: torch.Tensor,
                           num_heads: int, eps: float) -> torch.Tensor:
    if not fused_applies(src, dst, q_w, q_b, kv_w, kv_b, consts):
        return linear_attention_reference(src, dst, residual, q_w, q_b, kv_w, kv_b, num_heads, eps)
    dtype = autocast_dtype(src)
    if dtype is None:
        return LinearAttention.apply(src, dst, q_w, q_b, kv_w, kv_b, consts, residual, num_heads)
    with torch.autocast(src.device.type, enabled=False):  # the Function casts its inputs once itself
        return LinearAttention.apply(src, dst, q_w, q_b, kv_w, kv_b, consts, residual, num_heads, dtype)


@RW_HEADS.register("lin")
class LinearAttentionHead(nn.Module):
    """Linear attention (Katharopoulos et al. 2020), φ(x) = elu(x) + 1; linear in N and M. The published head.

    Per head: out_m = φ(q_m) · Σ_n φ(k_n)ᵀ v_n / (φ(q_m) · Σ_n φ(k_n) + eps). No output projection (SPEC fix).
    k and v share their input, so they come from one fused projection (same maths as two Linear layers). The
    contraction runs in the linear order (Σ_n k_nᵀ v_n first: (N + M)·c·D/h multiply-adds rather than N·M·(c + D)/h
    for (q kᵀ) v), as two batched matmuls over (batch × heads); a ones column appended to v makes the first one
    also produce Σ_n k_n, so numerator and denominator come out of the second one together. The computation
    itself is ``vittm.models.linear_attention`` (forward and backward written for the fewest kernels).
    """

    def __init__(self, dim: int, num_heads: int, latent_size_scale: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        check_heads(dim, num_heads, "lin")
        self.c = latent_width(dim, latent_size_scale, "lin", num_heads)
        self.num_heads, self.eps = num_heads, eps
        self.q = nn.Linear(dim, self.c)
        self.kv = nn.Linear(dim, self.c + dim)  # [W_k | W_v]
        # [0, ..., 0, eps, 1]: the bias of [num | den] and the ones column of [v | 1] (not part of the weights)
        consts = torch.zeros(dim // num_heads + 2)
        consts[-2:] = torch.tensor([eps, 1.0])
        self.register_buffer("consts", consts, persistent=False)

    @torch.jit.unused
    def add_into(self, src: torch.Tensor, dst: torch.Tensor, out: torch.Tensor) -> None:
        """dst + head(src, dst) written into ``out`` (B, M, D), which may be ``dst`` itself (inference only)."""
        linear_attention_kernels(src, dst, self.q.weight, self.q.bias, self.kv.weight, self.kv.bias, self.consts,
                                 True, self.num_heads, out=out)

    def forward(self, src: torch.Tensor, dst: torch.Tensor, residual: bool = False) -> torch.Tensor:
        return linear_attention(src, dst, residual, self.q.weight, self.q.bias, self.kv.weight, self.kv.bias,
                                self.consts, self.num_heads, self.eps)


@RW_HEADS.register("ca")
class CrossAttentionHead(nn.Module):
    """Multi-head softmax cross-attention of dst over src; q, k, v each LayerNorm'ed, then an output projection.
    k and v share their input: one fused projection (``kv``), split before their norms."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        check_heads(dim, num_heads, "ca")
        self.num_heads = num_heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)  # kv = [W_k | W_v]
        self.q_norm, self.k_norm, self.v_norm = (nn.LayerNorm(dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, src: torch.Tensor, dst: torch.Tensor, residual: bool = False) -> torch.Tensor:
        B, N, D = src.shape
        M, h = dst.shape[1], self.num_heads
        k, v = self.kv(src).chunk(2, dim=-1)
        q = self.q_norm(self.q(dst)).view(B, M, h, -1).transpose(1, 2)  # (B, h, M, D/h)
        k = self.k_norm(k).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, D/h)
        v = self.v_norm(v).view(B, N, h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale (D/h)^-1/2
        out = self.proj(out.transpose(1, 2).reshape(B, M, D))
        return dst + out if residual else out


@RW_HEADS.register("lca")
class LatentCrossAttentionHead(nn.Module):
    """Efficient-attention style: softmax(q) over features, softmax(kᵀ) over tokens, out = q (kᵀ v).
    k and v share their input: one fused projection (``kv``), split before their norms."""

    def __init__(self, dim: int, num_heads: int, latent_size_scale: int = 4) -> None:
        super().__init__()
        check_heads(dim, num_heads, "lca")
        c = latent_width(dim, latent_size_scale, "lca", num_heads)
        self.num_heads, self.c = num_heads, c
        self.q, self.kv = nn.Linear(dim, c), nn.Linear(dim, c + dim)  # kv = [W_k | W_v]
        self.q_norm, self.k_norm = nn.LayerNorm(c), nn.LayerNorm(c)
        self.v_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, src: torch.Tensor, dst: torch.Tensor, residual: bool = False) -> torch.Tensor:
        B, N, D = src.shape
        M, h = dst.shape[1], self.num_heads
        k, v = self.kv(src).split([self.c, D], dim=-1)
        q = self.q_norm(self.q(dst)).view(B, M, h, -1).transpose(1, 2).softmax(dim=-1)  # (B, h, M, c/h)
        k = self.k_norm(k).view(B, N, h, -1).transpose(1, 2).softmax(dim=2)  # over the N tokens
        v = self.v_norm(v).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, D/h)
        out = q @ (k.transpose(-2, -1) @ v)  # (B, h, M, c/h) @ (B, h, c/h, D/h)
        out = self.proj(out.transpose(1, 2).reshape(B, M, D))
        return dst + out if residual else out


@RW_HEADS.register("la")
class LatentAttentionHead(nn.Module):
    """Single-head latent attention: out = softmax_c(MLP_q(LN dst)) · (softmax_N(MLP_k(LN src)ᵀ) · src)."""

    def __init__(self, dim: int, latent_size_scale: int = 4, hidden_dim: int = 64) -> None:
        super().__init__()
        c = latent_width(dim, latent_size_scale, "la")
        self.q_norm, self.k_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_mlp = Mlp(dim, hidden_dim, c, act_layer=nn.GELU)
        self.k_mlp = Mlp(dim, hidden_dim, c, act_layer=nn.GELU)

    def forward(self, src: torch.Tensor, dst: torch.Tensor, residual: bool = False) -> torch.Tensor:
        a_dst = self.q_mlp(self.q_norm(dst)).softmax(dim=-1)  # (B, M, c)
        a_src = self.k_mlp(self.k_norm(src)).transpose(1, 2).softmax(dim=-1)  # (B, c, N), softmax over tokens
        out = a_dst @ (a_src @ src)  # values are the raw src tokens: (B, M, c) @ (B, c, D)
        return dst + out if residual else out


@RW_HEADS.register("tl")
class TokenLearnerHead(nn.Module):
    """TokenLearner over src ∪ dst: M learned softmax poolings of the N+M concatenated tokens."""

    size_bound = True  # weights depend on N and M
    __constants__ = ["registry_name"]  # (for TorchScript, which reads no other class attribute)

    def __init__(self, dim: int, num_src: int, num_dst: int) -> None:
        super().__init__()
        self.num_src, self.num_dst = num_src, num_dst
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, num_dst, num_dst, act_layer=nn.GELU)  # D -> M -> M

    def forward(self, src: torch.Tensor, dst: torch.Tensor, residual: bool = False) -> torch.Tensor:
        check_tokens(self.registry_name, self.num_src, self.num_dst, src, dst)
        z = torch.cat([src, dst], dim=1)  # (B, N+M, D)
        attn = self.mlp(self.norm(z)).transpose(1, 2).softmax(dim=-1)  # (B, M, N+M)
        out = attn @ z
        return dst + out if residual else out


@RW_HEADS.register("dyna")
class DynaMixerHead(nn.Module):
    """DynaMixer-style token mixing (Wang et al. 2022): per-sample mixing matrices generated from the tokens.

    Z = LN(src ∪ dst) (B, L=N+M, D). Each token is compressed to h·r numbers; per head, the L·r numbers generate
    an (M × L) matrix (one generator shared by the heads), softmax over L, which mixes that head's D/h channels.
    """

    size_bound = True  # weights depend on N and M
    __constants__ = ["registry_name"]  # (for TorchScript, which reads no other class attribute)

    def __init__(self, dim: int, num_heads: int, num_src: int, num_dst: int, reduced_dim: int = 2) -> None:
        super().__init__()
        check_heads(dim, num_heads, "dyna")
        if not isinstance(reduced_dim, int) or reduced_dim < 1:
            raise ValueError(f"rw_head 'dyna': reduced_dim={reduced_dim!r} must be a positive integer")
        self.num_heads, self.reduced_dim = num_heads, reduced_dim
        self.num_src, self.num_dst = num_src, num_dst
        tokens = num_src + num_dst
        self.norm = nn.LayerNorm(dim)
        self.compress = nn.Linear(dim, num_heads * reduced_dim)
        self.generate = nn.Linear(tokens * reduced_dim, tokens * num_dst)
        self.proj = nn.Linear(dim, dim)

    def forward(self, src: torch.Tensor, dst: torch.Tensor, residual: bool = False) -> torch.Tensor:
        check_tokens(self.registry_name, self.num_src, self.num_dst, src, dst)
        z = self.norm(torch.cat([src, dst], dim=1))  # (B, L, D)
        B, L, D = z.shape
        M, h = self.num_dst, self.num_heads
        codes = self.compress(z).view(B, L, h, self.reduced_dim).transpose(1, 2).reshape(B, h, L * self.reduced_dim)
        mix = self.generate(codes).view(B, h, M, L).softmax(dim=-1)  # (B, h, M, L)
        out = mix @ z.view(B, L, h, D // h).transpose(1, 2)  # (B, h, M, D/h)
        out = self.proj(out.transpose(1, 2).reshape(B, M, D))
        return dst + out if residual else out
