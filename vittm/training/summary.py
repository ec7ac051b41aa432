"""The model summary job: build the configured model, count parameters and MACs, time a forward pass.

``python run.py mode=summary [summary.batch_size=8] [summary.threads=N]``; also a quick way to check a
configuration: ``python run.py mode=summary model=vittm_base model.memory_ps=16 model.process_ps=32``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vittm.models import create_model, forward_heads
from vittm.models.flops import count_macs, count_params
from vittm.training.naming import model_label, params_note


def build_from_config(cfg: DictConfig) -> torch.nn.Module:
    """The ``model`` config node (plain, resolved) -> ``create_model(name, **rest)``."""
    model_cfg: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    return create_model(model_cfg.pop("name"), **model_cfg)


@torch.no_grad()
def summarize(cfg: DictConfig) -> dict[str, Any]:
    if cfg.summary.threads:
        torch.set_num_threads(int(cfg.summary.threads))
    torch.manual_seed(cfg.seed)
    model = build_from_config(cfg).eval()
    input_size = (cfg.model.in_chans, *[cfg.model.img_size] * 2)
    batch = cfg.summary.batch_size
    x = torch.randn(batch, *input_size)
    outputs = forward_heads(model, x)  # also the warm-up run
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        "model": cfg.model.name,
        "label": model_label(cfg),
        "params_M": count_params(model) / 1e6,
        "gmacs": count_macs(model, input_size) / 1e9,
        "gmacs_with_norms": count_macs(model, input_size, count_norms=True) / 1e9,
        "heads": {k: list(v.shape) for k, v in outputs.items()},
        "forward_ms": 1000 * seconds,
        "images_per_s": batch / seconds,
        "threads": torch.get_num_threads(),
    }
    print(OmegaConf.to_yaml(cfg.model, resolve=True))
    print(
        f"{result['label']}\n{result['params_M']:.2f} M params ({params_note(cfg, cfg.model.num_classes)}; the "
        f"README's tables count 3 channels and 1,000 classes), {result['gmacs']:.3g} GMACs "
        f"({result['gmacs_with_norms']:.3g} with LayerNorms, fvcore convention) at {input_size[1]}x{input_size[2]}\n"
        f"heads {result['heads']}; forward of {batch} images: {result['forward_ms']:.1f} ms median of 3 "
        f"({result['images_per_s']:.1f} images/s, {result['threads']} threads, fp32, eager)"
    )
    return result
