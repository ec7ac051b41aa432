"""timm entrypoints: ``import vittm`` registers ``vittm_{test,tiny,small,base,large}`` with timm.

Every size defaults to the published setting (SPEC §7): memory_ps 28, process_ps 28, ``lin`` read/write heads
with latent_size_scale 4, ``residual`` fusion, ``patch`` process embedder, no memory block. Any of those is a
keyword away: ``timm.create_model("vittm_base", memory_ps=16, process_ps=32, rw_head="ca")``.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from vittm.models.from_vit import vit_checkpoint_filter
from vittm.models.vittm import ViTTM

# Widths of timm's ViTs (SPEC §7); vittm_test is a few-thousand-parameter model for CI on 32x32 inputs.
SIZES: dict[str, dict[str, Any]] = {
    "vittm_test": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32, memory_ps=4, process_ps=8),
    "vittm_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vittm_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vittm_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vittm_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def _cfg(input_size: tuple[int, int, int] = (3, 224, 224)) -> dict[str, Any]:
    # No url / hf_hub_id: there are no hosted ViTTM weights, so pretrained=True never reaches for the network;
    # load local files with pretrained_cfg_overlay=dict(file=...) (a timm ViT or ViTTM state dict).
    return dict(
        url="", num_classes=1000, input_size=input_size, pool_size=None, crop_pct=224 / 256, interpolation="bicubic",
        fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=("memory_embed", "process_embed.proj"), classifier=("head", "process_head"),
        license="apache-2.0", paper_ids="arXiv:2409.07613",
        paper_name="Token Turing Machines are Efficient Vision Models",
    )


default_cfgs = generate_default_cfgs(
    {name: _cfg((3, 32, 32) if name == "vittm_test" else (3, 224, 224)) for name in SIZES}
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ViTTM:
    return build_model_with_cfg(
        ViTTM, variant, pretrained, pretrained_filter_fn=vit_checkpoint_filter, **{**SIZES[variant], **kwargs}
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
