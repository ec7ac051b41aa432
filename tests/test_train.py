"""Training and evaluation through the real config tree, in-process (fast) and through run.py (as a user)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, compose_cfg, make_image_folder, make_imagenet
from safetensors.torch import load_file

from vittm.tasks.classification import ClassificationModule
from vittm.tasks.run import evaluate, train
from vittm.training.validate import ConfigError


def weights(ckpt_path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]


def test_train_checkpoints_metrics_reload_and_eval(tmp_path):
    run = tmp_path / "run"
    result = train(compose_cfg(run, *TINY))
    ckpts = run / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} >= {"last.ckpt", "best.ckpt", "best_ema.ckpt", "ema_weights.safetensors"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    keys = ("val/memory_acc1", "val/memory_acc5", "val/process_acc1", "val_ema/memory_acc1", "val_ema/process_acc5")
    for key in keys:
        assert 0 <= metrics["final"][key] <= 1, key
    assert metrics["steps"] == 512 // 64 and metrics["train_images_per_s"] > 0 and metrics["params"] > 0
    heads = {f"{split}/{head}acc1" for split in ("val", "val_ema") for head in ("", "memory_", "process_")}
    assert set(metrics["best"]) == heads  # both heads and model(x), live and EMA
    assert all(metrics["best"][k] >= metrics["final"][k] for k in heads)  # one epoch: best == final

    # nothing else needed
    module = ClassificationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    exported = load_file(ckpts / "ema_weights.safetensors")
    for key, value in module.ema.module.state_dict().items():
        torch.testing.assert_close(exported[key], value)

    evaluated = evaluate(compose_cfg(tmp_path / "eval", *TINY, "mode=eval", "eval_split=val",
                                     f"ckpt_path={ckpts / 'last.ckpt'}"))
    for key in ("val/memory_acc1", "val/process_acc5", "val_ema/memory_acc1", "val_ema/process_acc1"):
        assert evaluated["final"][key] == pytest.approx(metrics["final"][key], abs=1e-6), key
    assert evaluated["eval_compile"] is False  # auto: eager on CPU (CUDA graphs on a GPU)


def test_cuda_graph_calls_copy_their_outputs_out():
    """Under reduce-overhead every call starts a new CUDA-graph step and copies its outputs out, so the live and EMA
    logits of one validation batch are separate tensors (checked here on the eager callables, on CPU)."""
    module = ClassificationModule(
        model=dict(name="vittm_test", num_classes=10), optimizer=dict(opt="adamw", lr=1e-3),
        schedule=dict(name="cosine", warmup_steps=1), loss=dict(name="ce"), ema=dict(enabled=True, decay=0.9),
    ).eval()
    module.cuda_graphs = True
    x = torch.randn(2, 3, 32, 32)
    raw = module.net.forward_both(x)
    live, ema = module.outputs(x), module.outputs(x, ema=True)
    for head, logits in live.items():
        assert logits.data_ptr() != ema[head].data_ptr()
    torch.testing.assert_close(live["memory"], raw[0])


def test_resume_continues_exactly(tmp_path):
    small = [*TINY, "data.train_subset=256", "ema.decay=0.9"]
    train(compose_cfg(tmp_path / "straight", *small, "trainer.max_epochs=2"))
    train(compose_cfg(tmp_path / "first", *small, "trainer.max_epochs=1", "schedule.total_epochs=2"))
    resumed = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_cfg(tmp_path / "second", *small, "trainer.max_epochs=2", f"ckpt_path={resumed}"))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():  # live weights and EMA
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert a["optimizer_states"][0]["state"][0]["exp_avg"].equal(b["optimizer_states"][0]["state"][0]["exp_avg"])


def test_finetune_from_pretrained_with_new_classes_and_freezing(tmp_path):
    pre = tmp_path / "pre"
    train(compose_cfg(pre, *TINY))  # 10 Fashion-MNIST classes
    folder = make_image_folder(tmp_path / "folder", ("train", "val"), ["a", "b", "c"], per_class=8)
    cfg = compose_cfg(
        tmp_path / "ft", *TINY, "data=imagefolder", f"data.root={folder}", "data.in_chans=1", "data.mean=[0.5]",
        "data.std=[0.5]", "model.img_size=28", "data.batch_size=8", "data.num_workers=0", "augment=imagenet",
        f"finetune.from_ckpt={pre / 'checkpoints' / 'last.ckpt'}", "finetune.freeze=peft",
    )
    result = train(cfg)
    assert result["num_classes"] == 3
    module = ClassificationModule.load_from_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert module.net.head.out_features == 3
    pre_ema = weights(pre / "checkpoints" / "last.ckpt")
    tuned = module.net.state_dict()
    # frozen by peft: the ViT blocks and patch embeddings stay at the pre-trained EMA values
    fc1 = "layers.0.block.mlp.fc1.weight"
    torch.testing.assert_close(tuned[fc1], pre_ema[f"ema.module.{fc1}"])
    torch.testing.assert_close(tuned["memory_embed.weight"], pre_ema["ema.module.memory_embed.weight"])
    assert not torch.equal(tuned["layers.0.read.q.weight"], pre_ema["ema.module.layers.0.read.q.weight"])
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert "layers.1.write.kv.weight" in trainable and "layers.1.read_norm.weight" in trainable
    assert "layers.1.block.attn.qkv.weight" not in trainable and "memory_embed.weight" not in trainable


@pytest.mark.parametrize(
    ("mode", "trains", "frozen"),
    [("embeddings", "layers.0.block.attn.qkv.weight", "memory_pos_embed"),
     ("head_only", "process_head.weight", "layers.0.read.q.weight"),
     ("peft", "memory_pos_embed", "process_embed.proj.weight")],
)
def test_freeze_modes(mode, trains, frozen):
    module = ClassificationModule(
        model=dict(name="vittm_test", num_classes=4), optimizer=dict(opt="adamw", lr=1e-3),
        schedule=dict(name="cosine", warmup_steps=0), loss=dict(name="ce"), freeze=mode,
    )
    params = dict(module.net.named_parameters())
    assert params[trains].requires_grad and not params[frozen].requires_grad


@pytest.mark.parametrize(
    "preset", ["pretrain_in21kp_vittm_s", "pretrain_in21kp_vittm_b", "finetune_in1k_vittm_s", "finetune_in1k_vittm_b"]
)
def test_experiment_presets_run_a_few_steps(tmp_path, preset):
    if preset.startswith("pretrain"):
        root = make_image_folder(tmp_path / "in21kp", ("imagenet21k_train", "imagenet21k_val"), ["n01", "n02", "n03"])
    else:
        root = make_imagenet(tmp_path / "imagenet")
    # tiny: 2 of the 12 layers, 56 px (2x2 patches of 28), 2 steps; bf16 autocast kept for one preset (slow on CPU)
    precision = [] if preset == "pretrain_in21kp_vittm_s" else ["trainer.precision=32"]
    cfg = compose_cfg(
        tmp_path / "run", f"experiment={preset}", *precision, "+model.depth=2", f"data.root={root}",
        "data.num_classes=3", "model.img_size=56",
        "data.batch_size=4", "data.num_workers=0", "effective_batch=null", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto", "trainer.max_epochs=1",
        "data.train_subset=8", "data.val_subset=4", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "logger=none", "checkpoint.save=false",  # a 2-layer ViTTM-B checkpoint is 340 MB: keep CI's disk free
    )
    result = train(cfg)
    assert result["steps"] == 2 and result["num_classes"] == 3
    assert 0 <= result["final"]["val/memory_acc1"] <= 1


def test_bad_values_raise_one_line_each_before_training(tmp_path):
    cfg = compose_cfg(tmp_path, *TINY, "optimizer.lr=0", "data.batch_size=0", "trainer.max_epochs=0",
                      "augment.randaugment={ops: 2, magnitude: 40}", "ema.decay=1.5")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    lines = str(err.value).splitlines()
    assert lines == [
        "optimizer.lr=0: must be a number > 0",
        "data.batch_size=0: must be an integer > 0",
        "trainer.max_epochs=0: must be an integer > 0 (or set trainer.max_steps)",
        "augment.randaugment.magnitude=40: an integer in [0, 30] (torchvision's 31 bins)",
        "ema.decay=1.5: must be in (0, 1)",
    ]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()


def test_data_root_and_class_count_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.root='/no/such/dir' does not exist"):
        train(compose_cfg(tmp_path / "a", *TINY, "data.root=/no/such/dir"))
    run = tmp_path / "b"
    train(compose_cfg(run, *TINY))
    folder = make_image_folder(tmp_path / "folder", ("train", "val"), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="trained for 10 classes but data 'imagefolder' has 3"):
        evaluate(compose_cfg(tmp_path / "c", *TINY, "mode=eval", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                             "data=imagefolder", f"data.root={folder}", "data.in_chans=1", "data.mean=[0.5]",
                             "data.std=[0.5]"))
    with pytest.raises(ConfigError, match="data.num_classes=5 but imagefolder"):
        train(compose_cfg(tmp_path / "d", *TINY, "data=imagefolder", f"data.root={folder}", "data.num_classes=5"))


def test_existing_outputs_are_never_overwritten(tmp_path):
    train(compose_cfg(tmp_path, *TINY))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(compose_cfg(tmp_path, *TINY))
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}


def test_mixup_cutmix_bce_and_gradient_accumulation(tmp_path):
    cfg = compose_cfg(tmp_path, *TINY, "augment.mixup=0.8", "augment.cutmix=1.0", "loss=bce", "loss.sum_classes=true",
                      "trainer.accumulate_grad_batches=2", "log_grad_norm=true", "logger=csv")
    result = train(cfg)
    assert result["steps"] == 512 // 64 // 2  # optimizer steps, not batches
    rows = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/grad_norm" in rows and "train/memory_loss" in rows


SPEC_RECIPES = {  # SPEC §9, flag for flag
    "pretrain_in21kp_vittm_s": dict(model="vittm_small", data="in21kp", classes=10450, epochs=300, warmup=10000,
                                    batch=4096, lr=1.5e-4, warmup_lr=1e-6, min_lr=1e-7, wd=0.03, ra=(2, 15),
                                    mixup=0.5, cutmix=0.0, erasing=0.0, loss="ce", drop_path=0.0),
    "pretrain_in21kp_vittm_b": dict(model="vittm_base", data="in21kp", classes=10450, epochs=300, warmup=10000,
                                    batch=4096, lr=1.5e-4, warmup_lr=1e-6, min_lr=1e-7, wd=0.03, ra=(2, 15),
                                    mixup=0.5, cutmix=0.0, erasing=0.0, loss="ce", drop_path=0.0),
    "finetune_in1k_vittm_s": dict(model="vittm_small", data="imagenet", classes=1000, epochs=300, warmup=3000,
                                  batch=4096, lr=1.75e-4, warmup_lr=1e-6, min_lr=1e-6, wd=0.03, ra=(2, 15),
                                  mixup=0.5, cutmix=0.5, erasing=0.25, loss="bce", drop_path=0.1),
    "finetune_in1k_vittm_b": dict(model="vittm_base", data="imagenet", classes=1000, epochs=300, warmup=3000,
                                  batch=2048, lr=2.5e-5, warmup_lr=1e-6, min_lr=1e-7, wd=0.1, ra=(3, 20),
                                  mixup=0.8, cutmix=0.8, erasing=0.25, loss="bce", drop_path=0.2),
}


@pytest.mark.parametrize("preset", sorted(SPEC_RECIPES))
def test_presets_are_the_published_recipes(tmp_path, preset):
    r, cfg = SPEC_RECIPES[preset], compose_cfg(tmp_path, f"experiment={preset}")
    t = cfg.trainer
    assert (cfg.model.name, cfg.data.dataset, cfg.data.num_classes) == (r["model"], r["data"], r["classes"])
    assert (cfg.model.memory_ps, cfg.model.process_ps, cfg.model.img_size) == (28, 28, 224)
    assert (cfg.rw_head.name, cfg.rw_head.latent_size_scale, cfg.fusion.name) == ("lin", 4, "residual")
    assert (t.max_epochs, cfg.schedule.name, cfg.schedule.warmup_steps) == (r["epochs"], "cosine", r["warmup"])
    effective = cfg.data.batch_size * t.accumulate_grad_batches * t.devices * t.num_nodes
    assert effective == r["batch"] == cfg.effective_batch
    assert (t.devices, t.num_nodes, t.precision, t.gradient_clip_val) == (2, 2, "bf16-mixed", 1.0)
    assert (cfg.optimizer.opt, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", r["lr"], r["wd"])
    assert (cfg.schedule.warmup_lr, cfg.schedule.min_lr) == (r["warmup_lr"], r["min_lr"])
    a = cfg.augment
    assert (a.rrc_scale, a.hflip, a.randaugment.ops, a.randaugment.magnitude) == ([0.08, 1.0], 0.5, *r["ra"])
    assert (a.mixup, a.cutmix, a.random_erasing) == (r["mixup"], r["cutmix"], r["erasing"])
    assert (cfg.loss.name, cfg.loss.label_smoothing) == (r["loss"], 0.0)
    assert cfg.loss.get("sum_classes", False) == (r["loss"] == "bce")
    assert (cfg.model.drop_path_rate, cfg.ema.enabled, cfg.ema.decay) == (r["drop_path"], True, 0.999)
    assert (cfg.data.crop_pct, cfg.data.mean) == (0.875, [0.485, 0.456, 0.406])


@pytest.mark.parametrize(
    "overrides",
    [["model=vittm_base", "rw_head=lin"],
     ["model=vittm_small", "model.memory_ps=16", "model.process_ps=32", "rw_head=ca", "fusion=add_erase"],
     ["model=vit_small"]],
    ids=["vittm_base-lin", "vittm_small-16-32-ca-add_erase", "vit_small-baseline"],
)
def test_documented_commands_train(tmp_path, overrides):
    """The README's commands, on 4 Fashion-MNIST images (resized to 224) for one step each."""
    result = train(compose_cfg(tmp_path, *overrides, "data.train_subset=4", "data.val_subset=2", "data.test_subset=2",
                               "data.batch_size=2",
                               "trainer.max_steps=1", "trainer.num_sanity_val_steps=0", "logger=none",
                               "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
                               "checkpoint.save=false"))  # a base-size checkpoint is ~2 GB
    assert result["steps"] == 1 and result["macs"] > 1e9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_cuda_graphs_with_ema_accumulation_and_ddp(tmp_path):
    """compile=reduce-overhead with EMA validation, gradient accumulation, bf16-mixed and DDP (one process): the
    live and EMA graphs each replay, and their logits do not overwrite each other (EMA equals live at decay 0)."""
    overrides = [*TINY, "trainer=gpu", "compile=reduce-overhead", "trainer.accumulate_grad_batches=2",
                 "trainer.strategy=ddp", "trainer.devices=1", "ema.decay=0.0", "trainer.max_epochs=2"]
    result = train(compose_cfg(tmp_path / "run", *overrides))
    assert result["steps"] == 8
    for head in ("memory", "process"):  # decay 0: the EMA copy is the live model after the last update
        assert result["final"][f"val_ema/{head}_acc1"] == pytest.approx(result["final"][f"val/{head}_acc1"])
    evaluated = evaluate(compose_cfg(tmp_path / "eval", *TINY, "trainer=gpu", "mode=eval", "eval_split=val",
                                     f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"))
    assert evaluated["eval_compile"] == "reduce-overhead"  # auto on a GPU
    assert evaluated["final"]["val/memory_acc1"] == pytest.approx(result["final"]["val/memory_acc1"], abs=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_bf16_training_with_cuda_graphs(tmp_path):
    """trainer=gpu (bf16-mixed) with compile=reduce-overhead: CUDA graphs replayed in training and validation."""
    result = train(compose_cfg(tmp_path, *TINY, "trainer=gpu", "compile=reduce-overhead", "trainer.max_epochs=3"))
    assert result["steps"] == 24
    assert result["final"]["val/memory_acc1"] > 0.2 and result["final"]["val/process_acc1"] > 0.2  # chance: 0.1
