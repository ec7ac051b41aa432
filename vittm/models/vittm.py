"""Vision Token Turing Machines (ViTTM).

"Token Turing Machines are Efficient Vision Models", Jajal et al., WACV 2025, https://arxiv.org/abs/2409.07613.
The contract this file implements is shared/SPEC.md §1-3 and §7.

Two token streams of width D: a large *memory* stream M that never enters a transformer block, and a small
*process* stream P that does. In every layer P reads from M, runs one ViT block, and writes back to M.
The parts that vary between papers' ablations (read/write heads, fusion, process embedder, memory block) come
from the registries in ``vittm.core.registry``; this file only wires them, and speaks timm's model API.
"""

# No ``from __future__ import annotations`` here: torch.fx writes the annotations of forward() into the code it
# generates, and TorchScript can only read that code when they are real types, not strings.
import inspect
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from timm.layers import calculate_drop_path_rates, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices  # timm's own models import it from here
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn
from torch.utils.checkpoint import checkpoint

from vittm.core.registry import FUSIONS, MEMORY_BLOCKS, PROCESS_EMBEDS, RW_HEADS, Spec
from vittm.models.checks import check_config, check_global_pool, check_input_size, grid_pos_table
from vittm.models.embed import PatchProcessEmbed, embed_patches, patchify
from vittm.models.fusion import ResidualFusion
from vittm.models.linear_attention import autocast_dtype
from vittm.models.memory import NoMemoryBlock

EvalHead = Literal["memory", "process", "mean"]
EVAL_HEADS = ("memory", "process", "mean")
DEFAULT_RW_HEAD = {"name": "lin", "latent_size_scale": 4}  # the published head
STREAMS = ("memory", "process")


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def block_into(block: Block, x: torch.Tensor, out: torch.Tensor) -> None:
    """timm's ``Block.forward`` (pre-norm attention and MLP, each with layer scale, drop-path and a residual) with
    its last residual add written into ``out`` (inference only: ``out=`` is not differentiable)."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    torch.add(x, block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), out=out)


def split_streams(buffer: torch.Tensor, batch: int, num_memory: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared-stream buffer (B·N_m + B·N_p, D), memory rows first -> (memory (B, N_m, D), process (B, N_p, D))
    views."""
    split, D = batch * num_memory, buffer.shape[1]
    return buffer[:split].view(batch, num_memory, D), buffer[split:].view(batch, -1, D)


@torch.jit.unused  # TorchScript never asks (ViTTMLayer.norm_both checks is_scripting first)
def compiling() -> bool:
    return torch.compiler.is_compiling()


