"""Semantic segmentation in the ADE20K layout (ADEChallengeData2016): a dataset and a LightningDataModule that
mirrors ``ImageDataModule`` (vittm.data.datamodule), so the training code treats both the same way.

Layout: ``root/images/{training,validation}/<stem>.jpg`` (or .jpeg, .png) with ``root/annotations/{training,
validation}/<stem>.png``, single-channel uint8 masks (mode L or P, read as raw index values). ``reduce_zero_label``
(ADE20K: 0 is "other", not a class): 0 -> 255, v -> v - 1; 255 is the ignore index everywhere.

Splits as for classification (README "Validation and test"): ``data.val_split`` images of ``training`` are held out
(``split_indices``, by ``data.split_seed``) and validate; ``validation`` is the test split. ``val_split: 0``
validates on ``validation``, with no separate test. Training batches are stacked crops; evaluation batches are lists,
since images differ in size, with each mask at its annotation's resolution (mmseg's metrics are computed there).

Bad samples are found when read (no up-front scan of 20,000 files): an unreadable image or mask, a mask that is not
single-channel 8-bit, image and mask of different sizes, labels outside ``0..num_classes-1`` (255 aside).
``data.on_bad_mask=fail`` stops with a ConfigError naming the file; ``skip`` warns once, appends the file to the
run's bad-image log (vittm.data.bad_images) and returns None: evaluation drops it from its batch, training replaces
it by the next good sample of the training set, so training batches stay full.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from vittm.core.errors import ConfigError
from vittm.data.bad_images import (
    DECODE_ERRORS,
    POLICIES,
    DropUnreadable,
    Unreadable,
    UnreadableImageError,
    logged_paths,
    read_image,
)
from vittm.data.datamodule import DataConfigError, ImageDataModule, first, split_indices
from vittm.data.resume import EpochLoader, EpochSampler, SeededBatches
from vittm.data.scenes import SCENE_CLASSES, SceneRecipe, write_scenes
from vittm.data.seg_transforms import IGNORE_INDEX, build_seg_transforms

SEG_DATASETS = ("ade20k",)
SPLITS = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = ("root/images/{training,validation}/<stem>.jpg with root/annotations/{training,validation}/<stem>.png "
          "(ADEChallengeData2016)")

# mmsegmentation's ADE20KDataset METAINFO classes, labels 0..149 after reduce_zero_label ('bed ' there has a
# trailing space, dropped here).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class BadSampleError(UnreadableImageError):
    """``data.on_bad_mask=fail`` met a bad image/mask pair (one line, also when raised in a DataLoader worker)."""


class BadSample(Exception):
    """Raised by ``SegmentationFolder.load`` only: (path, problem)."""


def missing_folders(root: Path) -> list[str]:
    return [str(root / kind / split) for split in SPLITS for kind in ("images", "annotations")
            if not (root / kind / split).is_dir()]


def _by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:  # scandir: ADE20K's training folder holds 20,210 files
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() not in suffixes or not entry.is_file():
                continue
            if stem in found:
                raise ConfigError(f"data.root: {found[stem].name} and {entry.name} in {folder} share the stem "
                                  f"{stem!r}; keep one image per mask")
            found[stem] = Path(entry.path)
    return found


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """0 ("other") -> 255, v -> v - 1; 255 stays 255 (ignore), as mmseg's LoadAnnotations does. uint8 (H, W)."""
    out = mask - np.uint8(1)  # 0 wraps to 255
    out[mask == IGNORE_INDEX] = IGNORE_INDEX
    return out


