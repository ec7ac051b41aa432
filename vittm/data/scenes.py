"""Fashion-MNIST scenes: a small semantic segmentation dataset composed from the installed Fashion-MNIST images and
written once to disk in the ADE20K layout, so that the ADE20K data path itself (vittm.data.segmentation) trains on it.

Each scene is a grey ``canvas`` x ``canvas`` image holding ``min_garments``..``max_garments`` garments, each a
Fashion-MNIST image rescaled (bilinear) to a side drawn uniformly from ``min_side``..``max_side``, placed uniformly
fully inside the canvas and painted in order (later garments occlude earlier ones) where its value exceeds
``threshold`` (of 1.0): that is its mask. Background 0. Files: ``images/<split>/scene_00000.jpg`` (RGB JPEG) and
``annotations/<split>/scene_00000.png`` (mode L: 0 unused, 1 background, 2 + c Fashion-MNIST class c, so that
``reduce_zero_label: true`` gives the 11 ``SCENE_CLASSES``). ``training`` scenes draw from the 60,000 train images,
``validation`` scenes from the 10,000 test images, each image used at most once per split while enough remain.
Everything follows from the recipe's seed (numpy Generators, one per split).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_fill_holes

from vittm.core.errors import ConfigError
from vittm.data import fashion_mnist

SCENE_CLASSES = ("background", *fashion_mnist.CLASSES)  # labels 0..10 after reduce_zero_label
BACKGROUND = 1  # in the PNGs; garment class c is 2 + c
DATASET = "fashion_mnist_scenes"
SPLITS = (("training", "train", 0), ("validation", "test", 1))  # (folder, Fashion-MNIST split, seed stream)
CHUNK = 1024  # scenes rendered at once: bounds the memory of the resized garments


@dataclass(frozen=True)
class SceneRecipe:
    """Every parameter of the scenes (``data.compose`` in the config); see the module docstring."""

    canvas: int = 64
    min_garments: int = 2
    max_garments: int = 4
    min_side: int = 20
    max_side: int = 40
    threshold: float = 0.2
    overlap: int = 0  # 0: garments never overlap (each is placed at the first of ``tries`` drawn positions whose box
    # keeps clear of the boxes placed before; none: the garment is left out); 1: anywhere, later ones occlude
    tries: int = 30
    fill_holes: int = 1  # 1: a garment's mask is its silhouette (dark pixels enclosed by it are its own too)
    n_train: int = 12000
    n_val: int = 1000
    seed: int = 0
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"data.compose.{key}={getattr(self, key)!r}: {rule}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(v, int) and not isinstance(v, bool), f.name, "an integer")
            else:
                need(isinstance(v, int | float) and not isinstance(v, bool), f.name, "a number")
        need(self.canvas >= 1, "canvas", "a positive integer (pixels)")
        need(1 <= self.min_garments, "min_garments", "at least 1")
        need(self.min_garments <= self.max_garments, "max_garments", f">= min_garments ({self.min_garments})")
        need(1 <= self.min_side, "min_side", "at least 1 pixel")
        need(self.min_side <= self.max_side <= self.canvas, "max_side",
             f"in min_side..canvas ({self.min_side}..{self.canvas}): garments lie fully inside the canvas")
        need(0 <= self.threshold < 1, "threshold", "in [0, 1): a garment's pixel value (of 1.0) above it is painted")
        need(self.overlap in (0, 1), "overlap", "0 (garments never overlap) or 1 (later ones occlude earlier ones)")
        need(self.tries >= 1, "tries", "at least 1 position to try per garment")
        need(self.fill_holes in (0, 1), "fill_holes", "0 or 1 (fill the holes of each garment's mask)")
        need(self.n_train >= 1, "n_train", "at least 1 scene")
        need(self.n_val >= 1, "n_val", "at least 1 scene")
        need(self.seed >= 0, "seed", "an integer >= 0")
        need(1 <= self.jpeg_quality <= 100, "jpeg_quality", "in 1..100")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SceneRecipe:
        known = [f.name for f in fields(cls)]
        for key, value in cfg.items():
            if key not in known:
                raise ConfigError(f"data.compose.{key}={value!r}: not a scene recipe field; known: {known}")
        return cls(**cfg)


def _draws(recipe: SceneRecipe, n_scenes: int, n_source: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every random choice of a split, drawn up front (rendering in chunks then changes nothing)."""
    count = rng.integers(recipe.min_garments, recipe.max_garments + 1, size=n_scenes)
    total = int(count.sum())
    # Source images without repeats while they last: successive permutations of the split.
    order = np.concatenate([rng.permutation(n_source) for _ in range(-(-total // n_source))])[:total]
    side = rng.integers(recipe.min_side, recipe.max_side + 1, size=total)
    # (total, tries) candidate positions: without overlap a garment takes the first that is free
    top = rng.integers(0, (recipe.canvas - side + 1)[:, None], size=(total, recipe.tries))
    left = rng.integers(0, (recipe.canvas - side + 1)[:, None], size=(total, recipe.tries))
    return {"start": np.concatenate([[0], np.cumsum(count)]), "source": order, "side": side, "top": top,
            "left": left}


def free_spot(tops: np.ndarray, lefts: np.ndarray, side: int, placed: list[tuple[int, ...]],
              overlap: int) -> tuple[int, int] | None:
    """The first candidate (top, left) whose side x side box meets no box placed before (any first one with
    ``overlap``); ``placed`` holds (source, class, side, top, left) tuples."""
    for y, x in zip(tops.tolist(), lefts.tolist(), strict=True):
        if overlap or all(y + side <= py or py + ps <= y or x + side <= px or px + ps <= x
                          for _, _, ps, py, px in placed):
            return y, x
    return None


def render(recipe: SceneRecipe, images: np.ndarray, labels: np.ndarray, n_scenes: int, stream: int,
           first: int = 0, last: int | None = None) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, ...]]]]:
    """Scenes ``first..last-1`` of a split drawn from ``images`` (N, 28, 28) uint8 with ``labels`` (N,):
    (grey images (n, S, S) uint8, masks (n, S, S) uint8, per scene its garments as (source index, class, side,
    top, left) in painting order). ``stream`` (0 train, 1 validation) keys the split's generator."""
    d = _draws(recipe, n_scenes, len(images), np.random.default_rng([recipe.seed, stream]))
    last = n_scenes if last is None else last
    lo, hi = int(d["start"][first]), int(d["start"][last])
    # Resize the chunk's garments grouped by side: one interpolate call per side, (k, 1, 28, 28) -> (k, 1, s, s).
    resized: dict[int, np.ndarray] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run 10x slower when split over threads on a busy machine
    try:
        for s in np.unique(d["side"][lo:hi]):
            where = lo + np.flatnonzero(d["side"][lo:hi] == s)
            batch = torch.from_numpy(images[d["source"][where]].astype(np.float32) / 255).unsqueeze(1)
            out = torch.nn.functional.interpolate(batch, size=(int(s), int(s)), mode="bilinear",
                                                  align_corners=False)
            resized.update(zip(where.tolist(), out[:, 0].numpy(), strict=True))
    finally:
        torch.set_num_threads(threads)
    S = recipe.canvas
    canvases = np.zeros((last - first, S, S), np.float32)
    masks = np.full((last - first, S, S), BACKGROUND, np.uint8)
    garments: list[list[tuple[int, ...]]] = []
    for i in range(first, last):
        placed = []
        for g in range(int(d["start"][i]), int(d["start"][i + 1])):
            src, s = int(d["source"][g]), int(d["side"][g])
            spot = free_spot(d["top"][g], d["left"][g], s, placed, recipe.overlap)
            if spot is None:  # no free place for it in this scene
                continue
            y, x = spot
            value = resized[g]
            on = value > recipe.threshold  # the garment's own mask (s, s)
            if recipe.fill_holes:
                on = binary_fill_holes(on)
            canvases[i - first, y:y + s, x:x + s][on] = value[on]
            masks[i - first, y:y + s, x:x + s][on] = 2 + int(labels[src])
            placed.append((src, int(labels[src]), s, y, x))
        garments.append(placed)
    return np.rint(canvases * 255).astype(np.uint8), masks, garments


