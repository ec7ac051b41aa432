"""The FFCV path: writer, both loader pipelines, DDP shards, training from .beton files, bad files.

Each test image has its own flat grey level (plus JPEG noise), so the mean of any crop of it tells which image it
is: that is how "every image exactly once per epoch" is checked through random crops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, run_cli
from PIL import Image

ffcv = pytest.importorskip("ffcv", reason="the FFCV extra is not installed (make setup builds it)")
pytestmark = pytest.mark.ffcv

from vittm.core.errors import ConfigError  # noqa: E402
from vittm.data.datamodule import ImageDataModule  # noqa: E402
from vittm.data.ffcv_loader import FFCVDataModule  # noqa: E402
from vittm.data.write_ffcv import WriterSettings, main, write_split  # noqa: E402

CLASSES, PER_CLASS = ["ankle", "bag", "coat"], 8  # 24 readable images per split
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def level(index: int) -> int:
    return 20 + 9 * index  # distinct grey levels 20..227


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """An ImageFolder of real JPEGs of varied sizes (and one truncated JPEG), written to train/val .beton files."""
    base = tmp_path_factory.mktemp("ffcv")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index in range(len(CLASSES) * PER_CLASS):
            folder = base / "folder" / split / CLASSES[index // PER_CLASS]
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(36, 80, size=2)
            pixels = np.full((h, w, 3), level(index), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=95)
    good = (base / "folder" / "train" / "ankle" / "000.jpg").read_bytes()
    (base / "folder" / "train" / "bag" / "broken.jpg").write_bytes(good[: len(good) // 3])
    settings = WriterSettings(max_resolution=64, write_mode="jpg", workers=2)
    infos = {s: write_split("imagefolder", base / "folder", s, base / "out" / f"{s}.beton", settings)
             for s in ("train", "val")}
    return base, infos


def module(base, **kwargs) -> FFCVDataModule:
    args = dict(dataset="ffcv", train_path=str(base / "out" / "train.beton"), val_path=str(base / "out" / "val.beton"),
                num_classes=None, in_chans=3, img_size=32, crop_pct=0.875, mean=MEAN, std=STD, batch_size=8,
                augment={"rrc_scale": [0.25, 1.0], "hflip": 0.5})
    return FFCVDataModule(**(args | kwargs))


def identify(x: torch.Tensor) -> list[int]:
    """Image indices from normalised batches: each image's mean grey level."""
    levels = ((x.float() * STD[0] + MEAN[0]) * 255).mean(dim=(1, 2, 3))
    return [int(round((float(v) - 20) / 9)) for v in levels]


def test_writer_skips_the_broken_jpeg_and_records_a_sidecar(betons):
    base, infos = betons
    train = json.loads((base / "out" / "train.beton.json").read_text())
    assert train == json.loads(json.dumps(infos["train"]))
    assert (train["num_images"], train["num_skipped"], train["num_classes"]) == (24, 1, 3)
    assert train["skipped"][0]["path"].endswith("bag/broken.jpg")
    assert train["class_to_idx"] == {"ankle": 0, "bag": 1, "coat": 2}
    assert train["settings"]["write_mode"] == "jpg" and train["settings"]["max_resolution"] == 64
    with pytest.raises(ConfigError, match=r"unreadable image .*broken.jpg"):
        write_split("imagefolder", base / "folder", "train", base / "strict" / "train.beton",
                    WriterSettings(on_error="fail"))
    assert not (base / "strict" / "train.beton").exists()


def test_cli_never_overwrites(betons, capsys):
    base, _ = betons
    target = base / "out" / "train.beton"
    before = (target.stat().st_mtime_ns, target.stat().st_size)
    code = main(["--source", "imagefolder", "--root", str(base / "folder"), "--out-dir", str(base / "out")])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (target.stat().st_mtime_ns, target.stat().st_size) == before