class SegmentationFolder(Dataset):
    """One split (``training`` | ``validation``) of an ADE20K-layout folder: items are ``transform(PIL image,
    uint8 mask (H, W))``, by default (image float (3, H, W) in 0..1, mask int64 (H, W)); None for a bad sample
    with ``on_bad_mask="skip"`` (see the module docstring). ``subset``: only the first N pairs (sorted by stem)."""

    def __init__(self, root: str | Path, split: str, num_classes: int, reduce_zero_label: bool,
                 transform: Callable | None = None, on_bad_mask: str = "skip", bad_log: Path | None = None,
                 subset: int | None = None) -> None:
        self.root, self.split = Path(root), split
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.transform, self.on_bad_mask, self.bad_log = transform, on_bad_mask, bad_log
        if split not in SPLITS:
            raise ConfigError(f"split={split!r}: one of {list(SPLITS)}")
        if on_bad_mask not in POLICIES:
            raise ConfigError(f"data.on_bad_mask={on_bad_mask!r}: choose one of {list(POLICIES)}")
        image_dir, mask_dir = self.root / "images" / split, self.root / "annotations" / split
        missing = [str(d) for d in (image_dir, mask_dir) if not d.is_dir()]
        if missing:
            raise ConfigError(f"data.root={str(self.root)!r} lacks {missing}; the ADE20K layout is {LAYOUT}")
        images, masks = _by_stem(image_dir, IMAGE_SUFFIXES), _by_stem(mask_dir, (".png",))
        for lone, have, lack in ((images.keys() - masks.keys(), images, mask_dir),
                                 (masks.keys() - images.keys(), masks, image_dir)):
            if lone:
                example = have[min(lone)]
                raise ConfigError(f"data.root={str(self.root)!r}: {len(lone)} file(s) in {example.parent} without "
                                  f"a partner of the same stem in {lack} (first: {example.name}); the layout is "
                                  f"{LAYOUT}")
        if not images:
            raise ConfigError(f"data.root={str(self.root)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        self.samples = [(images[s], masks[s]) for s in sorted(images)][:subset]
        self.seen: set[str] = set()  # this process's bad files (warned once each)

    def __len__(self) -> int:
        return len(self.samples)

    def with_transform(self, transform: Callable | None) -> SegmentationFolder:
        """The same pairs read with another transform (the held-out images, read for evaluation)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, uint8 mask (H, W) after reduce_zero_label), or BadSample naming the file and the problem."""
        image_path, mask_path = self.samples[index]
        try:
            image = read_image(str(image_path))
        except Unreadable as err:
            raise BadSample(str(image_path), f"cannot be read ({err.args[1]})") from None
        try:
            with Image.open(mask_path) as m:
                mode, mask = m.mode, np.array(m)  # P: the palette indices themselves, never converted to RGB
        except DECODE_ERRORS as err:
            raise BadSample(str(mask_path), f"cannot be read ({err or type(err).__name__})") from None
        if mode not in ("L", "P"):
            raise BadSample(str(mask_path), f"is mode {mode}, not a single-channel 8-bit (L or P) PNG")
        if mask.shape != (image.height, image.width):
            raise BadSample(str(mask_path), f"is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} "
                                            f"is {image.width}x{image.height}")
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask)
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = np.flatnonzero(counts[self.num_classes:IGNORE_INDEX])
        if bad.size:
            after = " after reduce_zero_label" if self.reduce_zero_label else ""
            raise BadSample(str(mask_path), f"has label {int(bad[-1]) + self.num_classes}, outside "
                                            f"0..{self.num_classes - 1}{after} (num_classes={self.num_classes})")
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image, mask = self.load(index)
        except BadSample as err:
            self.report(*err.args)
            return None
        if self.transform is not None:
            return self.transform(image, mask)
        return F.pil_to_tensor(image).float() / 255, torch.from_numpy(mask).long()

    def report(self, path: str, problem: str) -> None:
        """Fail, or warn once and log the file (one line appended: whole lines across worker processes)."""
        if self.on_bad_mask == "fail":
            raise BadSampleError(f"data.on_bad_mask=fail: {path} {problem}; fix or remove the pair, or set "
                                 f"data.on_bad_mask=skip to skip bad samples")
        if path in self.seen:
            return
        self.seen.add(path)
        warnings.warn(f"data.on_bad_mask=skip: skipping {path}: it {problem}", stacklevel=2)
        if self.bad_log is not None:
            self.bad_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.bad_log, "a") as f:
                f.write(f"{path}\t{problem}\n")


class NextGood(Dataset):
    """The training set: a sample skipped as bad (None) is replaced by the next good one of the same set, so that
    training batches stay full and stacked (as SkipUnreadable(substitute=True) does for classification)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        for offset in range(n):
            item = self.dataset[(index + offset) % n]
            if item is not None:
                return item
        raise BadSampleError(f"data.on_bad_mask=skip: none of the {n} training samples can be used")


def stack_pairs(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training collate: (images (B, C, crop, crop), masks (B, crop, crop))."""
    images, masks = zip(*samples, strict=True)
    return torch.stack(images), torch.stack(masks)


