"""timm entrypoints: ``import vittm`` registers ``vittm_{test,tiny,small,base,large}`` with timm.

Every size defaults to the published setting (SPEC §7): memory_ps 28, process_ps 28, ``lin`` read/write heads
with latent_size_scale 4, ``residual`` fusion, ``patch`` process embedder, no memory block. Any of those is a
keyword away: ``timm.create_model("vittm_base", memory_ps=16, process_ps=32, rw_head="ca")``.

``features_only=True`` wraps the model in timm's FeatureGetterNet (``forward_intermediates``; default taps: both
streams of the last layer). ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)`` loads a local file
of any supported format through ``ViTTM.load_pretrained`` (timm's ``custom_load`` hook; vittm.models.loading).
"""

from __future__ import annotations

import math
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from vittm.core.registry import spec_name
from vittm.models.loading import weights_filter
from vittm.models.vittm import ViTTM

# Widths of timm's ViTs (SPEC §7); vittm_test is a few-thousand-parameter model for CI on 32x32 inputs.
SIZES: dict[str, dict[str, Any]] = {
    "vittm_test": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32, memory_ps=4, process_ps=8),
    "vittm_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vittm_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vittm_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vittm_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def input_sizes(in_chans: int, img_size: Any, memory_ps: int, process_ps: int | None) -> dict[str, tuple]:
    """``input_size`` (what the model is built for) and ``min_input_size``: a 4 x 4 grid of the coarsest cut that
    both patch sizes divide (``process_ps=None``: the process stream is not cut from the image), so that timm's tools,
    which shrink inputs to at least this size, never pick one the patch sizes cannot cut."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    step = math.lcm(memory_ps, process_ps) if process_ps else memory_ps
    return dict(input_size=(in_chans, h, w), min_input_size=(in_chans, min(h, 4 * step), min(w, 4 * step)))


def _cfg(name: str) -> dict[str, Any]:
    # No url / hf_hub_id: there are no hosted ViTTM weights, so pretrained=True never reaches for the network;
    # load local files with pretrained_cfg_overlay=dict(file=...) (any format vittm.models.loading reads).
    size = SIZES[name]
    return dict(
        url="", num_classes=1000, **input_sizes(3, size.get("img_size", 224), size.get("memory_ps", 28),
                                                size.get("process_ps", 28)),
        pool_size=None, crop_pct=224 / 256, interpolation="bicubic", fixed_input_size=False,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, custom_load=True,
        first_conv=("memory_embed", "process_embed.proj"), classifier=("head", "process_head"),
        license="apache-2.0", paper_ids="arXiv:2409.07613",
        paper_name="Token Turing Machines are Efficient Vision Models",
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in SIZES})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ViTTM:
    kwargs = {**SIZES[variant], **kwargs}
    # The config describes the model as built (its size, channels and patch sizes), not only the default one.
    patch = spec_name(kwargs.get("process_embed", "patch")) == "patch"
    sizes = input_sizes(kwargs.get("in_chans", 3), kwargs.get("img_size", 224), kwargs.get("memory_ps", 28),
                        kwargs.get("process_ps", 28) if patch else None)
    # custom_load: timm hands a file to ViTTM.load_pretrained (timm resets it when an overlay names a file)
    overlay = {**sizes, "custom_load": True, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    depth = kwargs["depth"]
    out_indices = kwargs.pop("out_indices", (depth - 1, 2 * depth - 1))  # features_only: the last layer's 2 streams
    return build_model_with_cfg(
        ViTTM, variant, pretrained, pretrained_cfg_overlay=overlay, pretrained_filter_fn=weights_filter,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
    )


@register_model
def vittm_test(pretrained: bool = False, **kwargs: Any) -> ViTTM:
    """A tiny ViTTM for tests: D 32, 2 layers, 2 heads, 32x32 input, memory_ps 4 (64 tokens), process_ps 8 (16)."""
    return _create("vittm_test", pretrained, **kwargs)


@register_model
def vittm_tiny(pretrained: bool = False, **kwargs: Any) -> ViTTM:
    """ViTTM-Ti: ViT-Ti widths (D 192, 12 layers, 3 heads)."""
    return _create("vittm_tiny", pretrained, **kwargs)


@register_model
def vittm_small(pretrained: bool = False, **kwargs: Any) -> ViTTM:
    """ViTTM-S: ViT-S widths (D 384, 12 layers, 6 heads)."""
    return _create("vittm_small", pretrained, **kwargs)


@register_model
def vittm_base(pretrained: bool = False, **kwargs: Any) -> ViTTM:
    """ViTTM-B: ViT-B widths (D 768, 12 layers, 12 heads)."""
    return _create("vittm_base", pretrained, **kwargs)


@register_model
def vittm_large(pretrained: bool = False, **kwargs: Any) -> ViTTM:
    """ViTTM-L: ViT-L widths (D 1024, 24 layers, 16 heads)."""
    return _create("vittm_large", pretrained, **kwargs)
