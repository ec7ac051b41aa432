"""Joint image + mask transforms for semantic segmentation: the authors' mmsegmentation 1.x ADE20K pipeline.

Train, in mmseg's order: RandomResize (``scale`` x a ratio drawn from ``ratio_range``, aspect kept), RandomCrop
``crop_size`` with ``cat_max_ratio``, horizontal flip, PhotoMetricDistortion, normalise, pad to ``crop_size``.
Eval: resize (aspect kept) into ``scale``, normalise; the mask stays at the annotation's resolution (mmseg computes
metrics there; the model resizes its prediction back).

Resizing, flipping and hue rotation are torchvision's. Written here by hand: the cat_max_ratio crop, and mmseg's
photometric steps, whose arithmetic torchvision does not share (mmseg's brightness adds a delta where torchvision's
multiplies, its contrast scales pixels where torchvision's blends towards the mean grey, its saturation scales HSV's
S where torchvision's blends with the grey image), in mmseg's order. Arithmetic is float on the 0..255 scale,
clamped after each step as mmseg does; mmseg also rounds to uint8 after each step, which is skipped here (under one
grey level). Every random draw comes from torch's global RNG, which the training loader seeds per batch
(vittm.data.resume.SeededBatches), so runs are reproducible and resume exactly.

Padding comes last, after normalising, as in mmseg 1.x (its SegDataPreProcessor pads the normalised batch): image
pad 0 (the mean colour), mask pad 255 (ignored), at the bottom and right. The crop is drawn on the unpadded image,
as mmseg's is; padding first would give the same crop but let the photometric steps shift the padded pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from vittm.core.errors import ConfigError

IGNORE_INDEX = 255
# mmseg's ADE20K pipeline; mean/std in 0-1 units as conf/data/*.yaml give them (mmseg's 123.675/58.395 ... / 255).
AUGMENT_DEFAULTS: dict[str, Any] = {
    "scale": [2048, 512],           # (long, short) bound of the resize; null: no resize
    "ratio_range": [0.5, 2.0],      # train: scale x a ratio drawn uniformly from this range; null: ratio 1
    "crop_size": 512,               # train crop (an int or [h, w]); 504 for patch-28 models
    "cat_max_ratio": 0.75,          # a crop's most frequent class must cover less than this (1: any crop)
    "flip_prob": 0.5,
    "photometric": True,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# mmseg's PhotoMetricDistortion defaults (0..255 scale; hue in OpenCV's 0..180 units).
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32.0, (0.5, 1.5), (0.5, 1.5), 18
CROP_TRIES = 10


def _bad(key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"augment.{key}={value!r}: {rule}")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_augment(augment: Mapping[str, Any] | None, in_chans: int = 3) -> dict[str, Any]:
    """``augment`` over ``AUGMENT_DEFAULTS``, every key checked (ConfigError naming ``augment.<key>``)."""
    aug = dict(AUGMENT_DEFAULTS)
    for key, value in (augment or {}).items():
        if key not in AUGMENT_DEFAULTS:
            raise _bad(key, value, f"not a segmentation augment key; known: {sorted(AUGMENT_DEFAULTS)}")
        aug[key] = value
    s = aug["scale"]
    if s is not None and not (isinstance(s, Sequence) and len(s) == 2
                              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)):
        raise _bad("scale", s, "two positive integers [long, short] (e.g. [2048, 512]) or null (no resize)")
    r = aug["ratio_range"]
    if r is not None and not (isinstance(r, Sequence) and len(r) == 2 and all(_number(v) for v in r)
                              and 0 < r[0] <= r[1]):
        raise _bad("ratio_range", r, "two numbers 0 < low <= high (e.g. [0.5, 2.0]) or null (ratio 1)")
    c = aug["crop_size"]
    crop = [c, c] if isinstance(c, int) and not isinstance(c, bool) else c
    if not (isinstance(crop, Sequence) and len(crop) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in crop)):
        raise _bad("crop_size", c, "a positive integer or two positive integers [h, w]")
    aug["crop_size"] = list(crop)
    if not (_number(aug["cat_max_ratio"]) and 0 < aug["cat_max_ratio"] <= 1):
        raise _bad("cat_max_ratio", aug["cat_max_ratio"], "a number in (0, 1] (1: accept any crop)")
    if not (_number(aug["flip_prob"]) and 0 <= aug["flip_prob"] <= 1):
        raise _bad("flip_prob", aug["flip_prob"], "a probability in [0, 1]")
    if not isinstance(aug["photometric"], bool):
        raise _bad("photometric", aug["photometric"], "true or false")
    for key, low in (("mean", 0.0), ("std", 1e-6)):
        v = aug[key]
        if not (isinstance(v, Sequence) and len(v) == in_chans and all(_number(x) for x in v)):
            raise _bad(key, v, f"{in_chans} numbers, one per channel (data.in_chans={in_chans})")
        if not all(low <= x <= 1 for x in v):
            raise _bad(key, v, "give it in 0-1 units as conf/data/*.yaml do (ImageNet: mean [0.485, 0.456, 0.406], "
                               "std [0.229, 0.224, 0.225]), not mmseg's 0-255 units")
    return aug


def _as_tensors(image: Image.Image | torch.Tensor, mask: Any, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image (C, H, W), uint8 mask (H, W)); a PIL mask is read as its raw index values (never a palette)."""
    img = F.pil_to_tensor(image) if isinstance(image, Image.Image) else torch.as_tensor(image)
    if in_chans == 1 and img.shape[0] == 3:
        img = F.rgb_to_grayscale(img)
    m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))
    return img, m


def rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: as large as fits (long side <= max(scale), short side <= min(scale))."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize(img: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]) -> tuple[torch.Tensor, Any]:
    # No antialiasing: mmcv resizes with OpenCV's INTER_LINEAR; the mask as a tv_tensors.Mask goes nearest.
    img = F.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
    if mask is not None:
        mask = F.resize(tv_tensors.Mask(mask), list(size)).as_subclass(torch.Tensor)
    return img, mask


def crop_offset(mask: torch.Tensor, size: Sequence[int], cat_max_ratio: float) -> tuple[int, int]:
    """mmseg's RandomCrop box (top, left): up to 10 redraws until the crop's most frequent class (255 excluded)
    covers < ``cat_max_ratio`` of its labelled pixels, a test only crops with 2+ classes pass; the 11th draw is taken
    unchecked, as mmseg does. ``mask`` (H, W); a side shorter than the crop gives offset 0 (padded later)."""
    H, W = mask.shape

    def draw() -> tuple[int, int]:
        return (int(torch.randint(0, max(H - size[0], 0) + 1, ())),
                int(torch.randint(0, max(W - size[1], 0) + 1, ())))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(CROP_TRIES):
            crop = mask[top:top + size[0], left:left + size[1]]
            counts = torch.bincount(crop.flatten().long(), minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()))  # mmseg's random.randint(2)


def saturate(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scale HSV saturation by ``alpha`` (clipped at 1), hue and value kept: with H and V fixed every channel is
    affine in S, c = V - V*S*k(H), so the HSV round trip reduces to c' = V - (V - c) * min(alpha, 1/S).
    ``x`` (C, H, W) on 0..255."""
    v = x.amax(0, keepdim=True)
    spread = v - x.amin(0, keepdim=True)  # V * S
    k = torch.where(spread > 0, torch.clamp(v / spread.clamp_min(1e-6), max=alpha), torch.ones_like(v))
    return v - (v - x) * k


def photometric(x: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on ``x`` (C, H, W) float 0..255: brightness, then contrast first or last (one
    coin), saturation and hue between, each step on with probability 0.5."""
    if _coin():
        x = (x + _uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp(0, 255)
    contrast_first = _coin()  # mmseg's mode == 1

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * _uniform(*CONTRAST_RANGE)).clamp(0, 255) if _coin() else x

    if contrast_first:
        x = contrast(x)
    if _coin():
        x = saturate(x, _uniform(*SATURATION_RANGE)).clamp(0, 255)
    if _coin():
        shift = int(torch.randint(-HUE_DELTA, HUE_DELTA, ()))  # numpy's randint(-18, 18): -18..17, of 180
        x = F.adjust_hue(x / 255, shift / 180) * 255
    if not contrast_first:
        x = contrast(x)
    return x


class SegTrainTransform:
    """(PIL image, mask) -> (float image (C, crop_h, crop_w) normalised, int64 mask (crop_h, crop_w), 255 = ignore)."""

    def __init__(self, aug: Mapping[str, Any], in_chans: int) -> None:
        self.aug, self.in_chans = aug, in_chans
        self.mean = torch.tensor(aug["mean"]).view(-1, 1, 1) * 255
        self.std = torch.tensor(aug["std"]).view(-1, 1, 1) * 255

    def __call__(self, image: Image.Image | torch.Tensor, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.aug
        img, m = _as_tensors(image, mask, self.in_chans)  # (C, H, W), (H, W) uint8
        if a["scale"] is not None:
            ratio = _uniform(*a["ratio_range"]) if a["ratio_range"] is not None else 1.0
            target = (int(a["scale"][0] * ratio), int(a["scale"][1] * ratio))  # mmcv truncates
            img, m = _resize(img, m, rescale_size(*m.shape, target))
        ch, cw = a["crop_size"]
        top, left = crop_offset(m, (ch, cw), a["cat_max_ratio"])
        img, m = img[:, top:top + ch, left:left + cw], m[top:top + ch, left:left + cw]
        if float(torch.rand(())) < a["flip_prob"]:
            img, m = img.flip(-1), m.flip(-1)
        x = img.float()
        if a["photometric"]:
            x = photometric(x)
        x = (x - self.mean) / self.std
        ph, pw = ch - x.shape[1], cw - x.shape[2]
        if ph or pw:  # bottom and right, after normalising (see the module docstring)
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
            m = torch.nn.functional.pad(m, (0, pw, 0, ph), value=IGNORE_INDEX)
        return x.contiguous(), m.long()


class SegEvalTransform:
    """(PIL image, mask) -> (float image (C, h, w) resized into ``scale`` and normalised, int64 mask (H, W) as read)."""

    def __init__(self, aug: Mapping[str, Any], in_chans: int) -> None:
        self.scale, self.in_chans = aug["scale"], in_chans
        self.mean = torch.tensor(aug["mean"]).view(-1, 1, 1) * 255
        self.std = torch.tensor(aug["std"]).view(-1, 1, 1) * 255

    def __call__(self, image: Image.Image | torch.Tensor, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = _as_tensors(image, mask, self.in_chans)
        if self.scale is not None:
            img, _ = _resize(img, None, rescale_size(*img.shape[1:], self.scale))
        return (img.float() - self.mean) / self.std, m.long()


def build_seg_transforms(augment: Mapping[str, Any] | None, split: str, in_chans: int = 3) -> Callable:
    """The train (``split="train"``) or eval (``"eval"``) transform of ``augment`` (keys: ``AUGMENT_DEFAULTS``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: 'train' or 'eval'")
    aug = check_augment(augment, in_chans)
    return SegTrainTransform(aug, in_chans) if split == "train" else SegEvalTransform(aug, in_chans)
