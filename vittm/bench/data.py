"""Data-loader benchmark: FFCV vs torchvision ImageFolder on the same JPEGs, same output size, same augmentation,
same worker count, in one run (``make bench-data`` or ``python -m vittm.bench.data``).

The JPEGs are made from Fashion-MNIST test images (no download): each is upscaled to a random size between
``--min-side`` and ``--max-side`` pixels (224 by default: "224-px JPEGs"), tinted per image so the three channels
differ, given mild noise so it compresses like a photograph, and saved at JPEG quality 90 into an ImageFolder.
The same folder is written to ``.beton`` files (``--write-modes``; ``jpg`` keeps JPEG bytes at their original
size, ``raw`` stores decoded pixels). Train pipelines: RandomResizedCrop(0.08-1) to ``--img-size`` + flip +
normalise; val: resize to img_size/0.875 + centre crop (torchvision) vs FFCV's centre-crop decoder with the same
ratio. The first epoch of each loader (FFCV's numba compilation, torchvision's worker start) is timed apart;
images/s is the mean over the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_jpegs(out: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> Path:
    """``count`` JPEGs in ``out/train/<class>/`` and ``out/val/<class>/`` (the same images in both)."""
    from vittm.data.fashion_mnist import CLASSES, FashionMNIST

    data = FashionMNIST(split="test")
    rng = np.random.default_rng(seed)
    for index in range(count):
        grey, label = data[index]
        side = rng.integers(min_side, max_side + 1, size=2)
        big = np.asarray(Image.fromarray(grey[0].numpy()).resize(tuple(int(s) for s in side), Image.BICUBIC))
        tint = rng.uniform(0.4, 1.0, size=3)
        rgb = big[..., None] * tint + rng.normal(0, 8, size=(*big.shape, 3)) + 20
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        for split in ("train", "val"):
            folder = out / split / CLASSES[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:05d}.jpg", quality=90)
    return out


def torchvision_loaders(root: Path, img_size: int, batch_size: int, workers: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from vittm.data.transforms import eval_transform, train_transform

    aug = {"rrc_scale": [0.08, 1.0], "hflip": 0.5}
    train = ImageFolder(str(root / "train"), train_transform(aug, img_size, 3, IMAGENET_MEAN, IMAGENET_STD))
    val = ImageFolder(str(root / "val"), eval_transform(img_size, 3, 0.875, IMAGENET_MEAN, IMAGENET_STD))
    common = dict(batch_size=batch_size, num_workers=workers, persistent_workers=True)
    return {"train": DataLoader(train, shuffle=True, drop_last=True, **common),
            "val": DataLoader(val, shuffle=False, **common)}


def ffcv_loaders(betons: Path, img_size: int, batch_size: int, workers: int) -> dict[str, Any]:
    from vittm.data.ffcv_loader import FFCVDataModule

    dm = FFCVDataModule("ffcv", str(betons / "train.beton"), str(betons / "val.beton"), None, 3, img_size, 0.875,
                        IMAGENET_MEAN, IMAGENET_STD, batch_size, num_workers=workers, os_cache=True,
                        augment={"rrc_scale": [0.08, 1.0], "hflip": 0.5})
    return {"train": dm.build_loader("train"), "val": dm.build_loader("val")}


def time_loader(loader: Any, epochs: int) -> dict[str, float]:
    """First epoch apart (compilation, worker start), then images/s over the remaining epochs."""
    def epoch() -> tuple[float, int]:
        start, images = time.perf_counter(), 0
        for x, _ in loader:
            images += len(x)
        return time.perf_counter() - start, images

    first, _ = epoch()
    seconds = images = 0
    for _ in range(epochs - 1):
        s, n = epoch()
        seconds, images = seconds + s, images + n
    return {"first_epoch_s": round(first, 2), "images_per_s": round(images / seconds, 1)}


def randaugment_cost(img_size: int, batch_size: int) -> float:
    """Milliseconds per image of the torch-side, per-image RandAugment 2/15 on decoded uint8 tensors (CPU)."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=2, magnitude=15)
    x = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8)
    torch.stack([ra(img) for img in x])  # warm-up
    start = time.perf_counter()
    torch.stack([ra(img) for img in x])
    return round(1000 * (time.perf_counter() - start) / batch_size, 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_data"))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--min-side", type=int, default=224)
    parser.add_argument("--max-side", type=int, default=224)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per loader, the first one apart")
    parser.add_argument("--write-modes", nargs="+", default=["jpg", "raw"], choices=["jpg", "raw", "proportion"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the main process only collects batches; decoding runs in the workers/threads

    from vittm.data.write_ffcv import WriterSettings, require_ffcv, write_split

    require_ffcv()
    folder = args.out / "jpegs"
    if not (folder / "train").is_dir():
        make_jpegs(folder, args.images, args.min_side, args.max_side)
    results: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)}, "loaders": {}}
    tv = torchvision_loaders(folder, args.img_size, args.batch_size, args.workers)
    for split in ("train", "val"):
        results["loaders"][f"torchvision {split}"] = time_loader(tv[split], args.epochs)
    del tv
    for mode in args.write_modes:
        betons = args.out / f"beton_{mode}"
        settings = WriterSettings(max_resolution=None, write_mode=mode, workers=args.workers)
        for split in ("train", "val"):
            if not (betons / f"{split}.beton").exists():
                write_split("imagefolder", folder, split, betons / f"{split}.beton", settings)
        loaders = ffcv_loaders(betons, args.img_size, args.batch_size, args.workers)
        for split in ("train", "val"):
            results["loaders"][f"ffcv {mode} {split}"] = time_loader(loaders[split], args.epochs)
    results["randaugment_ms_per_image"] = randaugment_cost(args.img_size, args.batch_size)

    base = {split: results["loaders"][f"torchvision {split}"]["images_per_s"] for split in ("train", "val")}
    print(f"\n{args.images} JPEGs of {args.min_side}-{args.max_side} px -> {args.img_size} px, batch "
          f"{args.batch_size}, {args.workers} workers, {args.epochs - 1} timed epochs after the first")
    print(f"{'loader':<22}{'images/s':>10}{'first epoch s':>15}{'vs torchvision':>16}")
    for name, r in results["loaders"].items():
        ratio = r["images_per_s"] / base[name.rsplit(" ", 1)[1]]
        r["ratio_vs_torchvision"] = round(ratio, 2)
        print(f"{name:<22}{r['images_per_s']:>10.1f}{r['first_epoch_s']:>15.2f}{ratio:>15.2f}x")
    print(f"torch-side per-image RandAugment 2/15 (when enabled with data=ffcv): "
          f"{results['randaugment_ms_per_image']} ms per image on this CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
