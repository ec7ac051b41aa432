"""The FFCV data path: a LightningDataModule reading ``.beton`` files (written by ``vittm.data.write_ffcv``).

Train pipeline: RandomResizedCrop decoder (``augment.rrc_scale``/``rrc_ratio``), flip, normalise, on the GPU when
there is one (``ToDevice`` with non-blocking copies; batches never pass through the CPU as float). Val: centre-crop
decoder with ratio ``crop_pct`` (224/256). Order: QUASI_RANDOM on one device, RANDOM with ``distributed=True`` under
DDP (each rank reads its own shard); validation gives each rank a disjoint slice. ``os_cache`` picks the OS page
cache (shared by processes) or FFCV's process cache.

FFCV has no RandAugment or random erasing: when enabled they run here, in torch, per image, on the decoded uint8
batch (``on_after_batch_transfer``, so on the GPU when there is one); the FFCV pipeline then stops at uint8 and
normalising happens in torch too. On the CPU, FFCV's NormalizeImage must come before ToTensor (upstream issue 396:
the other order hangs). Each Loader is built once per process and reused every epoch, so numba compiles its
pipeline once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchvision.transforms import v2

from vittm.core.errors import ConfigError
from vittm.data.write_ffcv import ffcv_missing_message


def check_beton(path: str | None, key: str) -> dict[str, Any]:
    """A readable, complete ``.beton`` at ``path``: its sample count and labels (errors name ``key``)."""
    if not path:
        raise ConfigError(f"{key} is not set; pass {key}=/path/to/file.beton (written by vittm.data.write_ffcv)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}={str(path)!r} does not exist")
    from ffcv.reader import Reader

    size = file.stat().st_size
    try:
        reader = Reader(str(file))
        complete = (
            len(reader.metadata) == reader.num_samples
            and reader.header["alloc_table_ptr"] < size
            and len(reader.alloc_table) > 0
            and int((reader.alloc_table["ptr"] + reader.alloc_table["size"]).max())
            <= int(reader.header["alloc_table_ptr"])
            and len(np.unique(reader.alloc_table["sample_id"])) == reader.num_samples
        )
    except Exception as err:  # numpy/ffcv raise assorted errors on foreign or cut files
        raise ConfigError(f"{key}={str(path)!r} is not a readable FFCV file ({type(err).__name__}: {err})") from err
    if not complete or "label" not in reader.handlers or "image" not in reader.handlers:
        raise ConfigError(f"{key}={str(path)!r} is truncated or not an image/label .beton "
                          f"({size} bytes for {reader.num_samples} samples); write it again")
    label_field = f"f{list(reader.handlers).index('label')}"  # metadata columns follow the fields' order
    return {"num_samples": int(reader.num_samples), "labels": np.asarray(reader.metadata[label_field])}


def sidecar_classes(path: str) -> int | None:
    sidecar = Path(str(path) + ".json")
    return json.loads(sidecar.read_text())["num_classes"] if sidecar.is_file() else None


class FFCVDataModule(L.LightningDataModule):
    """Train/val FFCV Loaders; see conf/data/ffcv.yaml for every key."""

    def __init__(
        self,
        dataset: str,
        train_path: str | None,
        val_path: str | None,
        num_classes: int | None,
        in_chans: int,
        img_size: int,
        crop_pct: float,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        num_workers: int = 2,
        os_cache: bool = True,
        order: str = "auto",
        batches_ahead: int = 3,
        train_subset: int | None = None,
        val_subset: int | None = None,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        try:
            import ffcv  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"data=ffcv: {ffcv_missing_message()}") from err
        self.cfg = dict(in_chans=in_chans, img_size=img_size, crop_pct=crop_pct, mean=list(mean), std=list(std),
                        batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, order=order,
                        batches_ahead=batches_ahead)
        self.paths = {"train": train_path, "val": val_path}
        self.subsets = {"train": train_subset, "val": val_subset}
        self.augment = dict(augment or {})
        self.seed = seed
        self.check(num_classes)
        self.loaders: dict[str, Any] = {}

    def check(self, num_classes: int | None) -> None:
        """Files, class counts and options, before anything is decoded."""
        c = self.cfg
        if c["order"] not in ("auto", "random", "quasi_random", "sequential"):
            raise ConfigError(f"data.order={c['order']!r}: choose auto, random, quasi_random or sequential")
        if self.augment.get("crop_padding"):
            raise ConfigError("augment.crop_padding is not supported by data=ffcv (use augment.rrc_scale)")
        if len(c["mean"]) != c["in_chans"] or len(c["std"]) != c["in_chans"]:
            raise ConfigError(f"data.mean / data.std need {c['in_chans']} values (data.in_chans)")
        found = {}
        for split, path in self.paths.items():
            key = f"data.{split}_path"
            info = check_beton(path, key)
            found[split] = sidecar_classes(path) or int(info["labels"].max()) + 1
            subset = self.subsets[split]
            if subset is not None and (not isinstance(subset, int) or subset <= 0):
                raise ConfigError(f"data.{split}_subset={subset!r} must be a positive integer or null")
        self.num_classes = num_classes or found["train"]
        for split, count in found.items():
            if count != self.num_classes:
                raise ConfigError(
                    f"data.{split}_path={self.paths[split]!r} holds {count} classes but data.num_classes="
                    f"{self.num_classes} (the model's class count); set data.num_classes={count} or use the right file"
                )

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: the Loaders are built on first use, when the device and world size are known."""

    # ------------------------------------------------------------------------------------------- loaders
    def uint8_out(self, train: bool) -> bool:
        """Whether FFCV stops at uint8 and torch augments/normalises after the transfer."""
        a = self.augment
        return bool(train and (a.get("randaugment") or a.get("random_erasing"))) or self.cfg["in_chans"] != 3

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def build_loader(self, split: str, world: int = 1, rank: int = 0, device: torch.device | None = None) -> Any:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        c, a, train = self.cfg, self.augment, split == "train"
        device = device or torch.device("cpu")
        size = (c["img_size"], c["img_size"])
        if train and a.get("rrc_scale"):
            decoder = RandomResizedCropRGBImageDecoder(size, scale=tuple(a["rrc_scale"]),
                                                       ratio=tuple(a.get("rrc_ratio") or (3 / 4, 4 / 3)))
        else:
            decoder = CenterCropRGBImageDecoder(size, ratio=c["crop_pct"])
        image = [decoder] + ([RandomHorizontalFlip(a["hflip"])] if train and a.get("hflip") else [])
        mean = np.array(c["mean"] * (3 // len(c["mean"]))) * 255  # FFCV normalises the 3 stored channels
        std = np.array(c["std"] * (3 // len(c["std"]))) * 255
        on_gpu = device.type == "cuda"
        if self.uint8_out(train):
            image += [ToTensor()] + ([ToDevice(device, non_blocking=True)] if on_gpu else []) + [ToTorchImage()]
        elif on_gpu:
            image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                      NormalizeImage(mean, std, np.float16)]
        else:  # CPU: normalise before ToTensor (upstream issue 396)
            image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
        label = [IntDecoder(), ToTensor(), Squeeze()] + ([ToDevice(device, non_blocking=True)] if on_gpu else [])

        n = check_beton(self.paths[split], f"data.{split}_path")["num_samples"]
        indices = np.arange(min(n, self.subsets[split] or n))
        distributed = False
        if train:
            order_name = c["order"] if c["order"] != "auto" else ("quasi_random" if world == 1 else "random")
            distributed = world > 1
            if distributed and order_name == "quasi_random":
                raise ConfigError("data.order=quasi_random does not work under DDP in FFCV; use random (or auto)")
        else:  # each rank a disjoint, unpadded slice: every val image counted once after reduction
            order_name, indices = "sequential", indices[rank::world]
        order = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
                 "sequential": OrderOption.SEQUENTIAL}[order_name]
        return Loader(
            self.paths[split], batch_size=c["batch_size"], num_workers=c["num_workers"], os_cache=c["os_cache"],
            order=order, distributed=distributed, seed=self.seed, indices=indices, drop_last=train,
            batches_ahead=c["batches_ahead"], pipelines={"image": image, "label": label},
        )

    def _loader(self, split: str) -> Any:
        if split not in self.loaders:  # once per process: numba compiles the pipeline once
            world, rank = self._world()
            self.loaders[split] = self.build_loader(split, world, rank, self._device())
        loader = self.loaders[split]
        trainer = getattr(self, "trainer", None)
        if split == "train" and trainer is not None:
            loader.next_epoch = trainer.current_epoch  # order of epoch e depends on (seed, e) only, resumes too
        return loader

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val")

    # ------------------------------------------------------------------------------ torch-side augmentation
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if x.dtype != torch.uint8:
            return x, y
        c, a = self.cfg, self.augment
        training = self.trainer is not None and self.trainer.training
        if training and a.get("randaugment"):  # per image: FFCV has no RandAugment
            ra = v2.RandAugment(num_ops=a["randaugment"]["ops"], magnitude=a["randaugment"]["magnitude"])
            x = torch.stack([ra(img) for img in x])
        x = x[:, : c["in_chans"]].float().div_(255)
        mean = torch.tensor(c["mean"], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(c["std"], device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if training and a.get("random_erasing"):
            erase = v2.RandomErasing(p=a["random_erasing"], value=0)
            x = torch.stack([erase(img) for img in x])  # per image (SPEC §9 fix)
        return x, y
