"""The authors' checkpoints (tests/data/authors: small models made with their own code, see its README) load exactly
through every public path and reproduce the authors' logits; files that do not fit are refused with one line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import vittm  # noqa: F401  (registers the models)
from vittm.core.errors import ConfigError
from vittm.core.files import CheckpointError
from vittm.models import WeightsError, load_weights, read_state_dict
from vittm.models.convert import convert
from vittm.models.convert import main as convert_main
from vittm.tasks.classification import ClassificationModule

DATA = Path(__file__).parent / "data" / "authors"
FILES = sorted(p.name for p in DATA.glob("*.pt"))


def fixture(name: str) -> dict:
    return torch.load(DATA / name, weights_only=True)


def our_kwargs(config: dict) -> dict:
    """The authors' constructor arguments (their names) -> ours, for vittm_base (their factory "base")."""
    rw = {"name": config["rw_head_type"]}
    if "latent_size_scale" in config:
        rw["latent_size_scale"] = config["latent_size_scale"]
    return dict(
        embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
        img_size=tuple(config["img_size"]), num_classes=config["num_classes"], memory_ps=config["memory_ps"],
        process_ps=config["process_ps"], rw_head=rw, fusion=config["fusion_type"],
        process_embed=config["process_embedder_type"], memory_block=config["memory_blocks"] or "none",
    )


