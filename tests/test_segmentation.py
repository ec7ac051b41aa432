"""Segmentation as a task of the framework, end to end on tiny models and a tiny fabricated ADE20K-layout folder:
every decoder x a ViTTM (both stream-feed cases) and a ViT baseline, metrics.json / per-class CSV / examples.png,
the ADE20K presets, starting from a classification checkpoint, resume, evaluation, bad masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg
from PIL import Image

from vittm.core.errors import ConfigError
from vittm.tasks.run import evaluate, train

# A 4-class dataset of 40x56 images; labels 0 (ignored by reduce_zero_label) .. 4.
CLASSES = 4
TINY_SEG = [
    "experiment=fmnist_scenes", "model.img_size=32", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "data=ade20k", f"data.num_classes={CLASSES}", "data.val_split=2",
    "data.batch_size=4", "data.eval_batch_size=2", "data.num_workers=0", "data.pin_memory=false",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.pipeline.scale=[128,32]",
    "data.pipeline.crop_size=32", "data.pipeline.photometric=true", "data.pipeline.test.mode=slide",
    "data.pipeline.test.crop=32", "data.pipeline.test.stride=24", "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "logger=none", "schedule.warmup_steps=1", "checkpoint.every_n_steps=0",
]


def make_ade(root: Path, n_train: int = 10, n_val: int = 4, bad: dict[str, int] | None = None) -> Path:
    """images/{training,validation}/*.jpg and annotations/*.png: a bright square of one class on a dark background
    of another, so a few steps learn something; ``bad``: {stem: label} writes that label into one mask."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.full((40, 56), 1 + i % 2, dtype=np.uint8)
            y, x = rng.integers(0, 20), rng.integers(0, 30)
            mask[y:y + 16, x:x + 20] = 3 + i % 2
            mask[:2] = 0  # "other": ignored
            image = (rng.integers(0, 40, size=(40, 56, 3)) + 50 * mask[..., None]).clip(0, 255).astype(np.uint8)
            stem = f"{split}_{i:03d}"
            if bad and stem in bad:
                mask[5, 5] = bad[stem]
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "annotations" / split / f"{stem}.png")
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_ade(tmp_path_factory.mktemp("ade"))


def run(tmp_path: Path, ade: Path, *overrides: str) -> dict:
    decoder = [] if "decoder=linear" in overrides else ["decoder.d_model=32", "decoder.n_heads=2"]
    return train(compose_cfg(tmp_path, *TINY_SEG, *decoder, f"data.root={ade}", *overrides))


def test_segmentation_trains_tests_and_writes_its_files(tmp_path, ade, capsys):
    result = run(tmp_path / "run", ade)
    assert result["task"] == "segmentation"
    for key in ("val/miou", "val/pixel_acc", "val/macc", "val_ema/miou"):
        assert 0 <= result["final"][key] <= 1
    assert {"test/miou", "test/pixel_acc", "test_ema/miou"} <= set(result["test"])
    assert result["best"]["val/miou"] == result["final"]["val/miou"]  # one validation
    assert result["splits"]["train"] == 8 and result["splits"]["val"] == 2 and result["splits"]["test"] == 4
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"] == result["test"]
    rows = list(csv.reader((tmp_path / "run" / "per_class_iou.csv").open()))
    assert rows[0][0] == "class" and "test" in rows[0] and len(rows) == 1 + CLASSES
    assert (tmp_path / "run" / "examples.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "mIoU %" in out and "per-class IoU" in out
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.parametrize("decoder", ["segmenter", "linear"])
@pytest.mark.parametrize("backbone", ["vittm_process", "vittm_both", "vit"])
def test_every_decoder_trains_on_every_backbone(tmp_path, ade, decoder, backbone):
    models = {
        "vittm_process": [],  # memory 4 / process 8: grids differ, the process map feeds the decoder
        "vittm_both": ["model.memory_ps=8"],  # equal grids: both streams concatenated
        "vit": ["model=vit_fmnist", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.img_size=32",
                "model.patch_size=8"],
    }
    result = run(tmp_path, ade, f"decoder={decoder}", "decoder.features=auto", *models[backbone], "trainer.max_steps=2",
                 "ema.enabled=false",
                 "checkpoint.save=false")
    assert result["steps"] == 2 and 0 <= result["test"]["test/miou"] <= 1


def test_resume_continues_the_run_exactly(tmp_path, ade):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = run(tmp_path / "straight", ade, "trainer.max_epochs=2", "schedule.total_epochs=2")
        run(tmp_path / "resumed", ade, "trainer.max_epochs=1", "schedule.total_epochs=2")
        again = run(tmp_path / "resumed", ade, "trainer.max_epochs=2", "schedule.total_epochs=2", "resume=auto")
    finally:
        torch.set_num_threads(threads)
    assert again["steps"] == straight["steps"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert again["final"]["val/miou"] == pytest.approx(straight["final"]["val/miou"], abs=1e-6)


def test_eval_scores_a_checkpoint_on_the_test_split(tmp_path, ade):
    trained = run(tmp_path / "run", ade)
    cfg = compose_cfg(tmp_path / "eval", *TINY_SEG, "decoder.d_model=32", "decoder.n_heads=2", f"data.root={ade}",
                      "mode=eval",
                      f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}")
    result = evaluate(cfg)
    assert result["test"]["test/miou"] == pytest.approx(trained["test"]["test/miou"], abs=1e-6)


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_label_outside_the_classes_fails_or_is_skipped_and_counted(tmp_path, policy):
    # in the validation folder: every one of its images is read (training reads whole batches only)
    root = make_ade(tmp_path / "ade", bad={"validation_003": 200, "validation_001": 77})
    overrides = [f"data.on_bad_mask={policy}", "data.val_split=0"]
    if policy == "fail":
        with pytest.raises(ConfigError, match=r"validation_001\.png has label 76, outside 0\.\.3"):
            run(tmp_path / "run", root, *overrides)
    else:
        result = run(tmp_path / "run", root, *overrides)
        assert result["bad_images"] == 2
        logged = (tmp_path / "run" / "bad_images.txt").read_text()
        assert "validation_003.png" in logged and "validation_001.png" in logged


def test_a_mask_of_another_size_is_refused(tmp_path):
    root = make_ade(tmp_path / "ade")
    Image.fromarray(np.ones((20, 20), np.uint8), mode="L").save(root / "annotations" / "validation" /
                                                                  "validation_002.png")
    with pytest.raises(ConfigError, match=r"validation_002\.png is 20x20 but its image"):
        run(tmp_path / "run", root, "data.on_bad_mask=fail", "data.val_split=0")


def tiny_preset(experiment: str, ade: Path) -> list[str]:
    """An ADE20K preset with the sizes shrunk to seconds on a CPU; every other flag as the preset sets it."""
    shrink = ["++model.embed_dim=32", "++model.depth=2", "++model.num_heads=2", "decoder.d_model=32",
              "decoder.n_heads=2"]
    sizes = {"segmenter_ade20k_vittm_b": ["model.img_size=64", "data.pipeline.crop_size=64",
                                          "data.pipeline.test.crop=64", "data.pipeline.test.stride=48"],
             "segmenter_ade20k_vittm_b_28": ["model.img_size=56", "data.pipeline.crop_size=56",
                                             "data.pipeline.test.crop=56", "data.pipeline.test.stride=48"],
             "segmenter_ade20k_vit_b": ["model.img_size=64", "data.pipeline.crop_size=64",
                                        "data.pipeline.test.crop=64", "data.pipeline.test.stride=48"]}
    return [f"experiment={experiment}", f"data.root={ade}", f"data.num_classes={CLASSES}", *shrink,
            *sizes[experiment], "data.batch_size=2", "data.num_workers=0", "data.pin_memory=false",
            "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "logger=none", "checkpoint.every_n_steps=0"]


@pytest.mark.parametrize("experiment", ["segmenter_ade20k_vittm_b", "segmenter_ade20k_vittm_b_28",
                                        "segmenter_ade20k_vit_b"])
def test_the_ade20k_presets_compose_and_train_a_few_steps(tmp_path, ade, experiment):
    preset = tiny_preset(experiment, ade)
    with pytest.raises(ConfigError, match=r"finetune\.from_ckpt=None: this preset starts from a classification"):
        train(compose_cfg(tmp_path / "refused", *preset))  # the protocol starts from a checkpoint
    cfg = compose_cfg(tmp_path / "run", *preset, "finetune.required=false")
    assert cfg.optimizer.opt == "sgd" and cfg.schedule.name == "poly" and cfg.task.name == "segmentation"
    assert cfg.data.pipeline.test.mode == "slide" and cfg.ema.enabled
    result = train(cfg)
    assert result["steps"] == 3 and "val/miou" in result["final"]


def test_the_preset_starts_from_a_classification_checkpoint(tmp_path, ade):
    """A classifier of the same backbone trained (briefly) here, then its weights as finetune.from_ckpt."""
    preset = tiny_preset("segmenter_ade20k_vittm_b", ade)
    from vittm.models import create_model

    classifier = create_model(name="vittm_base", embed_dim=32, depth=2, num_heads=2, img_size=64, memory_ps=16,
                              process_ps=32, num_classes=7, rw_head={"name": "lin", "latent_size_scale": 4})
    weights = tmp_path / "classifier.pth"
    torch.save(classifier.state_dict(), weights)
    cfg = compose_cfg(tmp_path / "run", *preset, f"finetune.from_ckpt={weights}", "trainer.max_steps=1",
                      "optimizer.lr=1e-9", "ema.enabled=false")
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    source = {f"net.backbone.{k}": v for k, v in classifier.state_dict().items()}
    shared = [k for k in state if k.startswith("net.backbone.layers.0.") and k in source]
    assert len(shared) > 10  # lr ~0: still the loaded weights
    assert all(torch.allclose(state[k], source[k], atol=1e-6) for k in shared)