def list_pairs(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Evaluation collate: ([image (C, h_i, w_i)], [mask (H_i, W_i)]); sizes differ from image to image."""
    images, masks = zip(*samples, strict=True)
    return list(images), list(masks)


def default_class_names(num_classes: int, reduce_zero_label: bool, scenes: bool) -> list[str]:
    names = SCENE_CLASSES if scenes else ADE20K_CLASSES
    names = names if reduce_zero_label else ("other", *names)  # without the reduction label 0 is a class
    return list(names) if len(names) == num_classes else [f"class_{i}" for i in range(num_classes)]


class SegmentationDataModule(L.LightningDataModule):
    """Train/val/test loaders for an ADE20K-layout folder (``data.dataset: ade20k``); ``compose`` (the fields of
    vittm.data.scenes.SceneRecipe) first writes the Fashion-MNIST scenes there (once). See the module docstring."""

    exact_resume = True  # its training loader resumes at the exact batch (vittm.data.resume), as ImageDataModule

    def __init__(
        self,
        dataset: str,
        root: str | None,
        num_classes: int,
        reduce_zero_label: bool = True,
        class_names: Sequence[str] | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_split: int | float = 0,
        split_seed: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        on_bad_mask: str = "skip",
        in_chans: int = 3,
        img_size: int | None = None,  # accepted for a shared config interface; crops are augment.crop_size
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        bad_image_log: str | Path | None = None,
        compose: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = dict(
            dataset=dataset, root=root, num_classes=num_classes, reduce_zero_label=reduce_zero_label,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=pin_memory,
            val_split=val_split, split_seed=split_seed, train_subset=train_subset, val_subset=val_subset,
            test_subset=test_subset, on_bad_mask=on_bad_mask, in_chans=in_chans,
        )
        self.seed = seed
        self.bad_image_log = Path(bad_image_log) if bad_image_log else None
        self.check()
        self.recipe = SceneRecipe.from_config(compose) if compose is not None else None
        if self.recipe is None and missing_folders(Path(root)):
            raise DataConfigError(f"data.root={root!r} lacks {missing_folders(Path(root))}; data.dataset=ade20k "
                                  f"expects {LAYOUT}")
        self.num_classes = num_classes
        names = default_class_names(num_classes, reduce_zero_label, compose is not None)
        self.class_names = list(class_names) if class_names is not None else names
        if len(self.class_names) != num_classes:
            raise DataConfigError(f"data.class_names has {len(self.class_names)} names but data.num_classes="
                                  f"{num_classes}; give one name per class, or null for the defaults")
        self.train_tf = build_seg_transforms(augment, "train", in_chans)  # checks augment.* now, before any read
        self.eval_tf = build_seg_transforms(augment, "eval", in_chans)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None  # None when val_split is 0: the validation set is the test split
        self.folders: list[SegmentationFolder] = []
        self.train_loader: EpochLoader | None = None
        self.resume_state: dict[str, Any] | None = None  # from a checkpoint, taken by the next training epoch

    def check(self) -> None:
        """Every key a user can get wrong, before any file is read: one error naming key, value and rule."""
        c = self.cfg
        if c["dataset"] not in SEG_DATASETS:
            raise DataConfigError(f"data.dataset={c['dataset']!r} is not a segmentation dataset; one of "
                                  f"{list(SEG_DATASETS)}")
        if not c["root"]:
            raise DataConfigError("data.root is not set for data.dataset=ade20k; pass data.root=/path/to/"
                                  "ADEChallengeData2016")
        n = c["num_classes"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < IGNORE_INDEX:
            raise DataConfigError(f"data.num_classes={n!r} must be an integer in 1..{IGNORE_INDEX - 1} "
                                  f"({IGNORE_INDEX} is the ignore label)")
        if not isinstance(c["reduce_zero_label"], bool):
            raise DataConfigError(f"data.reduce_zero_label={c['reduce_zero_label']!r} must be true (label 0 is "
                                  f"ignored, ADE20K) or false")
        for key in ("batch_size", "eval_batch_size"):
            if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] <= 0:
                raise DataConfigError(f"data.{key}={c[key]!r} must be a positive integer")
        if c["in_chans"] not in (1, 3):
            raise DataConfigError(f"data.in_chans={c['in_chans']!r} must be 3 (RGB) or 1 (grey)")
        if isinstance(c["num_workers"], bool) or not isinstance(c["num_workers"], int) or c["num_workers"] < 0:
            raise DataConfigError(f"data.num_workers={c['num_workers']!r} must be an integer >= 0")
        split = c["val_split"]
        if isinstance(split, bool) or not (isinstance(split, int) and split >= 0
                                           or isinstance(split, float) and 0 < split < 1):
            raise DataConfigError(f"data.val_split={split!r}: the number of training images held out for validation "
                                  f"(an integer >= 0; 0: validate on the validation folder) or a fraction in (0, 1)")
        if isinstance(c["split_seed"], bool) or not isinstance(c["split_seed"], int) or c["split_seed"] < 0:
            raise DataConfigError(f"data.split_seed={c['split_seed']!r} must be an integer >= 0")
        for key in ("train_subset", "val_subset", "test_subset"):
            if c[key] is not None and (isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] <= 0):
                raise DataConfigError(f"data.{key}={c[key]!r} must be a positive integer or null (all images)")
        if c["on_bad_mask"] not in POLICIES:
            raise DataConfigError(f"data.on_bad_mask={c['on_bad_mask']!r}: choose one of {list(POLICIES)}")

    # --------------------------------------------------------------------------------------------- datasets
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c, root = self.cfg, Path(self.cfg["root"])
        if self.recipe is not None:
            write_scenes(root, self.recipe)  # returns at once when root already holds them
        common = dict(num_classes=c["num_classes"], reduce_zero_label=c["reduce_zero_label"],
                      on_bad_mask=c["on_bad_mask"], bad_log=self.bad_image_log)
        train_folder = SegmentationFolder(root, "training", transform=self.train_tf, **common)
        test_folder = SegmentationFolder(root, "validation", transform=self.eval_tf, **common)
        held_out = train_folder.with_transform(self.eval_tf)  # the held-out training images, read for evaluation
        self.folders = [train_folder, held_out, test_folder]
        train_idx, val_idx = split_indices(len(train_folder), c["val_split"], c["split_seed"])
        if not val_idx:  # no held-out split: validate on the validation folder, no separate test stage
            self.train_set = NextGood(first(train_folder, c["train_subset"]))
            self.val_set = first(test_folder, c["val_subset"])
            return
        self.train_set = NextGood(first(Subset(train_folder, train_idx), c["train_subset"]))
        self.val_set = first(Subset(held_out, val_idx), c["val_subset"])
        self.test_set = first(test_folder, c["test_subset"])

    # The same as ImageDataModule's: images per split, whether there is a test stage, the val/test loaders' entry
    # points, and the trainer-derived world and epoch.
    split_sizes = ImageDataModule.split_sizes
    has_test = ImageDataModule.has_test
    val_dataloader = ImageDataModule.val_dataloader
    test_dataloader = ImageDataModule.test_dataloader
    _world = ImageDataModule._world
    _epoch = ImageDataModule._epoch

    def bad_images(self) -> list[str]:
        """The bad files met so far (by every process of the run, when a log file is set)."""
        if self.bad_image_log is not None:
            return logged_paths(self.bad_image_log)
        return sorted(set().union(*(f.seen for f in self.folders)))

    # ------------------------------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        self.setup()
        world, rank = self._world()
        c = self.cfg
        if len(self.train_set) < c["batch_size"] * world:
            raise DataConfigError(
                f"data.batch_size={c['batch_size']} x {world} devices is more than the {len(self.train_set)} "
                f"training images: no full batch (lower data.batch_size)"
            )
        sampler = EpochSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                               drop_last=True)
        # As ImageDataModule: order, augmentation and every global RNG follow (seed, epoch, batch), and the place in
        # the epoch is checkpointed, so a resumed run repeats a straight one (vittm.data.resume).
        self.train_loader = EpochLoader(
            SeededBatches(self.train_set, stack_pairs, self.seed), sampler=sampler, batch_size=c["batch_size"],
            drop_last=True, num_workers=c["num_workers"], pin_memory=c["pin_memory"], epoch_fn=self._epoch,
            resume_fn=self._take_resume, seed=self.seed, rank=rank,
        )
        return self.train_loader

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self._world()
        c = self.cfg
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, sampler=sampler, batch_size=c["eval_batch_size"], num_workers=c["num_workers"],
                          pin_memory=c["pin_memory"], collate_fn=DropUnreadable(list_pairs))

    # ------------------------------------------------------------------------------ checkpointed loader state
    state_dict = ImageDataModule.state_dict
    load_state_dict = ImageDataModule.load_state_dict
    _take_resume = ImageDataModule._take_resume
