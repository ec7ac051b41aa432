"""Stop a training run that cannot finish on this machine before it starts, with one line saying what it would take
and what to type instead.

``python run.py model=vittm_base`` without a GPU would train a 108 M-parameter model at 224 px on Fashion-MNIST
(28-px images upsampled 8x): days per run, 12 GB of memory, and nothing would say so. The estimate is a lower
bound: 2 FLOPs x the model's MACs per image x (3 x the training images, for forward + backward, + the images
validated and tested), at the matmul
rate this CPU reaches right now (measured in a fraction of a second; small models reach far less of it). Runs on an
accelerator are not estimated.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf

from vittm.core.errors import ConfigError
from vittm.models import create_model
from vittm.models.flops import count_macs
from vittm.training.naming import config_choices

NATIVE_SIZE = {"fashion_mnist": 28}  # datasets whose images all have one size


def on_cpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def matmul_gflops(seconds: float = 0.2) -> float:
    """fp32 matmul rate of this CPU now (GFLOP/s), with the run's thread count."""
    a = torch.randn(512, 512)
    a @ a  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start) / 1e9


def training_images(cfg: DictConfig, train_images: int) -> int:
    t, batch = cfg.trainer, cfg.data.batch_size
    steps = t.get("max_steps", -1)
    if steps and steps > 0:
        return steps * batch * t.get("accumulate_grad_batches", 1)
    per_epoch = train_images
    limit = t.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        per_epoch = min(per_epoch, limit * batch)
    elif isinstance(limit, float) and 0 < limit <= 1:
        per_epoch = int(per_epoch * limit)
    return per_epoch * t.max_epochs


def check_cpu_budget(cfg: DictConfig, train_images: int, eval_images: int = 0) -> None:
    """Raise ConfigError when a CPU run would need more than ``cpu_budget_hours`` (null: no limit)."""
    budget = cfg.get("cpu_budget_hours")
    if budget is None or not on_cpu(cfg):
        return
    args = {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": cfg.data.num_classes or 2}
    with torch.device("meta"):  # shapes only: no memory, no compute
        net = create_model(**args)
    size = cfg.model.img_size
    macs = count_macs(net, (cfg.data.in_chans, size, size))
    images = training_images(cfg, train_images)
    rate = matmul_gflops()
    hours = 2 * macs * (3 * images + eval_images) / (rate * 1e9) / 3600  # forward + backward; eval: forward
    if hours <= budget:
        return
    choice = config_choices().get("model") or cfg.model.name
    native = NATIVE_SIZE.get(cfg.data.dataset)
    upsampled = (f" ({cfg.data.dataset}'s {native}-px images upsampled {size / native:.0f}x)"
                 if native and size > native else "")
    raise ConfigError(
        f"model={choice} at {size} px{upsampled} on this CPU: {macs / 1e9:.3g} GMACs per image x {images:,} "
        f"training images (+ {eval_images:,} evaluated) needs at least {hours:,.0f} h here ({rate:.0f} GFLOP/s "
        f"measured), over cpu_budget_hours={budget}. "
        f"Train it on a GPU (trainer=gpu data=imagenet data.root=...), run `python run.py` for the 28-px "
        f"Fashion-MNIST model, or set cpu_budget_hours=null to run anyway"
    )
