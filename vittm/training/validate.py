"""Every user-facing value checked before any data is read or anything is trained.

``validate(cfg)`` collects all problems and raises one ``ConfigError`` with a line per problem, each naming the key,
the value and what is allowed. ``run.py`` prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vittm.core.errors import ConfigError
from vittm.data.bad_images import POLICIES
from vittm.models import create_model
from vittm.training.checkpoints import load_checkpoint
from vittm.training.model_checks import build_problem, interpolation_sources, model_config_problems
from vittm.training.module import COMPILE_MODES, NONFINITE, is_compile_setting

TASKS = ("classification", "segmentation")
DECODERS = ("segmenter", "linear")  # vittm.tasks.segmentation.decoders (checked there too, with their keys)

OPTIMIZERS = ("adamw", "sgd", "lamb")
SCHEDULES = ("cosine", "poly")
LOSSES = ("ce", "bce")
FREEZE = ("none", "embeddings", "head_only", "peft")
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64", "64-true")
EXPORT_FORMATS = ("safetensors", "pth")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    problems: list[str] = []

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r}: {rule}")

    need(cfg.mode in ("train", "eval", "summary"), "mode", cfg.mode, "choose train, eval or summary")
    task = (cfg.get("task") or {}).get("name", "classification")
    need(task in TASKS, "task.name", task, f"choose one of {list(TASKS)}")
    if cfg.finetune.get("required") and not cfg.finetune.from_ckpt and cfg.mode == "train" and not cfg.ckpt_path \
            and not cfg.get("resume"):
        problems.append("finetune.from_ckpt=None: this preset starts from a classification checkpoint; set "
                        "finetune.from_ckpt=<weights file> (ours, the authors', a timm ViT's), or "
                        "finetune.required=false to train from scratch (not the published protocol)")
    if task == "segmentation":
        problems += segmentation_problems(cfg)
    need(_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "must be an integer >= 0")
    if cfg.mode == "eval":
        need(bool(cfg.ckpt_path), "ckpt_path", cfg.ckpt_path, "mode=eval needs the checkpoint to evaluate")
    resume = cfg.get("resume")
    for key in ("ckpt_path", "finetune.from_ckpt", "resume"):
        path = OmegaConf.select(cfg, key)
        if path != "auto" or key != "resume":
            need(not path or Path(str(path)).is_file(), key, path,
                 "file does not exist" + (" (or use resume=auto: the newest checkpoint of the run directory)"
                                          if key == "resume" else ""))
    if cfg.mode == "train":
        need(not (resume and cfg.ckpt_path), "resume", resume, f"ckpt_path={cfg.ckpt_path!r} is set too; use one")
    need(cfg.nonfinite in NONFINITE, "nonfinite", cfg.nonfinite, f"choose one of {list(NONFINITE)}")
    need(is_compile_setting(cfg.compile), "compile", cfg.compile,
         f"true, false or a torch.compile mode: {list(COMPILE_MODES)}")
    eval_compile = cfg.get("eval_compile", "auto")
    need(is_compile_setting(eval_compile, auto=True), "eval_compile", eval_compile,
         f"auto, true, false or a torch.compile mode: {list(COMPILE_MODES)}")
    budget = cfg.get("cpu_budget_hours")
    need(budget is None or (_number(budget) and budget > 0), "cpu_budget_hours", budget,
         "a number of hours > 0, or null for no limit")
    need(cfg.get("eval_split", "test") in ("test", "val"), "eval_split", cfg.get("eval_split"),
         "choose test (the data's test split) or val (the held-out validation split)")
    need(isinstance(cfg.preemption.requeue, bool), "preemption.requeue", cfg.preemption.requeue, "true or false")
    ck = cfg.checkpoint
    need(_int(ck.every_n_steps) and ck.every_n_steps >= 0, "checkpoint.every_n_steps", ck.every_n_steps,
         "an integer >= 0 (0: only per epoch)")
    need(_int(ck.keep) and ck.keep >= 1, "checkpoint.keep", ck.keep, "an integer >= 1 (periodic checkpoints kept)")
    need(ck.export_format in EXPORT_FORMATS, "checkpoint.export_format", ck.export_format,
         f"choose one of {list(EXPORT_FORMATS)}")

    o = cfg.optimizer
    need(o.opt in OPTIMIZERS, "optimizer.opt", o.opt, f"choose one of {list(OPTIMIZERS)}")
    need(_number(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "must be a number > 0")
    need(_number(o.get("weight_decay", 0)) and o.get("weight_decay", 0) >= 0, "optimizer.weight_decay",
         o.get("weight_decay"), "must be a number >= 0")

    s = cfg.schedule
    need(s.name in SCHEDULES, "schedule.name", s.name, f"choose one of {list(SCHEDULES)}")
    need(_int(s.warmup_steps) and s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps,
         "must be an integer >= 0")
    planned = s.get("total_epochs")
    need(planned is None or (_int(planned) and planned > 0), "schedule.total_epochs", planned,
         "must be an integer > 0, or null for trainer.max_epochs")
    fraction = s.get("max_warmup_fraction", 1.0)
    need(_number(fraction) and 0 <= fraction <= 1, "schedule.max_warmup_fraction", fraction,
         "a share of the run's optimizer steps in [0, 1] (1: keep warmup_steps in any run)")
    for key in ("warmup_lr", "min_lr"):
        need(_number(s.get(key, 0)) and s.get(key, 0) >= 0, f"schedule.{key}", s.get(key), "must be a number >= 0")

    d = cfg.data
    need(_int(d.batch_size) and d.batch_size > 0, "data.batch_size", d.batch_size, "must be an integer > 0")
    need(_int(d.num_workers) and d.num_workers >= 0, "data.num_workers", d.num_workers, "must be an integer >= 0")
    if "on_bad_image" in d:
        need(d.on_bad_image in POLICIES, "data.on_bad_image", d.on_bad_image, f"choose one of {list(POLICIES)}")
    problems += model_problems(cfg)

    t = cfg.trainer
    epochs, steps = t.get("max_epochs"), t.get("max_steps", -1)
    if steps is None or steps == -1:
        need(_int(epochs) and epochs > 0, "trainer.max_epochs", epochs,
             "must be an integer > 0 (or set trainer.max_steps)")
    else:
        need(_int(steps) and steps > 0, "trainer.max_steps", steps, "must be an integer > 0, or -1 to use max_epochs")
    accumulate = t.get("accumulate_grad_batches", 1)
    need(_int(accumulate) and accumulate >= 1, "trainer.accumulate_grad_batches", accumulate, "must be an integer >= 1")
    need(str(t.get("precision", 32)) in PRECISIONS, "trainer.precision", t.get("precision"),
         f"choose one of {list(PRECISIONS)}")
    clip = t.get("gradient_clip_val")
    need(clip is None or (_number(clip) and clip >= 0), "trainer.gradient_clip_val", clip, "must be >= 0 or null")

    loss = cfg.loss
    need(loss.name in LOSSES, "loss.name", loss.name, f"choose one of {list(LOSSES)}")
    need(loss.get("heads", "all") in ("all", "memory", "process"), "loss.heads", loss.get("heads"),
         "choose all (both heads' losses, SPEC §3), memory or process")
    smooth = loss.get("label_smoothing", 0.0)
    need(_number(smooth) and 0 <= smooth < 1, "loss.label_smoothing", smooth, "must be in [0, 1)")

    a = cfg.augment
    for key in ("mixup", "cutmix"):
        need(_number(a.get(key, 0)) and a.get(key, 0) >= 0, f"augment.{key}", a.get(key), "alpha must be >= 0 (0: off)")
    for key in ("mix_prob", "random_erasing", "hflip"):
        value = a.get(key, 0)
        need(_number(value) and 0 <= value <= 1, f"augment.{key}", value, "a probability in [0, 1]")
    if a.get("randaugment"):
        ra = a.randaugment
        need(_int(ra.get("ops")) and ra.ops >= 1, "augment.randaugment.ops", ra.get("ops"), "an integer >= 1")
        need(_int(ra.get("magnitude")) and 0 <= ra.magnitude <= 30, "augment.randaugment.magnitude",
             ra.get("magnitude"), "an integer in [0, 30] (torchvision's 31 bins)")
    if a.get("rrc_scale"):
        lo, hi = a.rrc_scale
        need(0 < lo <= hi <= 1, "augment.rrc_scale", list(a.rrc_scale), "two numbers 0 < low <= high <= 1")
    if (a.get("mixup", 0) or a.get("cutmix", 0)) and _int(d.batch_size):
        need(d.batch_size % 2 == 0, "data.batch_size", d.batch_size, "mixup/cutmix need an even batch size")

    ema = cfg.ema
    if ema.enabled:
        need(_number(ema.decay) and 0 < ema.decay < 1, "ema.decay", ema.decay, "must be in (0, 1)")
        horizon = ema.get("max_horizon_fraction", 1.0)
        need(_number(horizon) and 0 < horizon <= 1, "ema.max_horizon_fraction", horizon,
             "a share of the run's optimizer steps in (0, 1] (1: keep ema.decay in any run)")
    need(cfg.finetune.freeze in FREEZE, "finetune.freeze", cfg.finetune.freeze, f"choose one of {list(FREEZE)}")

    effective = cfg.get("effective_batch")
    devices, nodes = t.get("devices", 1), t.get("num_nodes", 1)
    if effective and _int(devices) and _int(nodes) and _int(d.batch_size) and _int(accumulate):
        actual = d.batch_size * accumulate * devices * nodes
        need(actual == effective, "effective_batch", effective,
             f"data.batch_size x trainer.accumulate_grad_batches x trainer.devices x trainer.num_nodes = "
             f"{d.batch_size} x {accumulate} x {devices} x {nodes} = {actual}; make them agree "
             f"(or effective_batch=null)")

    if cfg.mode == "train":
        out = Path(cfg.output_dir)
        existing = sorted([*(out / "checkpoints").glob("*.ckpt"), *out.glob("hpc_ckpt_*.ckpt")])
        resumed = cfg.ckpt_path or (resume if resume != "auto" else None)
        here = (out.resolve(), (out / "checkpoints").resolve())
        resuming_here = resume == "auto" or (resumed and Path(resumed).resolve().parent in here)
        if existing and not resuming_here:
            problems.append(
                f"output_dir={str(cfg.output_dir)!r}: already holds checkpoints ({existing[0].name}, ...); continue "
                f"that run with resume=auto, or choose a new hydra.run.dir: nothing is overwritten"
            )

    _raise(problems)


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n".join(problems))


def segmentation_problems(cfg: DictConfig) -> list[str]:
    """task.name=segmentation: an ADE20K-layout dataset, a known decoder, a sane evaluation window. The pipeline's
    and the decoder's own keys are checked where they are built (vittm.data.seg_transforms, ...segmentation)."""
    problems = []
    d = cfg.data
    if d.dataset != "ade20k":
        problems.append(f"data.dataset={d.dataset!r}: task.name=segmentation reads the ADE20K layout; use data=ade20k "
                        f"(data.root=...) or data=fmnist_scenes")
        return problems
    name = cfg.decoder.get("name")
    if name not in DECODERS:
        problems.append(f"decoder.name={name!r}: choose one of {list(DECODERS)}")
    test = d.pipeline.get("test") or {}
    if test.get("mode") not in ("slide", "whole"):
        problems.append(f"data.pipeline.test.mode={test.get('mode')!r}: choose slide (windows) or whole (one forward)")
    elif test["mode"] == "slide":
        for key in ("crop", "stride"):
            value = test.get(key)
            if not (_int(value) and value > 0):
                problems.append(f"data.pipeline.test.{key}={value!r}: an integer > 0 (pixels)")
        if not problems and test["stride"] > test["crop"]:
            problems.append(f"data.pipeline.test.stride={test['stride']}: at most the window "
                            f"(data.pipeline.test.crop={test['crop']}), or pixels between windows go unpredicted")
    if cfg.finetune.freeze != "none":
        problems.append(f"finetune.freeze={cfg.finetune.freeze!r}: segmentation trains everything (none)")
    return problems


