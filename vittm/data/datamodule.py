"""One LightningDataModule for every torchvision-path dataset: Fashion-MNIST, ImageFolder, ImageNet-1K, ImageNet-21K-P.

Samplers are made here rather than by Lightning (``use_distributed_sampler=False`` in the trainer configs).
Training: a ``DistributedSampler`` (one device as many) whose order depends only on (seed, epoch), and a loader that
reseeds every RNG from (seed, epoch, rank) when an epoch's iteration starts, so augmentation, dropout and mixup of
an epoch do not depend on what ran before it: a run resumed at an epoch boundary repeats a straight run exactly.
Both are read when the epoch's iterator is made; the trainer configs set ``reload_dataloaders_every_n_epochs: 1``
because Lightning otherwise makes a resumed run's first iterator before it restores the epoch counter.
Validation gives each rank a disjoint, unpadded shard, so metrics reduced across ranks count every image exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder, ImageNet

from vittm.data import fashion_mnist
from vittm.data.transforms import BatchTransform, eval_transform, train_transform
from vittm.errors import ConfigError


class DataConfigError(ConfigError):
    """A data setting that cannot work (raised before any image is read)."""


def _folder(root: Path, train: bool, transform: Callable, cfg: Mapping[str, Any]) -> Dataset:
    return ImageFolder(str(root / cfg["train_dir" if train else "val_dir"]), transform=transform)


def _fashion_mnist(root: Path, train: bool, transform: Callable, cfg: Mapping[str, Any]) -> Dataset:
    return fashion_mnist.FashionMNIST(root, "train" if train else "test", transform=transform)


def _imagenet(root: Path, train: bool, transform: Callable, cfg: Mapping[str, Any]) -> Dataset:
    return ImageNet(str(root), split="train" if train else "val", transform=transform)  # torchvision's layout


DATASETS: dict[str, Callable[[Path, bool, Callable, Mapping[str, Any]], Dataset]] = {
    "fashion_mnist": _fashion_mnist,
    "imagefolder": _folder,
    "imagenet": _imagenet,
    "in21kp": _folder,  # ImageNet-21K-P winter-21: imagenet21k_train/<wnid>/*.JPEG, imagenet21k_val/...
}


def expected_paths(dataset: str, root: Path, train_dir: str, val_dir: str) -> list[Path]:
    """What must exist under ``root`` for ``dataset`` (checked before anything is read)."""
    if dataset == "fashion_mnist":
        return [root / f for pair in fashion_mnist.FILES.values() for f in pair]
    if dataset == "imagenet":
        return [root / "train", root / "val"]
    return [root / train_dir, root / val_dir]


class EpochSampler(DistributedSampler):
    """A DistributedSampler that reads the epoch from ``epoch_fn`` when iteration starts."""

    def __init__(self, dataset: Dataset, epoch_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        self.set_epoch(self.epoch_fn())
        return super().__iter__()


class SeededLoader(DataLoader):
    """A DataLoader that reseeds torch, numpy and random from ``seed_fn()`` when an epoch's iteration starts
    (worker processes draw their seeds from it too)."""

    def __init__(self, *args: Any, seed_fn: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed_fn = seed_fn

    def __iter__(self):
        seed_everything(self.seed_fn(), verbose=False)
        return super().__iter__()


def first(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` items (all when ``n`` is None): quick runs and tests."""
    return Subset(dataset, range(min(n, len(dataset)))) if n else dataset


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders for ``dataset`` (one of ``DATASETS``); see conf/data/*.yaml for every key."""

    def __init__(
        self,
        dataset: str,
        root: str | None,
        num_classes: int | None,
        in_chans: int,
        img_size: int,
        crop_pct: float,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_dir: str = "train",
        val_dir: str = "val",
        train_subset: int | None = None,
        val_subset: int | None = None,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = dict(
            dataset=dataset, root=root, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
            crop_pct=crop_pct, mean=list(mean), std=list(std), batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory, train_dir=train_dir, val_dir=val_dir, train_subset=train_subset,
            val_subset=val_subset,
        )
        self.augment = dict(augment or {})
        self.seed = seed
        self.check()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def check(self) -> None:
        """Every data key a user can get wrong, before any image is read: one error naming key, value and rule."""
        c = self.cfg
        if c["dataset"] not in DATASETS:
            raise DataConfigError(f"data.dataset={c['dataset']!r} is not known; choose one of {sorted(DATASETS)}")
        if not c["root"]:
            raise DataConfigError(
                f"data.root is not set for data.dataset={c['dataset']!r}; pass data.root=/path/to/data"
            )
        root = Path(c["root"])
        if not root.is_dir():
            raise DataConfigError(f"data.root={str(root)!r} does not exist or is not a directory")
        missing = [str(p) for p in expected_paths(c["dataset"], root, c["train_dir"], c["val_dir"]) if not p.exists()]
        if missing:
            raise DataConfigError(f"data.root={str(root)!r} lacks what data.dataset={c['dataset']!r} needs: {missing}")
        for key in ("batch_size", "img_size", "in_chans"):
            if not isinstance(c[key], int) or c[key] <= 0:
                raise DataConfigError(f"data.{key}={c[key]!r} must be a positive integer")
        if not isinstance(c["num_workers"], int) or c["num_workers"] < 0:
            raise DataConfigError(f"data.num_workers={c['num_workers']!r} must be an integer >= 0")
        for key in ("train_subset", "val_subset"):
            if c[key] is not None and (not isinstance(c[key], int) or c[key] <= 0):
                raise DataConfigError(f"data.{key}={c[key]!r} must be a positive integer or null (all images)")
        if not 0 < c["crop_pct"] <= 1:
            raise DataConfigError(f"data.crop_pct={c['crop_pct']!r} must be in (0, 1]")
        if len(c["mean"]) != c["in_chans"] or len(c["std"]) != c["in_chans"]:
            raise DataConfigError(f"data.mean / data.std need {c['in_chans']} values (data.in_chans), got {c['mean']}")

    # --------------------------------------------------------------------------------------------- datasets
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c, root = self.cfg, Path(self.cfg["root"])
        make = DATASETS[c["dataset"]]
        # Fashion-MNIST at its own size and in its own channels: augment whole batches (see BatchTransform).
        self.batched = (c["dataset"] == "fashion_mnist" and c["img_size"] == 28 and c["in_chans"] == 1
                        and BatchTransform.supports(self.augment))
        if self.batched:
            train_tf = eval_tf = None
        else:
            train_tf = train_transform(self.augment, c["img_size"], c["in_chans"], c["mean"], c["std"])
            eval_tf = eval_transform(c["img_size"], c["in_chans"], c["crop_pct"], c["mean"], c["std"])
        train_set, val_set = make(root, True, train_tf, c), make(root, False, eval_tf, c)
        found = len(train_set.classes)
        if c["num_classes"] is not None and found != c["num_classes"]:
            raise DataConfigError(
                f"data.num_classes={c['num_classes']} but {c['dataset']} under {str(root)!r} has {found} classes; "
                f"set data.num_classes={found} (or null to take it from the data)"
            )
        if len(val_set.classes) != found:
            raise DataConfigError(f"{c['dataset']}: train has {found} classes but val has {len(val_set.classes)}")
        self.num_classes = found
        self.train_set = first(train_set, c["train_subset"])
        self.val_set = first(val_set, c["val_subset"])

    # ------------------------------------------------------------------------------------------ dataloaders
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _loader_kwargs(self, train: bool) -> dict[str, Any]:
        c = self.cfg
        # No persistent workers: fresh workers each epoch take their seeds from the epoch's reseed.
        return dict(
            batch_size=c["batch_size"], drop_last=train, num_workers=c["num_workers"], pin_memory=c["pin_memory"],
            collate_fn=BatchTransform(train, self.augment, c["mean"], c["std"]) if self.batched else None,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = self._world()
        if len(self.train_set) < self.cfg["batch_size"] * world:
            raise DataConfigError(
                f"data.batch_size={self.cfg['batch_size']} x {world} devices is more than the "
                f"{len(self.train_set)} training images: no full batch (lower data.batch_size)"
            )
        sampler = EpochSampler(self.train_set, self._epoch, num_replicas=world, rank=rank, shuffle=True,
                               seed=self.seed, drop_last=True)
        # full batches only (mixup pairs images); every RNG reseeded from (seed, epoch, rank) per epoch
        return SeededLoader(self.train_set, sampler=sampler, **self._loader_kwargs(train=True),
                            seed_fn=lambda: self.seed + 1000 * self._epoch() + rank)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = self._world()
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.val_set, sampler=sampler, **self._loader_kwargs(train=False))
