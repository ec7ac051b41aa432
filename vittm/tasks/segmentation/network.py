"""The segmentation network: a classification backbone's last-layer feature map, a decoder, bilinear upsampling.

    net = SegmentationNet(model=dict(name="vittm_base", memory_ps=16, process_ps=32), decoder=dict(name="segmenter"),
                          num_classes=150, img_size=512)
    logits = net(images)  # (B, 3, H, W) -> (B, K, H, W)

The same code serves a ViTTM and a timm ViT/DeiT baseline: features come only from the model's
``forward_intermediates`` (timm's API, which ViTTM speaks), and what they do not use is pruned with
``prune_intermediate_layers``, so every parameter left gets a gradient (DDP without ``find_unused_parameters``).

Which features (the ViTTM paper's segmentation recipe):
- a ViTTM: its LAST layer's streams, BEFORE the final process norm, as maps on each stream's grid. ``auto``: both
  streams side by side (2D channels) when their grids are equal (e.g. 28/28 patches at 504 px: 18x18), otherwise the
  process stream alone (e.g. 16/32 at 512 px: a 16x16 map; the 32x32 memory map is not used). ``memory``,
  ``process``, ``both`` choose explicitly; ``both`` on unequal grids resizes the coarser map bilinearly to the finer
  grid (not in the paper).
- a timm ViT/DeiT: its last block's tokens AFTER the final norm, prefix (class/distillation) tokens dropped, as
  mmseg's Segmenter backbone gives them (``final_norm=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from vittm.core.errors import ConfigError
from vittm.models import ViTTM, ViTTMLayer, create_model, is_vittm, load_weights, read_state_dict
from vittm.tasks.segmentation.decoders import build_decoder

FEATURES = ("auto", "process", "memory", "both")
STREAMS = ("memory", "process")  # channel order when both are fed


class ProcessOnlyLayer(nn.Module):
    """A ViTTM layer whose memory output nobody reads (the last layer, when only the process stream is fed): the
    read, the ViT block and the write norm Nw, which the process stream passes through (SPEC §2), so its output is
    exactly the full layer's process output. The write to memory, its fusion and the memory block would be dead work
    and parameters without gradients, so they are left out. The kept parts keep their names, hence their state-dict
    keys (``layers.{i}.read.*``, ``layers.{i}.block.*``, ...)."""

    shares_buffer = False  # (ViTTM's one-buffer inference path is for full layers)

    def __init__(self, layer: ViTTMLayer) -> None:
        super().__init__()
        self.read_norm, self.read, self.read_fuse = layer.read_norm, layer.read, layer.read_fuse
        self.block, self.write_norm = layer.block, layer.write_norm
        self.read_adds = layer.read_adds

    def forward(self, m: torch.Tensor, p: torch.Tensor, write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # m: (B, N_m, D), p: (B, N_p, D); Nr replaces both streams, as in ViTTMLayer
        m, p = self.read_norm(m), self.read_norm(p)
        p = self.read(m, p, True) if self.read_adds else self.read_fuse(self.read(m, p), p)
        return m, self.write_norm(self.block(p))  # the memory is returned unwritten: nothing reads it


def choose_features(requested: str, backbone: nn.Module) -> tuple[str, ...]:
    """The streams fed to the decoder (``("tokens",)`` for a baseline), by the rule in the module docstring."""
    if not isinstance(backbone, ViTTM):
        if requested != "auto":
            raise ConfigError(f"decoder.features={requested!r}: a baseline ({type(backbone).__name__}) has one token "
                              f"stream; use auto (streams are a ViTTM's)")
        return ("tokens",)
    if requested == "auto":
        memory, process = backbone._grids(*backbone.img_size)
        return STREAMS if memory == process else ("process",)
    return STREAMS if requested == "both" else (requested,)


class SegmentationNet(nn.Module):
    """Backbone + decoder + bilinear upsampling to the input size.

    Args:
        model: the model config as conf/model/*.yaml gives it (``name`` + keywords of ``create_model``).
            ``num_classes`` is set to 0 (no classifiers); a timm baseline gets ``dynamic_img_size=True`` unless the
            config says otherwise, so that its position table follows the input grid as ViTTM's does.
        decoder: the decoder spec, ``{"name": "segmenter" | "linear", **knobs}`` (decoders.py); it may also hold
            ``features``.
        num_classes: K.
        features: ``auto`` | ``process`` | ``memory`` | ``both`` (see the module docstring); ``None``: the
            decoder spec's ``features``, else ``auto``.
        img_size: the size to build the backbone at (the training crop, e.g. 512), so that its position tables
            have the crop's grid (as mmseg builds its backbones); ``None``: the model config's ``img_size``.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        decoder: str | Mapping[str, Any],
        num_classes: int,
        features: str | None = None,
        img_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r}: must be a positive integer")
        spec = dict(decoder) if isinstance(decoder, Mapping) else {"name": decoder}
        in_spec = spec.pop("features", None)
        if features is not None and in_spec is not None and features != in_spec:
            raise ConfigError(f"decoder.features={in_spec!r} disagrees with features={features!r}; set one of them")
        requested = features or in_spec or "auto"
        if "name" not in model:
            raise ConfigError(f"model={dict(model)!r}: needs a 'name' (a ViTTM or timm model)")
        cfg = {**model, "num_classes": 0}
        if img_size is not None:
            cfg["img_size"] = img_size
        if not is_vittm(cfg["name"]):
            cfg.setdefault("dynamic_img_size", True)
        self.backbone_cfg = cfg  # also builds the full model that load_backbone loads into
        if requested not in FEATURES:  # (before the backbone is built)
            raise ConfigError(f"decoder.features={requested!r}: choose one of {list(FEATURES)}")
        backbone = self.build_backbone()
        for method in ("forward_intermediates", "prune_intermediate_layers"):
            if not hasattr(backbone, method):
                raise ConfigError(f"model.name={cfg['name']!r}: has no {method}(); segmentation needs a ViTTM or a "
                                  f"timm ViT-style model")
        self.streams = choose_features(requested, backbone)
        self.num_classes = num_classes

        if isinstance(backbone, ViTTM):
            depth = len(backbone.layers)
            # feature_info lists each stream's taps in tap_streams order; the last layer's tap of stream s:
            taps = sorted(backbone.tap_streams.index(s) * depth + depth - 1 for s in self.streams)
            self.taps = backbone.prune_intermediate_layers(taps, prune_norm=True, prune_head=True)
            self.tap_streams = [backbone.tap_streams[t // depth] for t in self.taps]  # forward_intermediates' order
            if self.streams == ("process",):
                backbone.layers[-1] = ProcessOnlyLayer(backbone.layers[-1])
            self.norm_features = False  # pre-norm: the final process norm is pruned
            width = backbone.embed_dim
            self.patch_sizes = {"memory_ps": backbone.memory_ps}
            if backbone.patch_process:  # only the patch embedder cuts the image with process_ps
                self.patch_sizes["process_ps"] = backbone.process_ps
        else:
            self.taps = backbone.prune_intermediate_layers(1, prune_norm=False, prune_head=True)  # keeps the norm
            self.tap_streams = ["tokens"]
            self.norm_features = True
            width = backbone.feature_info[-1]["num_chs"] if hasattr(backbone, "feature_info") else \
                backbone.num_features
            patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
            if patch is not None:
                self.patch_sizes = {"patch_size": math.lcm(*patch) if isinstance(patch, tuple | list) else patch}
            else:
                self.patch_sizes = {"reduction": backbone.feature_info[-1]["reduction"]}
        self.backbone = backbone
        self.embed_dim = width
        self.feature_dim = width * len(self.streams)
        self.decoder = build_decoder(spec, in_dim=self.feature_dim, num_classes=num_classes, backbone_dim=width)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def size_multiple(self) -> int:
        """Inputs' height and width must be multiples of this (all patch sizes' lcm); inference pads to it."""
        return math.lcm(*self.patch_sizes.values())

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The only input size a size-bound ViTTM (``tl``/``dyna`` heads, ``add_erase``) runs at; else None."""
        parts = getattr(self.backbone, "size_bound_parts", [])
        return tuple(self.backbone.img_size) if parts else None

    def build_backbone(self) -> nn.Module:
        try:
            return create_model(**self.backbone_cfg)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model: {err}") from None

    # -------------------------------------------------------------------------------------------- forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) -> the decoder's input map (B, feature_dim, h, w)."""
        maps = self.backbone.forward_intermediates(x, indices=self.taps, norm=self.norm_features, output_fmt="NCHW",
                                                   intermediates_only=True)  # one (B, D, h_s, w_s) per tap
        if len(maps) == 1:
            return maps[0]
        by_stream = dict(zip(self.tap_streams, maps, strict=True))
        memory, process = by_stream["memory"], by_stream["process"]
        if memory.shape[-2:] != process.shape[-2:]:  # explicit "both" on unequal grids: the coarser onto the finer
            fine = max(memory.shape[-2:], process.shape[-2:], key=lambda s: s[0] * s[1])
            memory, process = (F.interpolate(t, size=fine, mode="bilinear", align_corners=False)
                               if t.shape[-2:] != fine else t for t in (memory, process))
        return torch.cat([memory, process], dim=1)  # (B, 2D, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W), H and W multiples of ``size_multiple`` -> logits (B, K, H, W)."""
        H, W = x.shape[-2:]
        step = self.size_multiple
        if H % step or W % step:
            raise ValueError(f"input {H}x{W} is not a multiple of {step} (patch sizes {self.patch_sizes}); pad it "
                             f"(vittm.tasks.segmentation.inference pads and crops back)")
        logits = self.decoder(self.features(x))  # (B, K, h, w)
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)

    # -------------------------------------------------------------------------------------------- training
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def backbone_param_names(self) -> list[str]:
        """Names (as in ``named_parameters()``) of the backbone's parameters; the rest are the decoder's."""
        return [f"backbone.{n}" for n, _ in self.backbone.named_parameters()]

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm's optimizer factory reads this): the backbone's
        position tables and prefix tokens, the decoder's class embeddings."""
        names = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}
        names |= {f"decoder.{n}" for n in getattr(self.decoder, "no_weight_decay", set)()}
        own = dict(self.named_parameters())
        return {n for n in names if n in own}

    # ------------------------------------------------------------------------------------------- weights
    def load_backbone(self, path: Any, key: str = "finetune.from_ckpt") -> str:
        """Start the backbone from a classification weight file (any format ``vittm.models.load_weights`` reads:
        ours, the authors', a timm ViT's); returns what was done, in one line. The file is loaded, exactly, into a
        full backbone of the same config (heads and all), from which the kept tensors are copied, so the parts
        pruned here (classifiers, the final process norm, an unread last write) neither fail the load nor count as
        missing. A timm ViT's position table is resampled to this backbone's grid. A file that does not fit raises
        ConfigError (``WeightsError``) and changes nothing."""
        full = self.build_backbone()
        try:
            if isinstance(full, ViTTM):
                report = load_weights(full, path, key=key)
            else:
                weights = read_state_dict(path, key=key)
                notes = resample_vit_pos(weights.state, full)
                report = load_weights(full, weights.state, key=key)
                report.source, report.notes = weights.source, weights.notes + notes + report.notes
                report.dropped = {**weights.dropped, **report.dropped}
        except ConfigError:
            raise
        except (ValueError, KeyError) as err:  # e.g. a timm ViT's file into a ViTTM of another size (from_vit.py)
            raise ConfigError(f"{key}={str(path)!r}: {err}") from None
        state = full.state_dict()
        own = self.backbone.state_dict()
        self.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
        unused = sorted({k.rsplit(".", 1)[0] for k in state.keys() - own.keys()})
        text = str(report)
        if unused:
            text += f"; not used for segmentation: {', '.join(unused[:6])}{', ...' if len(unused) > 6 else ''}"
        return text


def resample_vit_pos(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """A timm ViT's ``pos_embed`` resampled (in place) to the model's patch grid, prefix tokens kept; returns what
    was done."""
    table, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if table is None or own is None or table.shape == own.shape or table.shape[-1] != own.shape[-1]:
        return []
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    side = math.isqrt(table.shape[1] - prefix)
    if side * side != table.shape[1] - prefix:
        return []  # not a square grid: left for load_weights to refuse, naming the shapes
    grid = list(model.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(table.float(), grid, old_size=(side, side),
                                                num_prefix_tokens=prefix).to(table.dtype)
    return [f"pos_embed resampled from {side}x{side} to {grid[0]}x{grid[1]}"]
