"""Fashion-MNIST read from the four IDX ``.gz`` files of Debian's ``dataset-fashion-mnist`` package.

Written by hand (a dozen lines) because torchvision's ``FashionMNIST`` wants its own folder layout and checks md5
sums of its download mirror, which the Debian files do not match; nothing is ever downloaded here.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def missing_files(root: str | Path) -> list[str]:
    return [str(Path(root) / f) for pair in FILES.values() for f in pair if not (Path(root) / f).is_file()]


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


class FashionMNIST(Dataset):
    """``split`` is ``train`` (60,000 images) or ``test`` (10,000); items are ((1, 28, 28) uint8 tensor, label)."""

    classes = CLASSES

    def __init__(self, root: str | Path = DEBIAN_ROOT, split: str = "train", transform=None) -> None:
        images, labels = FILES[split]
        root = Path(root)
        self.images = torch.from_numpy(read_idx(root / images, 16).reshape(-1, 1, 28, 28).copy())
        self.targets = torch.from_numpy(read_idx(root / labels, 8).astype(np.int64))
        if len(self.images) != len(self.targets):
            raise ValueError(f"{root / images}: {len(self.images)} images but {len(self.targets)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.targets[index])
