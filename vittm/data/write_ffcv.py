"""Write FFCV ``.beton`` files from an ImageFolder, ImageNet-1K, ImageNet-21K-P or Fashion-MNIST.

    python -m vittm.data.write_ffcv --source imagefolder --root /data/folder --out-dir /data/folder_ffcv
    vittm-write-ffcv --source imagenet --root /data/imagenet --out-dir /data/in1k_ffcv --max-resolution 256 \\
        --write-mode proportion --compress-probability 0.5 --jpeg-quality 90 --workers 8

For each split this writes ``<out-dir>/<split>.beton`` and ``<split>.beton.json`` (the sidecar: source, class count,
class-to-index map, image counts, skipped files, writer settings). Images that cannot be decoded are reported by path
and skipped (``--on-error fail`` stops at the first one instead); an existing output is never replaced without
``--overwrite``, and a file is only renamed into place once it is complete.
FFCV's ``DatasetWriter`` does the writing (and shows its own progress bar); this module only prepares the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from vittm.core.errors import ConfigError
from vittm.data import fashion_mnist

SOURCES = ("imagefolder", "imagenet", "in21kp", "fashion_mnist")
SPLIT_DIRS = {
    "imagefolder": ("train", "val"), "imagenet": ("train", "val"), "in21kp": ("imagenet21k_train", "imagenet21k_val"),
}


@dataclass
class WriterSettings:
    max_resolution: int | None = 256
    write_mode: str = "jpg"              # raw | jpg | smart | proportion (FFCV's RGBImageField modes)
    jpeg_quality: int = 90
    compress_probability: float = 0.5   # proportion mode: share of images stored as JPEG
    workers: int = 2
    chunk_size: int = 100
    subset: int | None = None           # a seeded random subset of this many images per split
    on_error: str = "skip"              # skip | fail


def ffcv_missing_message() -> str:
    return ("FFCV is not installed: `make setup` builds it (apt: pkg-config g++ libopencv-core-dev "
            "libopencv-imgproc-dev libturbojpeg0-dev), or PKG_CONFIG_PATH=.build/opencv-shim .venv/bin/pip "
            "install -e '.[ffcv]' after scripts/setup.sh made the shim")


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise ConfigError(ffcv_missing_message()) from err


# ------------------------------------------------------------------------------------------------ sources
def list_samples(source: str, root: Path, split: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, label) pairs and the class-to-index map of one split of a folder-based source."""
    from torchvision.datasets import ImageFolder, ImageNet

    if source == "imagenet":
        ds = ImageNet(str(root), split=split)
        return list(ds.samples), dict(ds.wnid_to_idx)
    folder = root / SPLIT_DIRS[source][0 if split == "train" else 1] if source == "in21kp" else root / split
    ds = ImageFolder(str(folder))
    return list(ds.samples), dict(ds.class_to_idx)


def unreadable(path: str) -> str | None:
    """None if ``path`` decodes as an image, else the reason."""
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
        return None
    except Exception as err:  # PIL raises many types for broken files
        return f"{type(err).__name__}: {err}"


class FolderImages(Dataset):
    """What FFCV's writer reads: (RGB PIL image, label)."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), label


class GreyAsRGB(Dataset):
    """Fashion-MNIST's (1, 28, 28) uint8 images as (28, 28, 3) arrays: FFCV stores RGB images."""

    def __init__(self, split: str, root: Path) -> None:
        self.data = fashion_mnist.FashionMNIST(root, split)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.data[index]
        return np.repeat(image.numpy().transpose(1, 2, 0), 3, axis=2), label


