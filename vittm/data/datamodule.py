"""One LightningDataModule for every torchvision-path dataset: Fashion-MNIST, ImageFolder, ImageNet-1K, ImageNet-21K-P.

Samplers are made here rather than by Lightning (``use_distributed_sampler=False`` in the trainer configs).
Training uses ``vittm.data.resume.EpochLoader``: the data order, each batch's augmentation and every global RNG are
functions of (seed, epoch, batch), and the loader's place in its epoch is saved in every checkpoint through this
module's ``state_dict``, so a resumed run repeats a straight one exactly, at an epoch boundary or at any batch.
Validation gives each rank a disjoint, unpadded shard, so metrics reduced across ranks count every image exactly
once. Unreadable images in folder datasets are skipped or refused (``vittm.data.bad_images``).

Three splits (README "Validation and test"): ``data.val_split`` images are held out of the training set, chosen by
``data.split_seed`` (fixed, not the run's seed, so every run of a study holds out the same images); they select
``best.ckpt``, stop early and tune. The dataset's own test split (Fashion-MNIST's 10,000 test images, an
ImageFolder's ``val_dir``) is the ``test`` stage, evaluated once at the end. ``val_split: 0`` validates on the test
split itself (the ImageNet protocol of the paper); there is then no separate test stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.datasets import ImageFolder, ImageNet

from vittm.core.errors import ConfigError
from vittm.data import fashion_mnist
from vittm.data.bad_images import POLICIES, DropUnreadable, SkipUnreadable, logged_paths, read_image
from vittm.data.resume import EpochLoader, EpochSampler, SeededBatches
from vittm.data.transforms import BatchTransform, eval_transform, train_transform


class DataConfigError(ConfigError):
    """A data setting that cannot work (raised before any image is read)."""


def _folder(root: Path, train: bool, transform: Callable, cfg: Mapping[str, Any]) -> Dataset:
    return ImageFolder(str(root / cfg["train_dir" if train else "val_dir"]), transform=transform, loader=read_image)


def _fashion_mnist(root: Path, train: bool, transform: Callable, cfg: Mapping[str, Any]) -> Dataset:
    try:
        return fashion_mnist.FashionMNIST(root, "train" if train else "test", transform=transform)
    except (OSError, EOFError, ValueError) as err:  # a truncated or corrupt .gz
        raise DataConfigError(f"data.root={str(root)!r}: cannot read the Fashion-MNIST files ({err})") from None


def _imagenet(root: Path, train: bool, transform: Callable, cfg: Mapping[str, Any]) -> Dataset:
    return ImageNet(str(root), split="train" if train else "val", transform=transform, loader=read_image)


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


def first(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` items (all when ``n`` is None): quick runs and tests."""
    return Subset(dataset, range(min(n, len(dataset)))) if n else dataset