def _read_source(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    missing = fashion_mnist.missing_files(source)
    if missing:
        raise ConfigError(f"data.compose: the Fashion-MNIST scenes are drawn from the Fashion-MNIST files in "
                          f"{str(source)!r} (Debian package dataset-fashion-mnist), which lack {missing}")
    data = fashion_mnist.FashionMNIST(source, split)
    return data.images[:, 0].numpy(), data.targets.numpy()


def _write_split(folder: Path, recipe: SceneRecipe, source: Path, split: str, n: int, stream: int) -> None:
    images, labels = _read_source(source, split)
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir(parents=True)
    for first in range(0, n, CHUNK):
        grey, masks, _ = render(recipe, images, labels, n, stream, first, min(first + CHUNK, n))
        for j, (image, mask) in enumerate(zip(grey, masks, strict=True)):
            name = f"scene_{first + j:05d}"
            Image.fromarray(image, "L").convert("RGB").save(folder / "images" / f"{name}.jpg",
                                                              quality=recipe.jpeg_quality)
            Image.fromarray(mask, "L").save(folder / "annotations" / f"{name}.png")


def _description(recipe: SceneRecipe) -> dict[str, Any]:
    return {"dataset": DATASET, "recipe": asdict(recipe)}


def _holds(root: Path, recipe: SceneRecipe) -> bool:
    """Whether ``root`` holds the scenes of ``recipe`` (its recipe.json says so)."""
    try:
        found = json.loads((root / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and {k: found.get(k) for k in ("dataset", "recipe")} == _description(recipe)


def write_scenes(root: str | Path, recipe: SceneRecipe = SceneRecipe(),
                 source: str | Path = fashion_mnist.DEBIAN_ROOT) -> Path:
    """Write the scenes of ``recipe`` to ``root`` once: at once back when ``root`` already holds them (its
    recipe.json), a ConfigError when it holds anything else (user files are never overwritten). Written into a
    temporary sibling folder renamed into place at the end, so a crash never leaves half a dataset; concurrent
    writers (DDP ranks) are safe: one rename wins, the others find its recipe.json."""
    root = Path(root)
    if _holds(root, recipe):
        return root
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise ConfigError(f"data.root={str(root)!r} already holds files that are not the Fashion-MNIST scenes of "
                          f"data.compose (no matching recipe.json); choose a new or empty data.root, or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.writing-", dir=root.parent))
    try:
        start = time.perf_counter()
        print(f"writing {recipe.n_train:,} + {recipe.n_val:,} Fashion-MNIST scenes to {root} ... ", end="",
              file=sys.stderr, flush=True)
        for folder, split, stream in SPLITS:
            n = recipe.n_train if stream == 0 else recipe.n_val
            _write_split(tmp / "split", recipe, Path(source), split, n, stream)
            for kind in ("images", "annotations"):
                (tmp / kind).mkdir(exist_ok=True)
                (tmp / "split" / kind).rename(tmp / kind / folder)
            (tmp / "split").rmdir()
        text = json.dumps({**_description(recipe), "classes": list(SCENE_CLASSES)}, indent=2)
        (tmp / "recipe.json").write_text(text + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a filled one
        except OSError:
            if not _holds(root, recipe):  # not another writer's identical scenes
                raise
            shutil.rmtree(tmp)
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