def model_problems(cfg: DictConfig) -> list[str]:
    """The model's arguments, checked without data: every key's type and range, and the relations between them
    (vittm.training.model_checks); when those pass, the model is built on the meta device (which allocates nothing)
    as a last check, its error naming the key it mentions."""
    problems = model_config_problems(cfg.model)
    if problems:
        return problems
    args = OmegaConf.to_container(cfg.model, resolve=True)
    args["num_classes"] = args.get("num_classes") or 2  # an ImageFolder's class count is only known from the data
    try:
        with torch.device("meta"):
            create_model(**args)
    except (ValueError, TypeError, AssertionError) as err:  # timm's ViT checks its arguments with assert
        return [build_problem(str(err), args, interpolation_sources(cfg.model))]
    return []


def check_data_size(cfg: DictConfig, train_images: int) -> None:
    """One optimizer step needs data.batch_size x accumulate_grad_batches x devices x nodes images."""
    t = cfg.trainer
    factors = [cfg.data.batch_size, t.get("accumulate_grad_batches", 1), t.get("devices", 1), t.get("num_nodes", 1)]
    if not all(_int(f) for f in factors):  # devices=auto: Lightning decides, the loader checks per device
        return
    needed = factors[0] * factors[1] * factors[2] * factors[3]
    if needed > train_images:
        raise ConfigError(
            f"data.batch_size={factors[0]}: {factors[0]} x trainer.accumulate_grad_batches={factors[1]} x "
            f"trainer.devices={factors[2]} x trainer.num_nodes={factors[3]} = {needed} images per optimizer step, "
            f"more than the {train_images} training images; lower them (or use more data)"
        )