def split_indices(n: int, val_split: int | float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a training set of ``n`` images: ``val_split`` images (a count, or a
    fraction of ``n``) drawn by a generator seeded with ``seed``; both lists in their original order, so
    ``train_subset`` (the first N) means the same images in every run."""
    count = round(val_split * n) if isinstance(val_split, float) else val_split
    if count == 0:
        return list(range(n)), []
    if count >= n:
        raise DataConfigError(f"data.val_split={val_split!r}: holds out {count} of the {n} training images, leaving "
                              f"none to train on; hold out fewer")
    held = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return torch.nonzero(~mask).flatten().tolist(), torch.nonzero(mask).flatten().tolist()


def unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class ImageDataModule(L.LightningDataModule):
    """Train/val loaders for ``dataset`` (one of ``DATASETS``); see conf/data/*.yaml for every key."""

    exact_resume = True  # a resumed epoch continues at the exact batch (vittm.data.resume): Lightning cannot see it

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
        test_subset: int | None = None,
        val_split: int | float = 0,
        split_seed: int = 0,
        on_bad_image: str = "skip",
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        bad_image_log: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.cfg = dict(
            dataset=dataset, root=root, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
            crop_pct=crop_pct, mean=list(mean), std=list(std), batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory, train_dir=train_dir, val_dir=val_dir, train_subset=train_subset,
            val_subset=val_subset, test_subset=test_subset, val_split=val_split, split_seed=split_seed,
            on_bad_image=on_bad_image,
        )
        self.augment = dict(augment or {})
        self.seed = seed
        self.bad_image_log = Path(bad_image_log) if bad_image_log else None  # where unreadable files are listed
        self.check()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None  # None when val_split is 0: the validation set is the test split
        self.train_loader: EpochLoader | None = None
        self.resume_state: dict[str, Any] | None = None  # from a checkpoint, taken by the next training epoch

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
        split = c["val_split"]
        if isinstance(split, bool) or not (isinstance(split, int) and split >= 0
                                           or isinstance(split, float) and 0 < split < 1):
            raise DataConfigError(f"data.val_split={split!r}: the number of training images held out for validation "
                                  f"(an integer >= 0; 0: validate on the test split) or a fraction in (0, 1)")
        if isinstance(c["split_seed"], bool) or not isinstance(c["split_seed"], int) or c["split_seed"] < 0:
            raise DataConfigError(f"data.split_seed={c['split_seed']!r} must be an integer >= 0")
        for key in ("train_subset", "val_subset", "test_subset"):
            if c[key] is not None and (not isinstance(c[key], int) or c[key] <= 0):
                raise DataConfigError(f"data.{key}={c[key]!r} must be a positive integer or null (all images)")
        if not 0 < c["crop_pct"] <= 1:
            raise DataConfigError(f"data.crop_pct={c['crop_pct']!r} must be in (0, 1]")
        if len(c["mean"]) != c["in_chans"] or len(c["std"]) != c["in_chans"]:
            raise DataConfigError(f"data.mean / data.std need {c['in_chans']} values (data.in_chans), got {c['mean']}")
        if c["on_bad_image"] not in POLICIES:
            raise DataConfigError(f"data.on_bad_image={c['on_bad_image']!r}: choose one of {list(POLICIES)}")

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
        train_set, test_set = make(root, True, train_tf, c), make(root, False, eval_tf, c)
        found = len(train_set.classes)
        if c["num_classes"] is not None and found != c["num_classes"]:
            raise DataConfigError(
                f"data.num_classes={c['num_classes']} but {c['dataset']} under {str(root)!r} has {found} classes; "
                f"set data.num_classes={found} (or null to take it from the data)"
            )
        if len(test_set.classes) != found:
            raise DataConfigError(f"{c['dataset']}: train has {found} classes but val has {len(test_set.classes)}")
        self.num_classes = found
        # The held-out images are read with the eval transform: a second view of the training files.
        held_out = train_set if self.batched else make(root, True, eval_tf, c)
        if hasattr(train_set, "samples"):  # decoded from files: some may be unreadable
            train_set = SkipUnreadable(train_set, c["on_bad_image"], self.bad_image_log, substitute=True)
            held_out = SkipUnreadable(held_out, c["on_bad_image"], self.bad_image_log, substitute=False)
            test_set = SkipUnreadable(test_set, c["on_bad_image"], self.bad_image_log, substitute=False)
        train_idx, val_idx = split_indices(len(train_set), c["val_split"], c["split_seed"])
        if not val_idx:  # no held-out split: validate on the test split, no separate test stage
            self.train_set = first(train_set, c["train_subset"])
            self.val_set = first(test_set, c["val_subset"])
            return
        self.train_set = first(Subset(train_set, train_idx), c["train_subset"])
        self.val_set = first(Subset(held_out, val_idx), c["val_subset"])
        self.test_set = first(test_set, c["test_subset"])

    @property
    def split_sizes(self) -> dict[str, Any]:
        """Images per split, and where validation comes from (recorded in metrics.json)."""
        self.setup()
        c = self.cfg
        val_from = (f"of {c['val_split']} held out of the training set, data.split_seed={c['split_seed']}"
                    if self.test_set is not None else "the test split (data.val_split=0)")
        return {"train": len(self.train_set), "val": len(self.val_set),  # after val_subset
                "test": len(self.test_set) if self.test_set is not None else None, "val_from": val_from}

    def has_test(self) -> bool:
        self.setup()
        return self.test_set is not None

    def bad_images(self) -> list[str]:
        """The unreadable files met so far (by every process of the run, when a log file is set)."""
        if self.bad_image_log is not None:
            return logged_paths(self.bad_image_log)
        sets = [unwrap(d) for d in (self.train_set, self.val_set, self.test_set) if d is not None]
        return sorted(set().union(*(d.seen for d in sets if isinstance(d, SkipUnreadable))))

    # ------------------------------------------------------------------------------------------ dataloaders
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _collate(self, train: bool) -> Callable:
        c = self.cfg
        return BatchTransform(train, self.augment, c["mean"], c["std"]) if self.batched else default_collate

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = self._world()
        if len(self.train_set) < self.cfg["batch_size"] * world:
            raise DataConfigError(
                f"data.batch_size={self.cfg['batch_size']} x {world} devices is more than the "
                f"{len(self.train_set)} training images: no full batch (lower data.batch_size)"
            )
        c = self.cfg
        sampler = EpochSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                               drop_last=True)
        # Full batches only (mixup pairs images). No persistent workers: each epoch's workers start after the
        # epoch's reseed. See vittm.data.resume for how every RNG follows (seed, epoch, batch).
        self.train_loader = EpochLoader(
            SeededBatches(self.train_set, self._collate(train=True), self.seed), sampler=sampler,
            batch_size=c["batch_size"], drop_last=True, num_workers=c["num_workers"], pin_memory=c["pin_memory"],
            epoch_fn=self._epoch, resume_fn=self._take_resume, seed=self.seed, rank=rank,
        )
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test():
            raise DataConfigError("data.val_split=0: the validation set is the test split; there is no separate test")
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self._world()
        c = self.cfg
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, sampler=sampler, batch_size=c["batch_size"], num_workers=c["num_workers"],
                          pin_memory=c["pin_memory"], collate_fn=DropUnreadable(self._collate(train=False)))

    # ------------------------------------------------------------------------------ checkpointed loader state
    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in every checkpoint: where the training epoch stands (see vittm.data.resume)."""
        state = self.train_loader.state() if self.train_loader is not None else None
        return {"train_loader": state} if state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_state = state_dict.get("train_loader")

    def _take_resume(self) -> dict[str, Any] | None:
        state, self.resume_state = self.resume_state, None
        return state
