"""Starting a ViTTM from a local timm ViT state-dict file (no network is ever tried)."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import vittm  # noqa: F401
from vittm.core.files import CheckpointError
from vittm.models import WeightsError, load_weights

# A ViT with vittm_test's widths (D 32, 2 blocks, 2 heads, MLP ratio 2) and 16x16 patches on 32x32 images.
VIT_ARGS = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32, num_classes=10)


@pytest.fixture
def vit_file(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", **VIT_ARGS)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    return vit.state_dict(), path


def check_transferred(model, vit_sd, fresh):
    for key, value in vit_sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            torch.testing.assert_close(model.state_dict()[f"layers.{i}.block.{rest}"], value)
    kernel = vit_sd["patch_embed.proj.weight"]
    torch.testing.assert_close(model.memory_embed.weight, resample_patch_embed(kernel, [4, 4]))
    torch.testing.assert_close(model.process_embed.proj.weight, resample_patch_embed(kernel, [8, 8]))
    pos = vit_sd["pos_embed"]  # (1, 1 + 2*2, 32): a class token in front of a 2x2 grid
    expected = resample_abs_pos_embed(pos, [8, 8], old_size=(2, 2), num_prefix_tokens=1)[:, 1:]
    torch.testing.assert_close(model.memory_pos_embed, expected)
    torch.testing.assert_close(model.process_norm.weight, vit_sd["norm.weight"])
    # everything the ViT has no counterpart for keeps its fresh initialisation
    for key, value in fresh.state_dict().items():
        if ".read." in key or ".write." in key or "_norm" in key and key.startswith("layers"):
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert not model.head.weight.any() and not model.process_head.weight.any()


def test_timm_pretrained_file_overlay(vit_file):
    vit_sd, path = vit_file
    torch.manual_seed(5)
    fresh = timm.create_model("vittm_test", num_classes=10)
    torch.manual_seed(5)
    model = timm.create_model(
        "vittm_test", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    check_transferred(model, vit_sd, fresh)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_load_vit_checkpoint_safetensors(vit_file, tmp_path):
    vit_sd, _ = vit_file
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit_sd.items()}, str(path))
    torch.manual_seed(5)
    fresh = timm.create_model("vittm_test", num_classes=10)
    torch.manual_seed(5)
    model = timm.create_model("vittm_test", num_classes=10)
    report = load_weights(model, path)
    loaded = report.loaded
    assert report.fmt == "timm-vit" and "start fresh" in report.heads
    assert "memory_embed.weight" in loaded and "layers.1.block.mlp.fc2.weight" in loaded
    assert not any(".read." in k or ".write." in k for k in loaded)
    check_transferred(model, vit_sd, fresh)


def test_channel_adaption_and_other_embedders(vit_file):
    _, path = vit_file
    gray = timm.create_model("vittm_test", in_chans=1, process_embed="latent", num_classes=10)
    load_weights(gray, path)
    assert gray.memory_embed.weight.shape == (32, 1, 4, 4)
    assert torch.isfinite(gray(torch.randn(2, 1, 32, 32))).all()


def test_mismatched_or_missing_checkpoints(vit_file, tmp_path):
    _, path = vit_file
    with pytest.raises(ValueError, match="ViT checkpoint has 2 blocks of width 32 but the ViTTM has 3 layers"):
        load_weights(timm.create_model("vittm_test", depth=3), path)
    with pytest.raises(CheckpointError, match="nope.pth': file does not exist"):
        load_weights(timm.create_model("vittm_test"), tmp_path / "nope.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"not a ViTTM state dict .* nor a timm ViT's .* it holds e.g. \['foo'\]"):
        load_weights(timm.create_model("vittm_test"), tmp_path / "other.pth")


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refused: loading it would run code \(print\)"):
        load_weights(timm.create_model("vittm_test"), path)


def test_no_network_without_a_file():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="No pretrained weights exist for vittm_base"):
        timm.create_model("vittm_base", pretrained=True)
    assert time.perf_counter() - start < 10


def test_a_baseline_takes_its_own_layout(vit_file):
    vit_sd, path = vit_file
    same = timm.create_model("vit_tiny_patch16_224", **VIT_ARGS)
    assert load_weights(same, path).heads == "the head kept (10 classes)"
    torch.testing.assert_close(same.state_dict()["blocks.1.mlp.fc2.weight"], vit_sd["blocks.1.mlp.fc2.weight"])
    other = timm.create_model("vit_tiny_patch16_224", **{**VIT_ARGS, "num_classes": 3})
    report = load_weights(other, path)
    assert report.heads == "the head replaced by a fresh head for 3 classes (the file's are for 10 classes)"
    with pytest.raises(WeightsError, match=r"does not fit this model \(VisionTransformer .* shapes differ"):
        load_weights(timm.create_model("vit_tiny_patch16_224", **{**VIT_ARGS, "embed_dim": 64}), path)
