"""Shared test helpers: compose the real config tree, tiny overrides, fake image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A model and a data slice small enough for a few seconds of CPU training.
TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "data.train_subset=512", "data.val_subset=256", "data.test_subset=256", "data.batch_size=64",
    "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1", "logger=none", "schedule.warmup_steps=2",
]


def compose_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"output_dir={tmp_path}"])


def run_cli(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_image_folder(root: Path, split_dirs: tuple[str, str], classes: list[str], per_class: int = 6) -> Path:
    """JPEGs of varied sizes (grey Fashion-MNIST-like blobs coloured per class) in <root>/<split>/<class>/."""
    rng = np.random.default_rng(0)
    for split in split_dirs:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(40, 90, size=2)
                img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
                img[..., c % 3] += 150
                Image.fromarray(img).save(folder / f"img_{i}.JPEG", quality=90)
    return root


def make_imagenet(root: Path, num_classes: int = 3) -> Path:
    """torchvision's ImageNet layout: train/<wnid>/, val/<wnid>/ and meta.bin (wnid -> class names, val wnids)."""
    wnids = [f"n{index:08d}" for index in range(num_classes)]
    make_image_folder(root, ("train", "val"), wnids)
    val_wnids = [w for w in wnids for _ in range(6)]
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, val_wnids), root / "meta.bin")
    return root


def start_cli(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python run.py ...`` in the background, one CPU thread (bit-identical to an in-process run on one thread),
    stdout and stderr to files in ``cwd`` (pipes nobody reads could fill up and stall it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", **(env or {}))
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:  # the child keeps its copies
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, stdout=out,
                                stderr=err)