def training_checkpoint(path: str | Path, key: str = "ckpt_path", verify: bool = False) -> dict[str, Any] | None:
    """The hyper-parameters saved in a Lightning checkpoint of this framework (weights-only, memory-mapped: tensors
    are not read; ``verify``: CRC of every record first), or None for a weights file (ours exported, the authors', a
    converted one, a timm state dict)."""
    if Path(path).suffix == ".safetensors":
        return None
    ckpt = load_checkpoint(path, key=key, mmap=True, verify=verify)
    if isinstance(ckpt, Mapping) and "model" in (ckpt.get("hyper_parameters") or {}):
        return ckpt["hyper_parameters"]
    return None


def check_checkpoint(cfg: DictConfig, num_classes: int) -> None:
    """The model and a resumed or evaluated checkpoint must fit the data's class count (fine-tuning on new classes
    uses finetune.from_ckpt)."""
    asked = cfg.model.get("num_classes")
    if cfg.mode == "train" and asked is not None and asked != num_classes:
        raise ConfigError(f"model.num_classes={asked!r}: the data has {num_classes} classes; leave it to the data "
                          f"(model.num_classes=${{data.num_classes}})")
    if not cfg.ckpt_path:
        return
    hparams = training_checkpoint(cfg.ckpt_path)
    if hparams is None:
        if cfg.mode == "eval":
            return  # a weights file: its heads are checked against the data's classes when it is loaded
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r}: a weights file, not a training checkpoint of this "
                          f"framework (no saved training state or model config); to start from its weights use "
                          f"finetune.from_ckpt=...")
    saved = hparams["model"]
    problems = []
    if saved["num_classes"] != num_classes:
        problems.append(
            f"ckpt_path={str(cfg.ckpt_path)!r}: trained for {saved['num_classes']} classes but data "
            f"{cfg.data.dataset!r} has {num_classes}; to start from it on new classes use finetune.from_ckpt=..."
        )
    if cfg.mode == "train" and saved["name"] != cfg.model.name:
        problems.append(f"ckpt_path: the checkpoint is a {saved['name']!r} but model.name={cfg.model.name!r}")
    if saved.get("in_chans", 3) != cfg.data.in_chans:
        problems.append(
            f"ckpt_path: the checkpoint takes {saved.get('in_chans')} channels, data.in_chans={cfg.data.in_chans}"
        )
    if problems:
        raise ConfigError("\n".join(problems))
