"""Segmentation data: the ADE20K-layout folder and data module, the mmseg-style joint transforms, and the
Fashion-MNIST scenes written in that layout. Tiny folders in tmp_path; a few seconds in all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vittm.core.errors import ConfigError
from vittm.data import fashion_mnist
from vittm.data.scenes import SCENE_CLASSES, SceneRecipe, _draws, render, write_scenes
from vittm.data.seg_transforms import IGNORE_INDEX, build_seg_transforms, check_augment, crop_offset, rescale_size
from vittm.data.segmentation import (
    ADE20K_CLASSES,
    SEG_DATASETS,
    SegmentationDataModule,
    SegmentationFolder,
)

H, W = 40, 56
SMALL = {"scale": [112, 40], "ratio_range": [0.5, 2.0], "crop_size": 32}  # the ADE20K pipeline, shrunk


def write_pair(root: Path, split: str, stem: str, rng: np.random.Generator, labels: int = 6) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image, "RGB").save(root / "images" / split / f"{stem}.jpg", quality=95)
    mask = np.repeat(rng.integers(0, labels, (H // 8, W // 8), dtype=np.uint8), 8, 0).repeat(8, 1)  # 8x8 blocks
    Image.fromarray(mask, "L").save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    """8 training and 3 validation pairs: 40x56 RGB JPEGs, masks with labels 0..5."""
    rng = np.random.default_rng(0)
    for split, n in (("training", 8), ("validation", 3)):
        for i in range(n):
            write_pair(tmp_path, split, f"ADE_{split}_{i:03d}", rng)
    return tmp_path


def module(root: Path, **kw) -> SegmentationDataModule:
    args = dict(dataset="ade20k", root=str(root), num_classes=5, reduce_zero_label=True, batch_size=2,
                augment=SMALL, seed=3)
    return SegmentationDataModule(**{**args, **kw})


# ------------------------------------------------------------------------------------------------ the folder
def test_pairs_by_stem_sorted(ade: Path) -> None:
    folder = SegmentationFolder(ade, "training", 5, True)
    assert len(folder) == 8 and [i.stem for i, _ in folder.samples] == sorted(i.stem for i, _ in folder.samples)
    assert all(i.stem == m.stem for i, m in folder.samples)
    assert len(SegmentationFolder(ade, "training", 5, True, subset=3)) == 3


def test_image_without_mask_and_mask_without_image(ade: Path) -> None:
    (ade / "annotations" / "training" / "ADE_training_002.png").unlink()
    with pytest.raises(ConfigError, match=r"1 file\(s\) in .*images/training without a partner.*ADE_training_002\.jpg"):
        SegmentationFolder(ade, "training", 5, True)
    Image.new("L", (W, H)).save(ade / "annotations" / "validation" / "lone.png")
    with pytest.raises(ConfigError, match=r"1 file\(s\) in .*annotations/validation .*first: lone\.png"):
        SegmentationFolder(ade, "validation", 5, True)


def test_missing_folder_names_root_and_layout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.root=.*lacks.*images/training.*ADEChallengeData2016"):
        SegmentationFolder(tmp_path, "training", 5, True)
    with pytest.raises(ConfigError, match=r"data\.root=.*lacks"):
        module(tmp_path)


def test_reduce_zero_label(ade: Path) -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[:, 10:20], mask[:, 20:30] = 3, 255
    Image.fromarray(mask, "L").save(ade / "annotations" / "training" / "ADE_training_000.png")
    _, reduced = SegmentationFolder(ade, "training", 5, True)[0]
    assert reduced.dtype == torch.int64 and reduced.shape == (H, W)
    assert set(reduced[:, :10].unique().tolist()) == {255}  # 0: "other", ignored
    assert set(reduced[:, 10:20].unique().tolist()) == {2}
    assert set(reduced[:, 20:30].unique().tolist()) == {255}  # 255 stays ignored
    _, raw = SegmentationFolder(ade, "training", 6, False)[0]
    assert raw[0, 0] == 0 and raw[0, 15] == 3


def test_palette_mask_read_as_indices(ade: Path) -> None:
    mask = Image.fromarray(np.full((H, W), 4, np.uint8), "P")
    mask.putpalette([200, 10, 10] * 256)
    mask.save(ade / "annotations" / "training" / "ADE_training_000.png")
    _, reduced = SegmentationFolder(ade, "training", 5, True)[0]
    assert set(reduced.unique().tolist()) == {3}


# --------------------------------------------------------------------------------------------- bad samples
def _break(ade: Path, kind: str) -> Path:
    """Spoil ADE_training_001 in one way; the file to be named."""
    image = ade / "images" / "training" / "ADE_training_001.jpg"
    mask = ade / "annotations" / "training" / "ADE_training_001.png"
    if kind == "unreadable image":
        image.write_bytes(b"not a jpeg")
        return image
    if kind == "unreadable mask":
        mask.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif kind == "size":
        Image.new("L", (W + 1, H)).save(mask)
    elif kind == "label":
        Image.fromarray(np.full((H, W), 201, np.uint8), "L").save(mask)  # 200 after reduce_zero_label
    elif kind == "channels":
        Image.new("RGB", (W, H)).save(mask)
    return mask


KINDS = {"unreadable image": "cannot be read", "unreadable mask": "cannot be read", "size": "is 57x40 but its image",
         "label": r"has label 200, outside 0\.\.4 after reduce_zero_label \(num_classes=5\)",
         "channels": "is mode RGB, not a single-channel"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_sample_fail_names_the_file(ade: Path, kind: str) -> None:
    path = _break(ade, kind)
    folder = SegmentationFolder(ade, "training", 5, True, on_bad_mask="fail")
    with pytest.raises(ConfigError, match=rf"data\.on_bad_mask=fail: .*{path.name} {KINDS[kind]}"):
        folder[1]
    assert folder[0] is not None  # the good ones still read


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_sample_skip_drops_counts_logs(ade: Path, kind: str) -> None:
    path = _break(ade, kind)
    log = ade / "run" / "bad_images.txt"
    folder = SegmentationFolder(ade, "training", 5, True, on_bad_mask="skip", bad_log=log)
    with pytest.warns(UserWarning, match="skipping"):
        assert folder[1] is None
    folder[1]  # warned and logged once per file
    assert folder.seen == {str(path)} and log.read_text().splitlines() == [f"{path}\t{_problem(folder, 1)}"]


def _problem(folder: SegmentationFolder, index: int) -> str:
    try:
        folder.load(index)
    except Exception as err:  # noqa: BLE001 - BadSample: (path, problem)
        return err.args[1]
    raise AssertionError("the sample is good")


def test_skipped_sample_in_the_module(ade: Path) -> None:
    path = _break(ade, "label")
    Image.new("RGB", (W, H)).save(ade / "annotations" / "validation" / "ADE_validation_001.png")
    dm = module(ade, val_split=0, batch_size=8, eval_batch_size=8, bad_image_log=str(ade / "bad.txt"))
    with pytest.warns(UserWarning):
        images, masks = next(iter(dm.train_dataloader()))  # replaced by the next good pair: the batch stays full
    assert images.shape[0] == masks.shape[0] == 8
    with pytest.warns(UserWarning):
        images, masks = next(iter(dm.val_dataloader()))  # dropped from its evaluation batch
    assert len(images) == len(masks) == 2
    assert dm.bad_images() == sorted([str(path), str(ade / "annotations" / "validation" / "ADE_validation_001.png")])


# ------------------------------------------------------------------------------------------------ transforms
def _pair(h: int = H, w: int = W, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"),
            rng.integers(0, 6, (h, w), dtype=np.uint8))


def test_train_output_shapes_and_padding() -> None:
    image, mask = _pair()
    x, m = build_seg_transforms({**SMALL, "crop_size": 24}, "train")(image, mask)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and m.shape == (24, 24) and m.dtype == torch.int64
    plain = {"scale": None, "crop_size": [48, 64], "flip_prob": 0.0, "photometric": False}
    x, m = build_seg_transforms(plain, "train")(image, mask)  # 40x56 in a 48x64 crop: padded bottom and right
    assert x.shape == (3, 48, 64) and m.shape == (48, 64)
    assert (m[H:] == IGNORE_INDEX).all() and (m[:, W:] == IGNORE_INDEX).all() and (m[:H, :W] < 6).all()
    assert (x[:, H:] == 0).all() and (x[:, :, W:] == 0).all()  # 0 after normalising: the mean colour
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expect = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - mean) / std
    assert torch.allclose(x[:, :H, :W], expect, atol=1e-5)


def test_random_resize_range() -> None:
    image, mask = _pair()
    tf = build_seg_transforms({"scale": [224, 64], "ratio_range": [0.5, 2.0], "crop_size": [130, 180],
                               "photometric": False}, "train")
    heights = set()
    for seed in range(30):
        torch.manual_seed(seed)
        _, m = tf(image, mask)
        height = int((m[:, 0] != IGNORE_INDEX).sum())  # 40x56 resized to a short side of 64 r, r in 0.5..2
        width = int((m[0] != IGNORE_INDEX).sum())
        assert 32 <= height <= 128 and abs(width - height * W / H) <= 1
        heights.add(height)
    assert len(heights) > 15
    assert rescale_size(H, W, (2048, 512)) == (512, 717) and rescale_size(40, 400, (512, 2048)) == (205, 2048)


def test_cat_max_ratio_rejects_dominated_crops() -> None:
    mask = torch.ones(10, 100, dtype=torch.uint8)  # class 1 on the left 60 columns
    mask[:, 60:] = torch.arange(40).remainder(2).to(torch.uint8) + 2  # classes 2 and 3 on the right
    mask[:, :5] = IGNORE_INDEX  # ignored pixels do not count

    def good(left: int) -> bool:
        counts = torch.bincount(mask[:, left:left + 20].flatten().long(), minlength=256)[:255]
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    def share(ratio: float) -> float:
        torch.manual_seed(0)
        return np.mean([good(crop_offset(mask, (10, 20), ratio)[1]) for _ in range(300)])

    assert share(1.0) < 0.5 < 0.9 < share(0.75)  # ~36 % of offsets pass; 10 redraws find one almost always
    one_class = torch.ones(10, 100, dtype=torch.uint8)
    assert crop_offset(one_class, (10, 20), 0.75)[0] == 0  # no better crop: taken after the redraws


def test_flip_moves_image_and_mask_together() -> None:
    image, mask = _pair()
    base = {"scale": None, "crop_size": [H, W], "cat_max_ratio": 1.0, "photometric": False}
    x0, m0 = build_seg_transforms({**base, "flip_prob": 0.0}, "train")(image, mask)
    x1, m1 = build_seg_transforms({**base, "flip_prob": 1.0}, "train")(image, mask)
    assert torch.equal(x1, x0.flip(-1)) and torch.equal(m1, m0.flip(-1)) and not torch.equal(m0, m1)


def test_photometric_changes_only_the_image() -> None:
    image, mask = _pair()
    base = {"scale": None, "crop_size": [H, W], "cat_max_ratio": 1.0, "flip_prob": 0.0}
    x0, m0 = build_seg_transforms({**base, "photometric": False}, "train")(image, mask)
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        x, m = build_seg_transforms(base, "train")(image, mask)
        assert torch.equal(m, m0) and x.shape == x0.shape
        changed += not torch.allclose(x, x0)
    assert changed >= 6  # all four steps are off with probability 1/16


def test_eval_resizes_short_side_keeps_mask() -> None:
    tf = build_seg_transforms({}, "eval")
    image, mask = _pair()
    x, m = tf(image, mask)
    assert x.shape == (3, 512, 717) and torch.equal(m, torch.from_numpy(mask).long())  # 40x56 x 12.8
    image, mask = _pair(40, 400)
    x, m = tf(image, mask)
    assert x.shape == (3, 205, 2048) and m.shape == (40, 400)  # the long side bounds it: x 5.12


def test_augment_keys_are_checked() -> None:
    assert check_augment({})["crop_size"] == [512, 512]
    for bad, key in (({"crop_size": 0}, "crop_size"), ({"cat_max_ratio": 1.5}, "cat_max_ratio"),
                     ({"mean": [123.675, 116.28, 103.53]}, "mean"), ({"std": [0.2, 0.2]}, "std"),
                     ({"ratio_range": [2.0, 0.5]}, "ratio_range"), ({"flip": 0.5}, "flip"),
                     ({"photometric": 1}, "photometric"), ({"scale": [512]}, "scale")):
        with pytest.raises(ConfigError, match=rf"^augment\.{key}="):
            check_augment(bad)


def test_transforms_are_reproducible() -> None:
    image, mask = _pair()
    tf = build_seg_transforms(SMALL, "train")
    torch.manual_seed(5)
    a = tf(image, mask)
    torch.manual_seed(5)
    b = tf(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------- data module
def test_splits(ade: Path) -> None:
    dm = module(ade, val_split=2)
    dm.setup()
    assert dm.split_sizes["train"] == 6 and dm.split_sizes["val"] == 2 and dm.split_sizes["test"] == 3
    assert set(dm.split_sizes) == {"train", "val", "test", "val_from"} and dm.has_test()
    assert set(dm.val_set.indices).isdisjoint(dm.train_set.dataset.indices)
    dm = module(ade, val_split=0)
    assert dm.split_sizes == {"train": 8, "val": 3, "test": None, "val_from": "the test split (data.val_split=0)"}
    assert not dm.has_test() and dm.test_set is None
    with pytest.raises(ConfigError, match="val_split=0"):
        dm.test_dataloader()
    assert module(ade, val_split=0.25, train_subset=4).split_sizes["train"] == 4


def test_batches(ade: Path) -> None:
    dm = module(ade, val_split=2, eval_batch_size=2)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32) and masks.dtype == torch.int64
    images, masks = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and len(images) == len(masks) == 2
    assert images[0].shape == (3, 40, 56) and masks[0].shape == (H, W)  # scale [112, 40]: 40 short side
    images, masks = next(iter(dm.test_dataloader()))
    assert len(images) == 2 and masks[0].shape == (H, W)


def test_train_loader_resumes_mid_epoch(ade: Path) -> None:
    straight = [b for b in module(ade).train_dataloader()]  # 8 images, batches of 2: 4 batches
    assert len(straight) == 4
    first = module(ade)
    it = iter(first.train_dataloader())
    for _ in range(2):
        next(it)
    state = first.state_dict()
    assert state == {"train_loader": {"epoch": 0, "batches": 2}}
    resumed = module(ade)
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == 2
    for (x, m), (x0, m0) in zip(rest, straight[2:], strict=True):
        assert torch.equal(x, x0) and torch.equal(m, m0)


def test_module_keys_are_checked(ade: Path) -> None:
    for key, value in (("num_classes", 255), ("on_bad_mask", "ignore"), ("eval_batch_size", 0),
                       ("val_split", -1), ("dataset", "coco")):
        with pytest.raises(ConfigError, match=rf"data\.{key}="):
            module(ade, **{key: value})
    with pytest.raises(ConfigError, match=r"augment\.crop_size"):
        module(ade, augment={"crop_size": -1})
    with pytest.raises(ConfigError, match=r"data\.class_names"):
        module(ade, class_names=["a", "b"])
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and SEG_DATASETS == ("ade20k",)
    assert module(ade).class_names == [f"class_{i}" for i in range(5)]


# -------------------------------------------------------------------------------------- Fashion-MNIST scenes
needs_fmnist = pytest.mark.skipif(bool(fashion_mnist.missing_files(fashion_mnist.DEBIAN_ROOT)),
                                  reason="needs Debian's dataset-fashion-mnist")
TINY = SceneRecipe(n_train=20, n_val=5, overlap=1, fill_holes=0)  # every garment placed, masks as thresholded


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scenes(tmp_path_factory.mktemp("scenes") / "fm", TINY)


@needs_fmnist
def test_scenes_layout_and_labels(scenes: Path) -> None:
    labels = set()
    for split, n in (("training", 20), ("validation", 5)):
        images = sorted((scenes / "images" / split).iterdir())
        assert [p.name for p in images] == [f"scene_{i:05d}.jpg" for i in range(n)]
        for p in images:
            mask = Image.open(scenes / "annotations" / split / f"{p.stem}.png")
            assert mask.mode == "L" and mask.size == (64, 64) and Image.open(p).mode == "RGB"
            labels |= set(np.unique(np.asarray(mask)).tolist())
    assert labels <= set(range(1, 12)) and labels >= set(range(2, 12))  # every garment class occurs
    found = json.loads((scenes / "recipe.json").read_text())
    assert found["recipe"]["n_train"] == 20 and found["classes"] == list(SCENE_CLASSES) and len(SCENE_CLASSES) == 11
    assert not [p for p in scenes.parent.iterdir() if p.name != "fm"]  # no temporary folder left behind


@needs_fmnist
def test_scene_masks_match_the_painting(scenes: Path) -> None:
    data = fashion_mnist.FashionMNIST(fashion_mnist.DEBIAN_ROOT, "train")
    grey, masks, garments = render(TINY, data.images[:, 0].numpy(), data.targets.numpy(), 20, 0)
    for i in range(20):
        assert ((masks[i] == 1) == (grey[i] == 0)).all()  # painted exactly where a garment lies
        assert (grey[i][masks[i] > 1] >= round(0.2 * 255)).all()
        assert 2 <= len(garments[i]) <= 4
        src, cls, side, top, left = garments[i][-1]  # the last one painted is on top of the rest
        resized = torch.nn.functional.interpolate(data.images[src][None].float() / 255, size=(side, side),
                                                  mode="bilinear", align_corners=False)[0, 0].numpy()
        assert (masks[i][top:top + side, left:left + side][resized > 0.2] == 2 + cls).all()
        assert 20 <= side <= 40 and 0 <= top <= 64 - side and 0 <= left <= 64 - side
        written = np.asarray(Image.open(scenes / "annotations" / "training" / f"scene_{i:05d}.png"))
        assert np.array_equal(written, masks[i])
        jpeg = np.asarray(Image.open(scenes / "images" / "training" / f"scene_{i:05d}.jpg"))[..., 0]
        assert np.abs(jpeg.astype(int) - grey[i]).mean() < 3  # JPEG quality 95
    sources = [g[0] for scene in garments for g in scene]
    assert len(set(sources)) == len(sources)  # no image twice in a split while enough remain


@needs_fmnist
def test_scenes_without_overlap_keep_garments_apart_with_whole_silhouettes() -> None:
    data = fashion_mnist.FashionMNIST(fashion_mnist.DEBIAN_ROOT, "train")
    recipe = SceneRecipe(n_train=40, n_val=5, min_garments=2, max_garments=3, min_side=22, max_side=32)
    grey, masks, garments = render(recipe, data.images[:, 0].numpy(), data.targets.numpy(), 40, 0)
    for i in range(40):
        assert 1 <= len(garments[i]) <= 3
        boxes = [(top, left, side) for _, _, side, top, left in garments[i]]
        for a, (y, x, s) in enumerate(boxes):
            for yy, xx, ss in boxes[a + 1:]:  # no two boxes meet
                assert y + s <= yy or yy + ss <= y or x + s <= xx or xx + ss <= x
        assert (grey[i][masks[i] == 1] == 0).all()  # background is black
        for _, cls, side, top, left in garments[i]:  # each box holds its garment's class or background only
            assert set(np.unique(masks[i][top:top + side, left:left + side]).tolist()) <= {1, 2 + cls}
    assert sum(len(g) for g in garments) > 2 * 40 * 0.9  # few garments find no free place


def test_scene_draws_reuse_images_only_when_exhausted() -> None:
    d = _draws(SceneRecipe(), 30, 50, np.random.default_rng(0))  # 60..120 garments from 50 images
    assert len(set(d["source"][:50].tolist())) == 50


@needs_fmnist
def test_write_scenes_once_and_never_over_other_files(scenes: Path, tmp_path: Path, capsys) -> None:
    stamp = (scenes / "recipe.json").stat().st_mtime_ns
    assert write_scenes(scenes, TINY) == scenes and (scenes / "recipe.json").stat().st_mtime_ns == stamp
    assert "writing" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"data\.root=.*already holds"):
        write_scenes(scenes, SceneRecipe(n_train=21, n_val=5))  # another recipe
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"data\.root=.*already holds"):
        write_scenes(tmp_path / "mine", TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(ConfigError, match=r"data\.compose\.max_side=80"):
        SceneRecipe(max_side=80)
    with pytest.raises(ConfigError, match=r"data\.compose\.garments="):
        SceneRecipe.from_config({"garments": 3})


@needs_fmnist
def test_module_composes_scenes(tmp_path: Path, capsys) -> None:
    dm = module(tmp_path / "fm", num_classes=11, batch_size=4, compose={"n_train": 12, "n_val": 4},
                augment={"scale": [256, 64], "crop_size": 48})
    images, masks = next(iter(dm.train_dataloader()))
    assert "writing 12 + 4 Fashion-MNIST scenes to" in capsys.readouterr().err
    assert images.shape == (4, 3, 48, 48) and set(masks.unique().tolist()) <= set(range(11)) | {255}
    assert dm.class_names == list(SCENE_CLASSES) and dm.split_sizes["val"] == 4