def test_both_pipelines_read_every_image_once(betons):
    base, _ = betons
    dm = module(base)
    for epoch in range(2):
        seen, labels = [], []
        for x, y in dm.build_loader("train"):
            assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert -2.1 < float(x.min()) and float(x.max()) < 2.1  # (0..255 / 255 - 0.5) / 0.25
            seen += identify(x)
            labels += y.tolist()
        assert sorted(seen) == list(range(24)), f"epoch {epoch}"
        assert all(label == i // PER_CLASS for i, label in zip(seen, labels, strict=True))
    # val: centre crops in file order, exactly the order of the ImageFolder the torchvision path reads
    val = [(identify(x), y.tolist()) for x, y in dm.build_loader("val")]
    order, labels = sum((v[0] for v in val), []), sum((v[1] for v in val), [])
    assert order == list(range(24)) and labels == [i // PER_CLASS for i in range(24)]
    tv = ImageDataModule("imagefolder", str(base / "folder"), 3, 3, 32, 0.875, MEAN, STD, 8)
    tv.setup()
    tv_batches = list(tv.val_dataloader())
    assert sum((identify(x) for x, _ in tv_batches), []) == order
    assert sum((y.tolist() for _, y in tv_batches), []) == labels


def test_randaugment_erasing_and_grey_run_in_torch_per_image(betons):
    base, _ = betons
    dm = module(base, augment={"rrc_scale": [0.25, 1.0], "randaugment": {"ops": 2, "magnitude": 15},
                               "random_erasing": 0.5})
    x, y = next(iter(dm.build_loader("train")))
    assert x.dtype == torch.uint8  # FFCV stops at uint8; torch does the rest
    trainer = type("T", (), {"training": True})()
    dm.trainer = trainer
    out, _ = dm.on_after_batch_transfer((x, y), 0)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    grey = module(base, in_chans=1, mean=[0.5], std=[0.25])
    x, _ = grey.on_after_batch_transfer(next(iter(grey.build_loader("val"))), 0)
    assert x.shape == (8, 1, 32, 32)


DDP_SCRIPT = """
import json, sys, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_ffcv import module, identify
from pathlib import Path
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank, world_size=2)
dm = module(Path({base!r}), batch_size=4)  # 12 images per rank: 3 full batches
train = sum((identify(x) for x, _ in dm.build_loader("train", world=2, rank=rank)), [])
val = sum((identify(x) for x, _ in dm.build_loader("val", world=2, rank=rank)), [])
print(json.dumps({{"train": train, "val": val}}))
dist.destroy_process_group()
"""


def test_ddp_ranks_read_disjoint_shards(betons, tmp_path):
    base, _ = betons
    script = tmp_path / "shard.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests"), base=str(base)))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    shards = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    for split in ("train", "val"):
        a, b = shards[0][split], shards[1][split]
        assert len(a) == len(b) == 12 and not set(a) & set(b) and sorted(a + b) == list(range(24)), split


def test_run_py_trains_from_betons(betons, tmp_path):
    base, _ = betons
    proc = run_cli(tmp_path, "data=ffcv", f"data.train_path={base / 'out' / 'train.beton'}",
                   f"data.val_path={base / 'out' / 'val.beton'}", "data.batch_size=8", "model=vittm_test",
                   "augment=imagenet", "trainer.max_epochs=2", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "ffcv" and metrics["num_classes"] == 3 and metrics["steps"] == 6


def test_bad_beton_files_are_refused_clearly(betons, tmp_path):
    base, _ = betons
    with pytest.raises(ConfigError, match="data.train_path='/no/such.beton' does not exist"):
        module(base, train_path="/no/such.beton")
    cut = tmp_path / "cut.beton"
    data = (base / "out" / "train.beton").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="data.train_path=.*cut.beton.*(truncated|not a readable FFCV file)"):
        module(base, train_path=str(cut))
    junk = tmp_path / "junk.beton"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match="junk.beton.*not a readable FFCV file|junk.beton.*truncated"):
        module(base, train_path=str(junk))
    with pytest.raises(ConfigError, match="holds 3 classes but data.num_classes=5"):
        module(base, num_classes=5)


def test_fashion_mnist_source(tmp_path):
    info = write_split("fashion_mnist", __import__("pathlib").Path("/usr/share/datasets/fashion-mnist"), "val",
                       tmp_path / "val.beton", WriterSettings(write_mode="raw", subset=64))
    assert (info["num_images"], info["num_classes"]) == (64, 10)
    shutil.copy(tmp_path / "val.beton", tmp_path / "train.beton")
    shutil.copy(tmp_path / "val.beton.json", tmp_path / "train.beton.json")
    dm = FFCVDataModule("ffcv", str(tmp_path / "train.beton"), str(tmp_path / "val.beton"), None, 1, 28, 1.0, [0.286],
                        [0.353], 16, augment={})
    x, y = dm.on_after_batch_transfer(next(iter(dm.build_loader("val"))), 0)
    assert x.shape == (16, 1, 28, 28) and y.max() < 10