def takes_residual(head: nn.Module) -> bool:
    """Whether a read/write head's forward has the ``residual`` flag (``dst + head(src, dst)``, see rw_heads.py)."""
    return "residual" in inspect.signature(head.forward).parameters


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
        # With the residual fusion a head that can takes the add into its own last kernel: head(src, dst, True)
        self.read_adds = isinstance(self.read_fuse, ResidualFusion) and takes_residual(self.read)
        self.write_adds = isinstance(self.write_fuse, ResidualFusion) and takes_residual(self.write)
        # Inference with both streams in one buffer (forward_shared): heads that write into a given tensor, the
        # residual fusion and no memory block (whose decode would need a copy back into the buffer)
        self.shares_buffer = (self.read_adds and self.write_adds and type(self.memory) is NoMemoryBlock
                              and all(hasattr(head, "add_into") for head in (self.read, self.write)))

    def forward(self, m: torch.Tensor, p: torch.Tensor, write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # m: (B, N_m, D), p: (B, N_p, D)
        m, p = self.norm_both(m, p, write=False)
        p = self.read(m, p, True) if self.read_adds else self.read_fuse(self.read(m, p), p)
        skip = m
        m = self.memory.encode(m)
        p = self.block(p)
        if not write:  # only the process head is wanted after the last layer: the write would be dead work
            return m, p
        m, p = self.norm_both(m, p, write=True)
        m = self.write(p, m, True) if self.write_adds else self.write_fuse(self.write(p, m), m)
        return self.memory.decode(m, skip), p

    def norm_both(self, m: torch.Tensor, p: torch.Tensor, write: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One LayerNorm (Nr, or Nw with ``write``) applied to both streams. Under torch.compile the two are joined
        first (``cat`` along the rows, then ``split``), which inductor fuses into a single norm over both streams,
        forward and backward; in eager mode two calls, as the join would be a copy of both streams (measured: 2.4 %
        slower training on CPU for 48 fewer kernels a step), and the inference path (``forward_shared``) keeps both
        streams in one buffer instead."""
        if torch.jit.is_scripting() or not compiling():
            if write:
                return self.write_norm(m), self.write_norm(p)
            return self.read_norm(m), self.read_norm(p)
        B, Nm, D = m.shape
        joined = torch.cat([m.reshape(B * Nm, D), p.reshape(-1, D)])
        y = self.write_norm(joined) if write else self.read_norm(joined)
        y_m, y_p = y.split([B * Nm, y.shape[0] - B * Nm])
        return y_m.view(B, Nm, D), y_p.view(B, -1, D)

    @torch.jit.unused
    def forward_shared(self, x: torch.Tensor, batch: int, num_memory: int, write: bool = True) -> torch.Tensor:
        """The same layer for inference (no autograd), both streams in one buffer ``x`` (B·N_m + B·N_p, D):
        the memory rows first, then the process rows, so that each stream is a contiguous (B, N, D) view and each
        shared LayerNorm is one kernel over both. Every result is written over a tensor that is dead by then, so
        the layer allocates two buffers (the two norms' outputs) and returns the second, holding the new streams
        (the first without the write)."""
        y = self.read_norm(x)  # Nr over both streams
        m, p = split_streams(y, batch, num_memory)
        self.read.add_into(m, p, out=p)  # p + read(m, p), over p (element-wise, so in place is safe)
        block_into(self.block, p, out=p)  # the ViT block's output over its input
        if not write:  # the process head only: the stream as the block left it
            return y
        z = self.write_norm(y)  # Nw over both streams; its output replaces both (SPEC §2)
        zm, zp = split_streams(z, batch, num_memory)
        self.write.add_into(zp, zm, out=zm)  # Nw(m) + write(Nw(p), Nw(m)), over Nw(m)
        return z


class ViTTM(nn.Module):
    """Vision Token Turing Machine classifier with a memory head and a process head.

    ``model(x)`` returns one logits tensor (timm's convention): in eval mode the ``eval_head``'s; in training mode
    the mean of both heads' logits, as timm's distilled DeiT does, so that a plain ``criterion(model(x), y)`` loop
    (timm's train.py, DDP without ``find_unused_parameters``) trains every parameter. ``forward_both`` returns both
    heads' logits; this framework's training sums their losses (SPEC §3).

    Args:
        img_size: input size the model is built for (int or (H, W)); other sizes work when divisible by the
            patch sizes, with the position tables resampled (except for size-bound ``tl``/``dyna``/``add_erase``).
        in_chans, num_classes: as in timm (``num_classes=0``: no classifiers, pooled features out).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT widths (D, layers, heads).
        memory_ps: patch size of the memory stream (kernel = stride of its Conv2d).
        process_ps: patch size of the process stream (sets the process token count for every embedder).
        rw_head: read/write head spec, a registry name, ``{"name": ..., **knobs}`` or a class.
        read_head, write_head: optional per-direction overrides of ``rw_head``.
        fusion: fusion spec, the same kind in both directions.
        process_embed: process embedder spec (``patch``, ``downsample``, ``latent``).
        process_tokens: process token count for ``downsample``/``latent`` (default: (H/process_ps)·(W/process_ps)).
        memory_block: memory block spec (``none``, ``mlp``, ``conv``).
        eval_head: which logits ``forward`` returns in eval mode: ``memory``, ``process`` or ``mean`` (of the two).
        drop_rate: dropout before the classifiers; proj/attn drop: inside the ViT blocks.
        drop_path_rate: stochastic depth of the ViT blocks, linspace(0, rate, depth); heads get none.
        global_pool: ``avg`` (mean over tokens) or ``''`` (unpooled: the eval stream's tokens, per-token logits).
        device, dtype: where and in which dtype to create the parameters (timm's factory passes them).
    """

    __jit_unused_properties__ = ["eval_head"]  # TorchScript reads the validated _eval_head
    size_bound_parts: list[str]  # typed here: TorchScript cannot infer the type of an empty list

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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

        with torch.device(device) if device is not None else nullcontext():  # every tensor made here goes there
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
        self.patch_process = isinstance(self.process_embed, PatchProcessEmbed)  # the only one cut with process_ps
        # Dense-feature taps (forward_intermediates): the finer stream's layers first, as timm's FeatureInfo wants
        # reductions that never decrease.
        reduction = {"memory": memory_ps, "process": img_size[0] // self.process_grid[0]}
        self.tap_streams = tuple(sorted(STREAMS, key=lambda s: (reduction[s], s != "memory")))
        self.tap_reductions = [reduction[s] for s in self.tap_streams]
        self.feature_info = self._feature_info(depth)
        self.init_weights()
        if dtype is not None:
            self.to(dtype)

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

    def _feature_info(self, depth: int) -> list[dict[str, Any]]:
        return [dict(module=f"layers.{i}", num_chs=self.embed_dim, reduction=reduction, stream=stream)
                for stream, reduction in zip(self.tap_streams, self.tap_reductions, strict=True) for i in range(depth)]

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
        """Replace both heads (zero-initialised, on the model's device and dtype) for ``num_classes`` classes; 0
        removes them. ``global_pool``: ``avg`` or ``''`` (unpooled tokens); ``None`` keeps the current pooling."""
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.memory_pos_embed
        self.head, self.process_head = (
            h.to(device=ref.device, dtype=ref.dtype).train(self.training) for h in self._new_heads(num_classes)
        )

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str | Path) -> None:
        """timm's hook for ``pretrained=True`` (the configs set ``custom_load``): any supported weight file, see
        ``vittm.models.loading.load_weights``."""
        from vittm.models.loading import load_weights  # loading imports this module

        load_weights(self, checkpoint_path, key="pretrained_cfg.file")

    # -------------------------------------------------------------------------------------------- forward
    def _grids(self, H: int, W: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(memory grid, process grid) of an H x W input."""
        memory = (H // self.memory_ps, W // self.memory_ps)
        if self.patch_process:
            return memory, (H // self.process_ps, W // self.process_ps)
        return memory, (self.process_grid[0], self.process_grid[1])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, C, H, W) -> memory (B, N_m, D) and process (B, N_p, D) tokens with positions."""
        m, p, m_pos, p_pos = self.tokens(x)
        return m + m_pos, p + p_pos

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image (B, C, H, W) -> memory (B, N_m, D) and process (B, N_p, D) tokens and their position tables
        (1, N, D), resampled to this input's grids."""
        H, W = x.shape[-2], x.shape[-1]
        sizes = {"memory_ps": self.memory_ps}
        if self.patch_process:  # only the patch embedder cuts the image with process_ps
            sizes["process_ps"] = self.process_ps
        check_input_size(H, W, self.img_size, sizes, self.size_bound_parts)
        patches = patchify(x, self.memory_ps)  # (B, H/ps_m, W/ps_m, C·ps_m²)
        m = embed_patches(self.memory_embed.weight, self.memory_embed.bias, patches)  # (B, H/ps_m, W/ps_m, D)
        p = self.process_embed(x, m, patches)  # (B, h_p, w_p, D)
        B, hm, wm, D = m.shape
        _, hp, wp, _ = p.shape
        m_pos = grid_pos_table(self.memory_pos_embed, hm, wm, self.memory_grid)
        p_pos = grid_pos_table(self.process_pos_embed, hp, wp, self.process_grid)
        return m.reshape(B, hm * wm, D), p.reshape(B, hp * wp, D), m_pos, p_pos

    def forward_features(self, x: torch.Tensor, write_last: bool = True) -> list[torch.Tensor]:
        """Both streams after the last layer: ``[memory (B, N_m, D), normalised process (B, N_p, D)]``.

        ``write_last=False`` skips the last write (the memory returned is then stale); used when only the process
        head is evaluated.
        """
        m, p = self._layers(x, write_last)
        return [m, self.process_norm(p)]

    def _layers(self, x: torch.Tensor, write_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and layers: (memory, process before its final norm)."""
        if not torch.jit.is_scripting() and self._shares_buffer(x):
            return self._layers_shared(x, write_last)
        m, p = self.embed(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            write = write_last or i < last
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                m, p = checkpoint(layer, m, p, write, use_reentrant=False)  # recomputed in the backward pass
            else:
                m, p = layer(m, p, write)
        return m, p

    @torch.jit.unused
    def _shares_buffer(self, x: torch.Tensor) -> bool:
        """Inference in eager mode (no autograd, not traced or compiled, no autocast: its per-op casts do not mix
        with ``out=``) with layers that can share one buffer."""
        return (not torch.is_grad_enabled() and isinstance(x, torch.Tensor)  # (an fx Proxy is not a Tensor)
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and autocast_dtype(x) is None
                and all(layer.shares_buffer for layer in self.layers))

    @torch.jit.unused
    def _layers_shared(self, x: torch.Tensor, write_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers with both streams in one buffer (``ViTTMLayer.forward_shared``): (memory, process) views."""
        m, p, m_pos, p_pos = self.tokens(x)
        B, Nm, D = m.shape
        buffer = m.new_empty(B * (Nm + p.shape[1]), D)
        m_rows, p_rows = split_streams(buffer, B, Nm)
        torch.add(m, m_pos, out=m_rows)  # the position adds fill the buffer
        torch.add(p, p_pos, out=p_rows)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            buffer = layer.forward_shared(buffer, B, Nm, write=write_last or i < last)
        return split_streams(buffer, B, Nm)

    def pool(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over tokens (``global_pool='avg'``; ``''`` keeps the tokens), then each head's LayerNorm."""
        m, p = self._mean(features[0]), self._mean(features[1])
        return self.head_drop(self.fc_norm(m)), self.head_drop(self.process_fc_norm(p))

    def _mean(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1) if self.global_pool == "avg" else tokens  # (B, D) or (B, N, D)

    def _combine(self, m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``mean`` of the two heads: their average when pooled; unpooled, the token sets side by side."""
        return (m + p) / 2 if self.global_pool == "avg" else torch.cat([m, p], dim=1)

    def forward_head(self, features: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Logits (or, with ``pre_logits``, pooled features) of the ``eval_head`` in eval mode, of ``mean`` in
        training mode (see the class docstring)."""
        m, p = self.pool(features)
        choice = "mean" if self.training else self._eval_head
        if choice == "memory":
            return m if pre_logits else self.head(m)
        if choice == "process":
            return p if pre_logits else self.process_head(p)
        return self._combine(m, p) if pre_logits else self._combine(self.head(m), self.process_head(p))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory logits, process logits), each (B, num_classes): what training uses (loss = sum of both)."""
        m, p = self.pool(self.forward_features(x))
        return self.head(m), self.process_head(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the ``eval_head`` (eval mode) or the mean of both heads (training mode)."""
        if not self.training and self._eval_head == "memory":  # the process stream's last norms are dead work
            return self.head(self.head_drop(self.fc_norm(self._mean(self._layers(x)[0]))))
        only_process = not self.training and self._eval_head == "process"
        return self.forward_head(self.forward_features(x, write_last=not only_process))

    # ------------------------------------------------------------------------------------- dense features
    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both streams of every layer as dense features, timm's signature for ViT-style models.

        Each of the L layers has two taps, its memory output and its process output (as the next layer receives
        them). ``feature_info`` lists the 2L taps, the finer stream's L layers first (timm wants reductions that never
        decrease): with memory_ps <= process_ps, tap ``i`` is layer i's memory and tap ``L + i`` its process output;
        each entry names its ``stream``. ``indices`` picks taps as timm does (an int n: the last n taps, i.e. the
        coarser stream's last n layers; a list: those taps, negative from the end; None: all), returned in tap
        order. ``output_fmt='NCHW'`` gives maps (B, D, h, w) on each stream's own grid (memory: H/memory_ps x
        W/memory_ps; process: H/process_ps x W/process_ps for the patch embedder, the embedder's fixed grid
        otherwise), ``'NLC'`` tokens (B, h·w, D). ``norm=True`` applies the final process norm to the process taps
        (the memory stream has no final norm). ``stop_early`` runs no layer after the last tap. Returns the
        intermediates, or (final features as ``forward_features`` gives them, at the stopping layer with
        ``stop_early``; intermediates).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: choose 'NCHW' or 'NLC'")
        depth = len(self.layers)
        take, _ = feature_take_indices(2 * depth, indices)
        wanted = {(self.tap_streams[t // depth], t % depth): t for t in take}
        grids = dict(zip(STREAMS, self._grids(x.shape[-2], x.shape[-1]), strict=True))
        stop = max(i for _, i in wanted) if stop_early else depth - 1
        taps: dict[int, torch.Tensor] = {}
        m, p = self.embed(x)
        for i, layer in enumerate(self.layers[: stop + 1]):
            m, p = checkpoint(layer, m, p, use_reentrant=False) if self.grad_checkpointing and \
                torch.is_grad_enabled() else layer(m, p)
            for stream, tokens in zip(STREAMS, (m, p), strict=True):
                t = wanted.get((stream, i))
                if t is None:
                    continue
                if stream == "process" and norm:
                    tokens = self.process_norm(tokens)
                if output_fmt == "NCHW":  # (B, N, D) -> (B, D, h, w)
                    tokens = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grids[stream]).contiguous()
                taps[t] = tokens
        intermediates = [taps[t] for t in sorted(taps)]
        if intermediates_only:
            return intermediates
        return [m, self.process_norm(p)], intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the layers after the last wanted tap (see ``forward_intermediates``), the final process norm
        (``prune_norm``) and the classifiers with their pooled norms (``prune_head``: ``model(x)`` then returns
        unpooled tokens). Returns the wanted taps' indices in the pruned model (``feature_info`` shrinks with it)."""
        depth = len(self.layers)
        take, _ = feature_take_indices(2 * depth, indices)
        keep = 1 + max(t % depth for t in take)
        self.layers = self.layers[:keep]
        self.feature_info = self._feature_info(keep)
        if prune_norm:
            self.process_norm = nn.Identity()
        if prune_head:
            self.fc_norm, self.process_fc_norm = nn.Identity(), nn.Identity()
            self.reset_classifier(0, "")
        return [(t // depth) * keep + t % depth for t in take]