def check_logits(model: torch.nn.Module, data: dict) -> None:
    model.eval()
    with torch.no_grad():
        memory, process = model.forward_both(data["input"])
    torch.testing.assert_close(memory, data["memory_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(process, data["process_logits"], rtol=0, atol=1e-5)
    model.double()
    with torch.no_grad():
        memory, process = model.forward_both(data["input"].double())
    torch.testing.assert_close(memory, data["memory_logits_fp64"], rtol=0, atol=1e-12)
    torch.testing.assert_close(process, data["process_logits_fp64"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FILES)
def test_timm_pretrained_file_reproduces_the_authors_logits(name):
    data = fixture(name)
    model = timm.create_model("vittm_base", pretrained=True, pretrained_cfg_overlay=dict(file=str(DATA / name)),
                              **our_kwargs(data["config"]))
    check_logits(model, data)


@pytest.mark.parametrize("name", FILES)
def test_converted_file_reproduces_the_authors_logits(name, tmp_path):
    data = fixture(name)
    out = tmp_path / "converted.safetensors"
    lines = convert(DATA / name, out)
    assert any(line.startswith("dropped 2: the ViT class token and position table") for line in lines), lines
    converted = load_file(str(out))
    assert not any(k.startswith(("cls_token", "pos_embed", "patch_embed", "module.")) for k in converted)
    model = timm.create_model("vittm_base", **our_kwargs(data["config"]))
    report = load_weights(model, out)
    assert report.fmt == "vittm" and report.heads == "both heads kept (10 classes)"
    check_logits(model, data)


@pytest.mark.parametrize("name", ["lin_residual_ema.pt", "lin_add_erase.pt", "lin_residual_mlp.pt"])
def test_finetune_start_keeps_the_authors_weights(name):
    data = fixture(name)
    model = {"name": "vittm_base", **our_kwargs(data["config"])}
    module = ClassificationModule(model=model, optimizer=dict(opt="adamw", lr=1e-3),
                         schedule=dict(name="cosine", warmup_steps=0), loss=dict(name="ce"))
    report = module.load_pretrained(str(DATA / name))
    assert report.fmt == "authors" and "both heads kept" in report.heads
    check_logits(module.net, data)
    for key, value in module.ema.module.state_dict().items():  # the EMA restarts from the loaded weights
        torch.testing.assert_close(value.double(), module.net.state_dict()[key].double(), msg=key)


def test_published_format_is_unwrapped_and_dead_tensors_counted():
    weights = read_state_dict(DATA / "lin_residual_ema.pt")
    assert weights.fmt == "authors"
    assert weights.notes == ["the file's 'state_dict' entry", "DDP / AveragedModel prefix 'module.' removed",
                             "torch.compile prefix '_orig_mod.' removed"]
    assert weights.dropped == {"AveragedModel update count": ["n_averaged"]}
    model = timm.create_model("vittm_base", **our_kwargs(fixture("lin_residual_ema.pt")["config"]))
    report = load_weights(model, DATA / "lin_residual_ema.pt")
    dropped = {why: len(keys) for why, keys in report.dropped.items()}
    assert dropped == {
        "AveragedModel update count": 1,
        "the ViT class token and position table their ViTTM inherits and never uses": 2,
        "the ViT patch embedding their ViTTM inherits and never uses": 2,
        "the lin heads' output projection, built and never used (SPEC §4)": 8,  # 2 layers x read/write x w/b
    }
    assert len(report.loaded) == len(model.state_dict())  # every tensor of the model came from the file


def test_shared_patch_embed_and_shared_gate():
    report = load_weights(timm.create_model("vittm_base", **our_kwargs(fixture("lin_residual_ps16.pt")["config"])),
                          DATA / "lin_residual_ps16.pt")
    assert report.dropped["the same tensors as memory_embedder.proj.* (memory_ps 16: one module, two names)"] == [
        "patch_embed.proj.weight", "patch_embed.proj.bias"]
    model = timm.create_model("vittm_base", **our_kwargs(fixture("lin_add_erase.pt")["config"]))
    report = load_weights(model, DATA / "lin_add_erase.pt")
    assert "their one read add_erase gate copied into each of the 2 layers" in report.notes
    torch.testing.assert_close(model.layers[0].write_fuse.gate.weight, model.layers[1].write_fuse.gate.weight)


def test_heads_kept_or_replaced_each_with_its_message(caplog):
    config = fixture("lin_residual.pt")["config"]
    path = str(DATA / "lin_residual.pt")
    with caplog.at_level(logging.INFO, logger="vittm.models.loading"):
        same = timm.create_model("vittm_base", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                 **our_kwargs(config))
    assert "both heads kept (10 classes)" in caplog.text and same.head.weight.abs().sum() > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vittm.models.loading"):
        other = timm.create_model("vittm_base", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                  **{**our_kwargs(config), "num_classes": 5})
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "both heads replaced by fresh zero heads for 5 classes (the file's are for 10 classes)" in record.message
    assert other.head.weight.shape == (5, 48) and not other.head.weight.any() and not other.process_head.weight.any()
    torch.testing.assert_close(other.layers[1].read.kv.weight, same.layers[1].read.kv.weight)  # the rest loaded


def test_files_that_do_not_fit_are_refused(tmp_path):
    config = our_kwargs(fixture("lin_residual.pt")["config"])

    def create(path, **extra):
        return timm.create_model("vittm_base", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 **{**config, **extra})

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((DATA / "lin_residual.pt").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint, truncated or corrupt"):
        create(truncated)
    foreign = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), foreign)
    with pytest.raises(WeightsError, match=r"not a ViTTM state dict .* it holds e.g. \['bn1.bias'"):
        create(foreign)
    partial = dict(fixture("lin_residual.pt")["state_dict"])
    del partial["blocks.1.mlp.fc2.weight"], partial["write_norm.0.bias"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"the file lacks \['layers.0.write_norm.bias', "
                                           r"'layers.1.block.mlp.fc2.weight'\]; nothing was loaded"):
        create(tmp_path / "partial.pth")
    odd = {**fixture("lin_residual.pt")["state_dict"], "norm.weight": torch.ones(48)}
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"1 keys fit nothing in a ViTTM: \['norm.weight'\]"):
        create(tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"shapes differ \['layers.0.read.q.weight: \(12, 48\) in the file, "
                                           r"\(24, 48\) in the model'"):
        create(DATA / "lin_residual.pt", rw_head={"name": "lin", "latent_size_scale": 2})
    with pytest.raises(WeightsError, match=r"\(ViTTM with D 48, .*, ca or lca read heads with q width 48, 10 classes; "
                                           r"the file: D 48, .*, lin read heads with q width 12, 10 classes\)"):
        load_weights(timm.create_model("vittm_base", **{**config, "rw_head": "ca"}), DATA / "lin_residual.pt")


def test_convert_command_refuses_to_overwrite(tmp_path, capsys):
    src = tmp_path / "published_ema.pth"
    shutil.copy(DATA / "lin_residual_ema.pt", src)
    dst = tmp_path / "vittm.safetensors"
    convert_main([str(src), str(dst)])
    out = capsys.readouterr().out
    assert "the authors' (EfficientTTMs) key names; the file's 'state_dict' entry; DDP / AveragedModel prefix" in out
    assert "wrote" in out and ("(D 48, 2 layers, memory_ps 8, 3 input channels, process_ps 16, lin read heads with q "
                               "width 12, 10 classes)") in out
    assert "dropped 8: the lin heads' output projection" in out
    before = dst.read_bytes()
    with pytest.raises(SystemExit) as stop:
        convert_main([str(src), str(dst)])
    assert stop.value.code == 2 and dst.read_bytes() == before
    assert f"error: DST='{dst}': exists; choose another name or pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main([str(src), str(tmp_path / "out.pth")])
    assert "must end in .safetensors" in capsys.readouterr().err


# The fixtures' model on top of the default (Fashion-MNIST) model config: D 48, 2 layers, 3 heads, 64 px, 8/16.
AUTHORS_MODEL = ["model.name=vittm_base", "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
                 "model.mlp_ratio=4.0", "model.img_size=64", "model.memory_ps=8", "model.process_ps=16"]


def test_run_eval_and_finetune_take_the_authors_files(tmp_path, capsys):
    from helpers import compose_cfg, make_image_folder

    from vittm.tasks.run import evaluate, train

    folder = make_image_folder(tmp_path / "folder", ("train", "val"), [f"c{i}" for i in range(10)], per_class=2)
    common = [*AUTHORS_MODEL, "data=imagefolder", f"data.root={folder}", "data.batch_size=4", "data.num_workers=0",
              "logger=none", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0"]
    result = evaluate(compose_cfg(tmp_path / "eval", "mode=eval", f"ckpt_path={DATA / 'lin_residual_ema.pt'}",
                                  *common))
    err = capsys.readouterr().err
    assert "ckpt_path: loaded" in err and "DDP / AveragedModel prefix 'module.' removed" in err
    assert "both heads kept (10 classes)" in err
    assert 0 <= result["test"]["test/memory_acc1"] <= 1 and not any(k.startswith("test_ema") for k in result["test"])
    with pytest.raises(ConfigError, match=r"ckpt_path='.*lin_residual.pt': does not fit this model .* ca or lca"):
        evaluate(compose_cfg(tmp_path / "eval2", "mode=eval", f"ckpt_path={DATA / 'lin_residual.pt'}", *common,
                             "rw_head=ca"))
    five = make_image_folder(tmp_path / "five", ("train", "val"), [f"c{i}" for i in range(5)], per_class=2)
    with pytest.raises(ConfigError, match=r"its heads are for 10 classes but the model has 5; to start from it"):
        evaluate(compose_cfg(tmp_path / "eval3", "mode=eval", f"ckpt_path={DATA / 'lin_residual.pt'}", *common,
                             f"data.root={five}"))
    with pytest.raises(ConfigError, match=r"resume='.*lin_residual.pt': a weights file, not a training checkpoint .*"
                                          r"to start from its weights use finetune.from_ckpt="):
        train(compose_cfg(tmp_path / "resume", f"resume={DATA / 'lin_residual.pt'}", *common))
    result = train(compose_cfg(tmp_path / "ft", f"finetune.from_ckpt={DATA / 'lin_residual.pt'}", *common,
                               "trainer.max_epochs=1", "checkpoint.save=false", "schedule.warmup_steps=1"))
    assert "finetune.from_ckpt: loaded" in capsys.readouterr().err and result["steps"] > 0


def test_a_lightning_checkpoint_of_the_authors_gives_its_ema_weights(tmp_path):
    """Their train_lt.py saves Model(model) with an AveragedModel of the (compiled) model beside it."""
    data = fixture("lin_residual.pt")
    live = {f"model._orig_mod.{k}": torch.zeros_like(v) for k, v in data["state_dict"].items()}
    ema = {f"ema_model.module._orig_mod.{k}": v for k, v in data["state_dict"].items()}
    path = tmp_path / "epoch=299.ckpt"
    torch.save({"state_dict": {**live, **ema, "ema_model.n_averaged": torch.tensor(5)}, "epoch": 299}, path)
    model = timm.create_model("vittm_base", **our_kwargs(data["config"]))
    report = load_weights(model, path)
    assert "its EMA weights (ema_model.module.*), leaving out 84 other tensors" in report.notes
    assert report.dropped["tensors beside the EMA weights"][0].startswith("model._orig_mod.")
    check_logits(model, data)
