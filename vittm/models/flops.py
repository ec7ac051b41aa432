"""Parameter and multiply-accumulate counts, attention matmuls included (SPEC §8).

PyTorch's ``FlopCounterMode`` counts matmuls, convolutions and the fused attention kernels it knows; the CPU
flash-attention kernel that ``F.scaled_dot_product_attention`` dispatches to on CPU is not among them, so it is
registered here with the same formula. FLOPs / 2 = MACs.

Norms, activations and softmax are not MACs and are not counted by default. ``count_norms=True`` adds fvcore's
convention for LayerNorm (5 per element with an affine transform), which is how the published figures were made:
ViT-B/16 17.56 G matmul MACs + 0.02 G norms = fvcore's 17.58 G; ViTTM-B 28/28 7.14 G + 0.02 G = 7.16 G.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _layer_norm_formula(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 5 * math.prod(input_shape)  # in FLOPs (halved to MACs at the end): 5 per element, as fvcore


# Fused attention kernels missing from torch's table, counted like the ones it has.
_ATTENTION_FORMULAS = {
    op: _sdpa_formula
    for op in (
        getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),
        getattr(aten, "_scaled_dot_product_fused_attention_overrideable", None),
    )
    if op is not None
}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(
    model: torch.nn.Module,
    input_size: tuple[int, int, int] = (3, 224, 224),
    batch_size: int = 1,
    count_norms: bool = False,
) -> int:
    """Multiply-accumulates of one forward pass (eval mode) on ``batch_size`` images of ``input_size``.

    Works on the meta device too (``with torch.device("meta"): model = ...``), which costs no memory or compute.
    """
    param = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, device=param.device, dtype=param.dtype)
    formulas = dict(_ATTENTION_FORMULAS)
    if count_norms:
        formulas[aten.native_layer_norm] = _layer_norm_formula
    counter = FlopCounterMode(display=False, custom_mapping=formulas)
    was_training = model.training
    model.eval()
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> None:
    """``python -m vittm.models.flops vittm_base vit_base_patch16_224 [--img-size 224] [--set memory_ps=16 ...]``"""
    import argparse

    import yaml

    from vittm.models import create_model

    parser = argparse.ArgumentParser(description="Parameters and MACs at batch 1 (built on the meta device).")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ViTTM keyword arguments (YAML)")
    args = parser.parse_args(argv)
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    print("| model | params (M) | GMACs | GMACs incl. LayerNorm (fvcore) |\n| --- | --- | --- | --- |")
    for name in args.models:
        with torch.device("meta"):
            model = create_model(name, img_size=args.img_size, **(extra if name.startswith("vittm_") else {}))
        size = (model.in_chans if hasattr(model, "in_chans") else 3, args.img_size, args.img_size)
        print(
            f"| {name} {extra if name.startswith('vittm_') and extra else ''} | {count_params(model) / 1e6:.2f} | "
            f"{count_macs(model, size) / 1e9:.3f} | {count_macs(model, size, count_norms=True) / 1e9:.3f} |"
        )


if __name__ == "__main__":
    main()
