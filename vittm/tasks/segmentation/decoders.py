"""Segmentation decoders: a feature map (B, C_in, h, w) -> class logits (B, K, h, w) on the same grid.

- ``segmenter``: Segmenter's mask transformer (Strudel et al., ICCV 2021) as mmsegmentation builds it
  (``SegmenterMaskTransformerHead``), which is what the ViTTM paper's ADE20K numbers use.
- ``linear``: Segmenter's linear decoder, a per-token linear classifier (mmseg: ``FCNHead`` with ``num_convs=0``).

Specs are ``{"name": ..., **knobs}`` as for the model's components (``vittm.core.registry``); the segmentation
network owns ``in_dim``, ``num_classes`` and ``backbone_dim``, a config sets only the knobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from vittm.core.errors import ConfigError
from vittm.core.registry import Registry

DECODERS = Registry("decoder")
# Set by the network from the backbone and the data, never by a config.
OWNED = ("in_dim", "num_classes", "backbone_dim")


def positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"decoder.{key}={value!r}: must be a positive integer")


def unit_rate(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"decoder.{key}={value!r}: must be a number in [0, 1)")


@DECODERS.register("segmenter")
class SegmenterDecoder(nn.Module):
    """Segmenter's mask transformer: patch tokens and K learned class embeddings go through ``n_layers`` pre-norm
    transformer layers; each patch's class scores are the cosine similarities of its projection with the class
    projections, layer-normalised over the K classes.

    As mmseg's head: LayerNorms with torch's default eps 1e-5 (mmcv's ``build_norm_layer(dict(type="LN"))``),
    stochastic depth linspace(0, drop_path, n_layers) (ADE20K config: 0.1), dropout after the attention projection
    and in the MLP (``drop_rate``, 0 there), no attention dropout; patch_proj/classes_proj without bias.
    Init as mmseg's ``init_weights``: every Linear trunc-normal std 0.02 with zero bias, class embeddings trunc-normal
    0.02, LayerNorms 1/0; the qkv projection xavier-uniform, as torch's ``nn.MultiheadAttention`` (which mmseg's
    layers use) initialises its in-projection, a Parameter that mmseg's Linear loop does not reach.

    Args:
        in_dim: channels of the feature map (the backbone's width, 2x for two streams side by side).
        num_classes: K.
        backbone_dim: the backbone's token width, the default ``d_model`` (mmseg's ``embed_dims``: 768 for B).
        d_model: the decoder's width; ``None``: ``backbone_dim`` (or ``in_dim`` when that is not given).
        n_layers, n_heads, mlp_ratio: the transformer layers (mmseg's ADE20K config: 2, 12, 4).
        drop_path, dropout: stochastic depth and dropout rates.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        backbone_dim: int | None = None,
        d_model: int | None = None,
        n_layers: int = 2,
        n_heads: int | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        d_model = d_model if d_model is not None else (backbone_dim or in_dim)
        n_heads = n_heads if n_heads is not None else max(1, d_model // 64)  # ViT-B's heads of 64: 12 at 768
        for key, value in (("in_dim", in_dim), ("num_classes", num_classes), ("d_model", d_model),
                           ("n_layers", n_layers), ("n_heads", n_heads)):
            positive_int(key, value)
        if d_model % n_heads:
            raise ConfigError(f"decoder.d_model={d_model}: must be divisible by decoder.n_heads={n_heads}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, int | float) or mlp_ratio <= 0:
            raise ConfigError(f"decoder.mlp_ratio={mlp_ratio!r}: must be a positive number")
        unit_rate("drop_path", drop_path)
        unit_rate("dropout", dropout)
        self.num_classes, self.d_model = num_classes, d_model
        self.proj_in = nn.Linear(in_dim, d_model)  # mmseg's dec_proj
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, drop_path=rate,
                  norm_layer=nn.LayerNorm)  # (timm's default norm would be eps 1e-6)
            for rate in calculate_drop_path_rates(drop_path, n_layers)
        )
        self.norm = nn.LayerNorm(d_model)  # decoder_norm
        self.patch_proj = nn.Linear(d_model, d_model, bias=False)
        self.classes_proj = nn.Linear(d_model, d_model, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.cls_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        B, _, h, w = features.shape
        x = self.proj_in(features.flatten(2).transpose(1, 2))  # (B, h·w, d_model)
        x = torch.cat([x, self.cls_emb.expand(B, -1, -1)], dim=1)  # (B, h·w + K, d_model)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        K = self.num_classes
        patches = F.normalize(self.patch_proj(x[:, :-K]), dim=-1)  # (B, h·w, d_model), unit length
        classes = F.normalize(self.classes_proj(x[:, -K:]), dim=-1)  # (B, K, d_model)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h·w, K), normalised over the classes
        # (B, K, h, w) in the standard layout: the transpose's strides would make the upsampling after it take 4x
        # as long on CPU (measured: 500 vs 120 ms for 150 classes 16x16 -> 512x512)
        return masks.transpose(1, 2).reshape(B, K, h, w).contiguous()


@DECODERS.register("linear")
class LinearDecoder(nn.Module):
    """One linear map from each feature vector to K class logits (a 1x1 convolution); init as mmseg's
    ``conv_seg``: normal std 0.01, zero bias."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        positive_int("in_dim", in_dim)
        positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)  # (B, C_in, h, w) -> (B, K, h, w)


def build_decoder(spec: str | Mapping[str, Any], in_dim: int, num_classes: int, backbone_dim: int) -> nn.Module:
    """A decoder from its spec (a name or ``{"name": ..., **knobs}``); a bad name or knob raises ConfigError."""
    if isinstance(spec, Mapping):
        owned = sorted(set(spec) & set(OWNED))
        if owned:
            raise ConfigError(f"decoder.{owned[0]}={spec[owned[0]]!r}: set by the network from the backbone and "
                              f"num_classes, not by the decoder config; remove it")
    try:
        DECODERS.parse(spec)  # the name and knobs, checked before anything is built
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    return DECODERS.build(spec, in_dim=in_dim, num_classes=num_classes, backbone_dim=backbone_dim)