# -------------------------------------------------------------------------------------------------- write
def write_split(source: str, root: Path, split: str, out: Path, settings: WriterSettings,
                overwrite: bool = False) -> dict[str, Any]:
    """Write one split to ``out`` (a ``.beton`` path); returns the sidecar contents (also written next to it)."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    sidecar = out.with_name(out.name + ".json")
    if not overwrite and (out.exists() or sidecar.exists()):
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it (nothing was written)")
    start = time.perf_counter()
    skipped: list[dict[str, str]] = []
    if source == "fashion_mnist":
        dataset: Dataset = GreyAsRGB("train" if split == "train" else "test", root)
        class_to_idx = {name: i for i, name in enumerate(fashion_mnist.CLASSES)}
        indices = list(range(len(dataset)))
    else:
        samples, class_to_idx = list_samples(source, root, split)
        with Pool(settings.workers) as pool:  # decode every image once: a broken one would kill FFCV's writer
            reasons = list(tqdm(pool.imap(unreadable, [p for p, _ in samples], chunksize=64), total=len(samples),
                                desc=f"checking {split} images", file=sys.stderr))
        for (path, _), reason in zip(samples, reasons, strict=True):
            if reason is None:
                continue
            if settings.on_error == "fail":
                raise ConfigError(f"unreadable image {path}: {reason} (--on-error skip would skip it)")
            skipped.append({"path": path, "error": reason})
        dataset = FolderImages(samples)
        indices = [i for i, reason in enumerate(reasons) if reason is None]
    if settings.subset is not None and settings.subset < len(indices):
        rng = np.random.default_rng(0)
        indices = sorted(rng.choice(indices, size=settings.subset, replace=False).tolist())
    if not indices:
        raise ConfigError(f"no readable images for split {split!r} under {root}")

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    fields = {
        "image": RGBImageField(write_mode=settings.write_mode, max_resolution=settings.max_resolution,
                               jpeg_quality=settings.jpeg_quality, compress_probability=settings.compress_probability),
        "label": IntField(),
    }
    DatasetWriter(str(partial), fields, num_workers=settings.workers).from_indexed_dataset(
        dataset, indices=indices, chunksize=settings.chunk_size
    )
    os.replace(partial, out)  # complete files only ever appear under the final name
    info = {
        "source": source, "root": str(root), "split": split, "file": str(out),
        "num_classes": len(class_to_idx), "class_to_idx": class_to_idx,
        "num_images": len(indices), "num_skipped": len(skipped), "skipped": skipped,
        "settings": asdict(settings), "ffcv_version": version("ffcv"),
        "seconds": round(time.perf_counter() - start, 2),
    }
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--root", type=Path, default=None, help="dataset root (Fashion-MNIST: the Debian folder)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    defaults = WriterSettings()
    parser.add_argument("--max-resolution", type=int, default=defaults.max_resolution,
                        help="longest side stored (0: keep the original size)")
    parser.add_argument("--write-mode", choices=["raw", "jpg", "smart", "proportion"], default=defaults.write_mode)
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--compress-probability", type=float, default=defaults.compress_probability)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument("--subset", type=int, default=None, help="a seeded random subset of N images per split")
    parser.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                        help="unreadable images: report and skip them, or stop at the first one")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    args = parser.parse_args(argv)
    root = args.root or (Path(fashion_mnist.DEBIAN_ROOT) if args.source == "fashion_mnist" else None)
    settings = WriterSettings(
        max_resolution=args.max_resolution or None, write_mode=args.write_mode, jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability, workers=args.workers, chunk_size=args.chunk_size,
        subset=args.subset, on_error=args.on_error,
    )
    try:
        if root is None or not root.is_dir():
            raise ConfigError(f"--root={root} is not a directory")
        outs = [args.out_dir / f"{split}.beton" for split in args.splits]
        existing = [str(o) for o in outs if o.exists()]
        if existing and not args.overwrite:  # checked for every split before anything is written
            raise ConfigError(f"{existing} already exist; pass --overwrite to replace them (nothing was written)")
        for split, out in zip(args.splits, outs, strict=True):
            info = write_split(args.source, root, split, out, settings, overwrite=args.overwrite)
            print(f"{split}: wrote {info['num_images']} images of {info['num_classes']} classes to {out} "
                  f"in {info['seconds']:.1f} s; skipped {info['num_skipped']} unreadable"
                  + "".join(f"\n  skipped {s['path']}: {s['error']}" for s in info["skipped"]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
