"""Vision Token Turing Machines (ViTTM).

"Token Turing Machines are Efficient Vision Models", Jajal et al., WACV 2025, https://arxiv.org/abs/2409.07613.
The contract this file implements is shared/SPEC.md §1-3 and §7.

Two token streams of width D: a large *memory* stream M that never enters a transformer block, and a small
*process* stream P that does. In every layer P reads from M, runs one ViT block, and writes back to M.
The parts that vary between papers' ablations (read/write heads, fusion, process embedder, memory block) come
from the registries in ``vittm.registry``; this file only wires them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import calculate_drop_path_rates, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from vittm.models.embed import PatchProcessEmbed, embed_patches, patchify
from vittm.registry import FUSIONS, MEMORY_BLOCKS, PROCESS_EMBEDS, RW_HEADS, Spec

EvalHead = Literal["memory", "process", "mean"]
EVAL_HEADS = ("memory", "process", "mean")
DEFAULT_RW_HEAD = {"name": "lin", "latent_size_scale": 4}  # the published head


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class ViTTMLayer(nn.Module):
    """One ViTTM layer (SPEC §2): norm both, read M->P, ViT block on P, norm both, write P->M, memory block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_memory: int,
        num_process: int,
        block: nn.Module,
        read_head: Spec,
        write_head: Spec,
        fusion: Spec,
        memory_block: Spec,
        read_arg: str = "rw_head",
        write_arg: str = "rw_head",
    ) -> None:
        super().__init__()
        shared = dict(dim=dim, num_heads=num_heads)
        # Nr / Nw: one LayerNorm each, shared by both streams; its output replaces the stream.
        self.read_norm = layer_norm(dim)
        self.read = RW_HEADS.build(read_head, arg=read_arg, num_src=num_memory, num_dst=num_process, **shared)
        self.read_fuse = FUSIONS.build(fusion, dim=dim, num_tokens=num_process)
        self.block = block
        self.write_norm = layer_norm(dim)
        self.write = RW_HEADS.build(write_head, arg=write_arg, num_src=num_process, num_dst=num_memory, **shared)
        self.write_fuse = FUSIONS.build(fusion, dim=dim, num_tokens=num_memory)
        self.memory = MEMORY_BLOCKS.build(memory_block, dim=dim)

    def forward(self, m: torch.Tensor, p: torch.Tensor, write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # m: (B, N_m, D), p: (B, N_p, D)
        m, p = self.read_norm(m), self.read_norm(p)
        p = self.read_fuse(self.read(m, p), p)
        skip = m
        m = self.memory.encode(m)
        p = self.block(p)
        if not write:  # only the process head is wanted after the last layer: the write would be dead work
            return m, p
        m, p = self.write_norm(m), self.write_norm(p)
        m = self.write_fuse(self.write(p, m), m)
        return self.memory.decode(m, skip), p


class ViTTM(nn.Module):
    """Vision Token Turing Machine classifier with a memory head and a process head.

    Args:
        img_size: input size the model is built for (int or (H, W)); other sizes work when divisible by the
            patch sizes, with the position tables resampled (except for size-bound ``tl``/``dyna``/``add_erase``).
        in_chans, num_classes: as in timm.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT widths (D, layers, heads).
        memory_ps: patch size of the memory stream (kernel = stride of its Conv2d).
        process_ps: patch size of the process stream (sets the process token count for every embedder).
        rw_head: read/write head spec, a registry name, ``{"name": ..., **knobs}`` or a class.
        read_head, write_head: optional per-direction overrides of ``rw_head``.
        fusion: fusion spec, the same kind in both directions.
        process_embed: process embedder spec (``patch``, ``downsample``, ``latent``).
        process_tokens: process token count for ``downsample``/``latent`` (default: (H/process_ps)·(W/process_ps)).
        memory_block: memory block spec (``none``, ``mlp``, ``conv``).
        eval_head: which logits ``forward`` returns: ``memory``, ``process`` or ``mean`` (of the two logits).
        drop_rate: dropout before the classifiers; proj/attn drop: inside the ViT blocks.
        drop_path_rate: stochastic depth of the ViT blocks, linspace(0, rate, depth); heads get none.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        memory_ps: int = 28,
        process_ps: int = 28,
        rw_head: Spec = DEFAULT_RW_HEAD,
        read_head: Spec | None = None,
        write_head: Spec | None = None,
        fusion: Spec = "residual",
        process_embed: Spec = "patch",
        process_tokens: int | None = None,
        memory_block: Spec = "none",
        eval_head: EvalHead = "memory",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        check_config(img_size, embed_dim, num_heads, memory_ps, process_ps, global_pool, process_embed, process_tokens)
        self.eval_head = eval_head
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.memory_ps, self.process_ps = memory_ps, process_ps
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = global_pool
        self.grad_checkpointing = False

        # Streams: memory = Conv2d patches; process = the chosen embedder. Each gets its own position table.
        self.memory_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=memory_ps, stride=memory_ps)
        self.memory_grid = (img_size[0] // memory_ps, img_size[1] // memory_ps)
        self.process_embed = PROCESS_EMBEDS.build(
            process_embed, dim=embed_dim, in_chans=in_chans, img_size=img_size, memory_ps=memory_ps,
            process_ps=process_ps, process_tokens=process_tokens,
        )
        self.process_grid = tuple(self.process_embed.grid_size)
        num_memory = self.memory_grid[0] * self.memory_grid[1]
        num_process = self.process_grid[0] * self.process_grid[1]
        self.memory_pos_embed = nn.Parameter(torch.zeros(1, num_memory, embed_dim))
        self.process_pos_embed = nn.Parameter(torch.zeros(1, num_process, embed_dim))

        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # linspace(0, rate, depth)
        self.layers = nn.ModuleList(
            ViTTMLayer(
                embed_dim, num_heads, num_memory, num_process,
                block=Block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=partial(nn.LayerNorm, eps=1e-6),
                ),
                read_head=rw_head if read_head is None else read_head,
                write_head=rw_head if write_head is None else write_head,
                read_arg="rw_head" if read_head is None else "read_head",
                write_arg="rw_head" if write_head is None else "write_head",
                fusion=fusion,
                memory_block=memory_block,
            )
            for i in range(depth)
        )
        self.process_norm = layer_norm(embed_dim)  # final norm of P; M is left as is (SPEC §2)
        self.fc_norm, self.process_fc_norm = layer_norm(embed_dim), layer_norm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head, self.process_head = self._new_heads(num_classes)
        # Components whose weights depend on token counts tie the model to img_size (checked on every input).
        self.size_bound_parts = sorted({m.registry_name for m in self.modules() if getattr(m, "size_bound", False)})
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- set-up
    def _new_heads(self, num_classes: int) -> tuple[nn.Module, nn.Module]:
        def make() -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            head = nn.Linear(self.embed_dim, num_classes)
            nn.init.zeros_(head.weight)  # both heads start at zero (SPEC §3)
            nn.init.zeros_(head.bias)
            return head

        return make(), make()

    def init_weights(self) -> None:
        """timm's ViT init (trunc-normal 0.02 Linear, zero bias; ``reset_parameters`` of other modules, which gives
        the process embedders their own init), then the position tables and zero heads (SPEC §1, §3)."""
        for child in self.children():  # not self.apply: timm's init fn would call this method again
            child.apply(init_weights_vit_timm)
        trunc_normal_(self.memory_pos_embed, std=0.02)
        trunc_normal_(self.process_pos_embed, std=0.02)
        for head in (self.head, self.process_head):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    @property
    def eval_head(self) -> str:
        return self._eval_head

    @eval_head.setter
    def eval_head(self, value: str) -> None:
        if value not in EVAL_HEADS:
            raise ValueError(f"eval_head={value!r} is not allowed; choose one of {list(EVAL_HEADS)}")
        self._eval_head = value

    # --------------------------------------------------------------------------------------- timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        skip = {"memory_pos_embed", "process_pos_embed"}
        return skip | {f"process_embed.{n}" for n, _ in self.process_embed.named_parameters() if n == "tokens"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^(?:memory_embed|process_embed|memory_pos_embed|process_pos_embed)",
            blocks=[(r"^layers\.(\d+)", None), (r"^(?:process_norm|fc_norm|process_fc_norm)", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations (saves memory)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier ``forward`` uses (the memory head for ``eval_head='mean'``)."""
        return self.process_head if self.eval_head == "process" else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace both heads (zero-initialised) for ``num_classes`` classes; 0 removes them."""
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r}: ViTTM pools by averaging tokens; only 'avg' is allowed")
        self.num_classes = num_classes
        device = self.fc_norm.weight.device
        self.head, self.process_head = (h.to(device) for h in self._new_heads(num_classes))

    # -------------------------------------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        if self.size_bound_parts and (H, W) != self.img_size:
            raise ValueError(
                f"input size {H}x{W} differs from img_size={self.img_size[0]}x{self.img_size[1]}, and this model uses "
                f"{self.size_bound_parts}, whose weights depend on the token counts; build the model with "
                f"img_size={H if H == W else (H, W)} (allowed for them: only the size they were built for)"
            )
        sizes = {"memory_ps": self.memory_ps}
        if hasattr(self.process_embed, "proj"):  # only a patch embedder cuts the image with process_ps
            sizes["process_ps"] = self.process_ps
        for key, ps in sizes.items():
            if H % ps or W % ps:
                raise ValueError(f"input size {H}x{W} is not divisible by {key}={ps}; use a multiple of {ps}")

    def _add_pos(self, grid: torch.Tensor, table: torch.Tensor, built: tuple[int, int]) -> torch.Tensor:
        B, h, w, D = grid.shape
        if (h, w) != built:  # another input size: resample the table bicubically (no prefix tokens)
            table = resample_abs_pos_embed(table, (h, w), old_size=built, num_prefix_tokens=0)
        return grid.reshape(B, h * w, D) + table

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, C, H, W) -> memory (B, N_m, D) and process (B, N_p, D) tokens with positions."""
        self._check_input(x)
        patches = patchify(x, self.memory_ps)  # (B, H/ps_m, W/ps_m, C·ps_m²)
        m = embed_patches(self.memory_embed, patches)  # (B, H/ps_m, W/ps_m, D)
        if isinstance(self.process_embed, PatchProcessEmbed) and self.process_ps == self.memory_ps:
            p = embed_patches(self.process_embed.proj, patches)  # the same cut: share the patches
        else:
            p = self.process_embed(x, m)  # (B, h_p, w_p, D)
        return self._add_pos(m, self.memory_pos_embed, self.memory_grid), self._add_pos(
            p, self.process_pos_embed, self.process_grid
        )

    def forward_features(self, x: torch.Tensor, write_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams after the last layer: memory (B, N_m, D) and normalised process (B, N_p, D).

        ``write_last=False`` skips the last write (the memory returned is then stale); used when only the process
        head is evaluated.
        """
        m, p = self.embed(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            write = write_last or i < last
            if self.grad_checkpointing and torch.is_grad_enabled():
                m, p = checkpoint(layer, m, p, write, use_reentrant=False)
            else:
                m, p = layer(m, p, write)
        return m, self.process_norm(p)

    def pool(self, features: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over tokens, then each head's LayerNorm: (B, D) for memory and for process."""
        m, p = features
        return self.head_drop(self.fc_norm(m.mean(dim=1))), self.head_drop(self.process_fc_norm(p.mean(dim=1)))

    def forward_head(self, features: tuple[torch.Tensor, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Logits of the ``eval_head`` (or its pooled features with ``pre_logits``); ``mean`` averages the two."""
        m, p = self.pool(features)
        if self.eval_head == "memory":
            return m if pre_logits else self.head(m)
        if self.eval_head == "process":
            return p if pre_logits else self.process_head(p)
        return (m + p) / 2 if pre_logits else (self.head(m) + self.process_head(p)) / 2

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory logits, process logits), each (B, num_classes): what training uses (loss = sum of both)."""
        m, p = self.pool(self.forward_features(x))
        return self.head(m), self.process_head(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the ``eval_head``."""
        return self.forward_head(self.forward_features(x, write_last=self.eval_head != "process"))


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
    if global_pool != "avg":
        raise ValueError(f"global_pool={global_pool!r}: ViTTM pools by averaging tokens; only 'avg' is allowed")
    if process_tokens is not None and isinstance(process_embed, Mapping):
        knob = process_embed.get("process_tokens")
        if knob is not None and knob != process_tokens:
            raise ValueError(
                f"process_tokens={process_tokens} disagrees with process_embed.process_tokens={knob}; set one of them"
            )
