"""Train and eval transforms (SPEC §9), torchvision v2, applied per image.

Train: RandomResizedCrop (or resize + padded random crop for small images), flip, RandAugment (torchvision's, as the
published recipes used), normalise, random erasing per image (the artifact erased one box per batch: SPEC fix).
Eval: resize to img_size / crop_pct (bicubic), centre crop img_size (224/256 for ImageNet: resize 256, crop 224).
Mixup/CutMix act on whole batches and live in the LightningModule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

BICUBIC = InterpolationMode.BICUBIC


def channels(in_chans: int) -> v2.Transform:
    """Grey or RGB as the model expects (an RGB folder for a 1-channel model, or Fashion-MNIST for a 3-channel one)."""
    return v2.Grayscale(1) if in_chans == 1 else v2.RGB()


def train_transform(
    aug: Mapping[str, Any], img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    steps: list = [v2.ToImage(), channels(in_chans)]  # PIL image or uint8 tensor -> uint8 tv_tensors.Image
    if aug.get("rrc_scale"):
        steps.append(v2.RandomResizedCrop(
            img_size, scale=tuple(aug["rrc_scale"]), ratio=tuple(aug.get("rrc_ratio") or (3 / 4, 4 / 3)),
            interpolation=BICUBIC, antialias=True,
        ))
    else:
        steps += [v2.Resize(img_size, interpolation=BICUBIC, antialias=True), v2.CenterCrop(img_size)]
        if aug.get("crop_padding"):
            steps.append(v2.RandomCrop(img_size, padding=aug["crop_padding"], padding_mode="edge"))
    if aug.get("hflip"):
        steps.append(v2.RandomHorizontalFlip(aug["hflip"]))
    if aug.get("randaugment"):
        ra = aug["randaugment"]
        steps.append(v2.RandAugment(num_ops=ra["ops"], magnitude=ra["magnitude"]))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if aug.get("random_erasing"):
        steps.append(v2.RandomErasing(p=aug["random_erasing"], value=0))  # 0 = the mean after normalising
    return v2.Compose(steps)


def eval_transform(
    img_size: int, in_chans: int, crop_pct: float, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        channels(in_chans),
        v2.Resize(int(round(img_size / crop_pct)), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class BatchTransform:
    """A DataLoader ``collate_fn`` that stacks uint8 images and augments the whole batch at once, still drawing a
    random crop offset and flip *per image*: the fast path for small in-memory datasets (Fashion-MNIST), where the
    per-image torchvision pipeline above costs more than the model (≈1 ms per 28x28 image on this CPU).

    Covers what ``train_transform`` does without RandomResizedCrop, RandAugment or random erasing, at the native
    image size; ``ImageDataModule`` falls back to the per-image pipeline otherwise.
    """

    def __init__(self, train: bool, aug: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> None:
        self.train = train
        self.padding = int(aug.get("crop_padding") or 0) if train else 0
        self.hflip = float(aug.get("hflip") or 0.0) if train else 0.0
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255

    @staticmethod
    def supports(aug: Mapping[str, Any]) -> bool:
        return not (aug.get("rrc_scale") or aug.get("randaugment") or aug.get("random_erasing"))

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([s[0] for s in samples]).float()  # (B, C, H, W), 0..255
        y = torch.tensor([s[1] for s in samples])
        B, C, H, W = x.shape
        if self.padding:
            p = self.padding
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="replicate")  # edge padding
            dy, dx = torch.randint(0, 2 * p + 1, (2, B, 1))
            rows = (dy + torch.arange(H)).view(B, 1, H, 1)  # each image its own offset
            cols = (dx + torch.arange(W)).view(B, 1, 1, W)
            x = padded[torch.arange(B).view(B, 1, 1, 1), torch.arange(C).view(1, C, 1, 1), rows, cols]
        if self.hflip:
            flip = (torch.rand(B) < self.hflip).view(B, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        return (x - self.mean) / self.std, y
