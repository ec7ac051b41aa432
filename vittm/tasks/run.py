"""``train(cfg)`` and ``evaluate(cfg)`` for the task ``task.name`` names: what ``python run.py`` runs, testable
without the command line. A task (``task_named``: classification, segmentation) supplies its data module, its
LightningModule and its summary table; the order of work and everything the runs write are the same for both.

Order of work: validate every setting (vittm.training.validate) -> pick the checkpoint to resume
(``resume=auto``) -> build the data module (checks paths) -> build the model (checks its arguments) -> train / evaluate
-> write ``metrics.json`` and print a summary. Nothing is trained or written before all checks pass.

Nothing lost: see vittm.training.trainer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

from vittm.models.flops import count_macs, count_params
from vittm.tasks.classification import ClassificationTask
from vittm.training.callbacks import BestMetrics, TrainTimer, ValidateAtMaxSteps
from vittm.training.checkpoints import (
    save_weights,
)
from vittm.training.guard import check_cpu_budget
from vittm.training.module import ema_state_dict, resolve_compile
from vittm.training.naming import components, config_choices, model_label, params_note
from vittm.training.trainer import (
    build_loggers,
    build_trainer,
    checkpoint_callbacks,
    close_loggers,
    fit,
    plain,
    resolve_resume,
)
from vittm.training.validate import ConfigError, check_checkpoint, check_data_size, training_checkpoint, validate


def task_named(name: str) -> Any:
    """The task's description for this runner (segmentation's code is imported only when it is used)."""
    if name == "segmentation":
        from vittm.tasks.segmentation.task import SegmentationTask

        return SegmentationTask
    return ClassificationTask


def task_of(cfg: DictConfig) -> Any:
    """The task ``task.name`` names (validate() has checked it)."""
    return task_named((cfg.get("task") or {}).get("name", "classification"))


def prepare(cfg: DictConfig) -> tuple[L.LightningDataModule, int]:
    """The data module (paths and class counts checked, no image decoded) and the class count."""
    datamodule = task_of(cfg).datamodule(cfg)
    datamodule.setup()
    num_classes = datamodule.num_classes
    check_checkpoint(cfg, num_classes)
    train_set = getattr(datamodule, "train_set", None)
    if cfg.mode == "train" and train_set is not None:
        check_data_size(cfg, len(train_set))
        check_cpu_budget(cfg, len(train_set), eval_images(cfg, datamodule))
    return datamodule, num_classes


def eval_images(cfg: DictConfig, datamodule: L.LightningDataModule) -> int:
    """Images a training run will evaluate: the validation split after each epoch, and the test split once."""
    val, test = getattr(datamodule, "val_set", None), getattr(datamodule, "test_set", None)
    epochs = cfg.trainer.max_epochs if cfg.trainer.get("max_steps", -1) in (-1, None) else 1
    return (len(val) * max(1, epochs) if val is not None else 0) + (len(test) if test is not None else 0)


def train(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    validate(cfg)
    resolve_resume(cfg)
    datamodule, num_classes = prepare(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    task = task_of(cfg)
    try:
        module = task.module_class(**task.module_kwargs(cfg, num_classes))
        if cfg.finetune.from_ckpt:
            print(f"finetune.from_ckpt: {module.load_pretrained(cfg.finetune.from_ckpt)}", file=sys.stderr)
    except ValueError as err:  # model arguments and pre-trained weights are user input too
        raise ConfigError(str(err)) from err

    ckpt_dir = out_dir / "checkpoints"
    save = cfg.checkpoint.save
    checkpoints = checkpoint_callbacks(cfg, ckpt_dir, task.monitor(cfg, module), module.ema is not None) if save else []
    timer, best = TrainTimer(), BestMetrics(task.best_suffix)
    trainer = build_trainer(cfg, [*checkpoints, timer, best, ValidateAtMaxSteps()], build_loggers(cfg), datamodule)
    if trainer.is_global_zero:
        for lg in trainer.loggers:  # the full resolved config, once per run
            lg.log_hyperparams(plain(cfg))
    fit(cfg, trainer, module, datamodule, checkpoints)
    if cfg.ckpt_path and timer.images == 0:  # resumed at the very end (e.g. a requeued job that had finished)
        done = out_dir / "metrics.json"
        if done.is_file():
            print(f"nothing left to train: {cfg.ckpt_path} is at the end of the run; {done} kept", file=sys.stderr)
            close_loggers(trainer)
            return json.loads(done.read_text())
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final metrics it never wrote

    final = final_metrics(trainer)
    if not final:  # e.g. trainer.limit_val_batches=0: the summary must not be empty
        trainer.validate(module, datamodule=datamodule, verbose=False)
        final = final_metrics(trainer)
    if trainer.is_global_zero and save and cfg.checkpoint.export_ema:  # the final EMA weights, before any test
        save_weights(ema_state_dict(module), ckpt_dir / f"ema_weights.{cfg.checkpoint.export_format}")
    test, tested = run_test(trainer, module, datamodule, checkpoints)
    result = {
        "mode": "train",
        "final": final,  # the validation split at the end of training
        "test": test,  # the test split, once, with the selected checkpoint (test_ckpt)
        "test_ckpt": tested,
        "splits": getattr(datamodule, "split_sizes", None),
        "fit": module.fit_plan,  # warmup and EMA decay as fitted to the run's length
        "best": {k: _num(v) for k, v in sorted(best.best.items())},  # max over the validations of this run
        "epochs": trainer.current_epoch, "steps": trainer.global_step,
        "train_seconds": round(timer.seconds, 2),
        "train_images_per_s": round(timer.images / timer.seconds, 1) if timer.seconds else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "nonfinite_skipped": module.nonfinite_skipped,
    }
    if hasattr(datamodule, "bad_images"):
        result["bad_images"] = len(datamodule.bad_images())
    if trainer.is_global_zero:
        result.update(describe(cfg, module, num_classes))
        result.update(task.extra_results(cfg, module, datamodule, trainer))
        write_metrics(out_dir, result)
        print(summary(result))
    close_loggers(trainer)
    return result


def run_test(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
             checkpoints: list[Callback]) -> tuple[dict[str, float] | None, str | None]:
    """The test split, evaluated once at the end with the checkpoint the validation split selected (``best.ckpt``,
    by ``checkpoint.monitor``: its live weights give ``test/...``, its EMA weights ``test_ema/...``); with
    ``checkpoint.save=false``, the final weights. None when validation already is the test split (val_split=0)."""
    if not (hasattr(datamodule, "has_test") and datamodule.has_test()):
        return None, None
    selected = checkpoints[0].best_model_path if checkpoints else ""
    trainer.test(module, datamodule=datamodule, ckpt_path=selected or None, verbose=False, weights_only=True)
    test = {k: _num(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("test")}
    return test, selected or "final weights"


MODEL_GROUPS = ("model", "model_common", "rw_head", "fusion", "process_embed", "memory_block")


def model_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides that change the model config (``model=...``, ``rw_head=lin``, ``model.depth=2``)."""
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0].split("@")[0] in MODEL_GROUPS]


def refuse_ignored_overrides(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> None:
    """A training checkpoint brings its own model config; model overrides that disagree with it would be silently
    ignored (and recorded in .hydra/config.yaml as if they had been used), so they are refused."""
    asked = model_overrides(overrides)
    if not asked:
        return
    wanted = {**plain(cfg.model), "num_classes": saved.get("num_classes")}
    differ = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
    if differ:
        shown = ", ".join(f"model.{k}={saved.get(k)!r} (asked: {wanted.get(k)!r})" for k in differ[:4])
        raise ConfigError(
            f"ckpt_path={str(cfg.ckpt_path)!r} is a training checkpoint and brings its own model: {shown}; the "
            f"overrides {' '.join(asked)} would be ignored. Drop them, or evaluate exported weights "
            f"(checkpoints/ema_weights.safetensors) in another model"
        )


def beside_checkpoint(ckpt_path: str, split: str) -> Path | None:
    """Where an evaluation's result is also written: in the checkpoint's run folder, ``eval_<ckpt>_<split>.json``
    (numbered when one exists already: nothing is overwritten). None for a file outside a run folder of this
    framework (a downloaded or converted weight file): its folder is not ours to write into."""
    ckpt = Path(ckpt_path).resolve()
    if ckpt.parent.name != "checkpoints":
        return None
    run = ckpt.parent.parent
    path, n = run / f"eval_{ckpt.stem}_{split}.json", 1
    while path.exists():
        path, n = run / f"eval_{ckpt.stem}_{split}-{n}.json", n + 1
    return path


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``mode=eval ckpt_path=...``: top-1/top-5 of both heads, live and EMA, on the configured data's test split
    (``eval_split=val``: the held-out validation split).

    A training checkpoint of this framework brings its own model config (model overrides that disagree are refused).
    Any other weight file (an exported ``ema_weights.safetensors``, the authors' checkpoint, a converted one) is
    loaded, exactly, into the configured model (``model=... rw_head=...``): one set of weights, so there are no
    separate EMA rows. The result goes to the run folder's metrics.json and beside the checkpoint."""
    start = time.perf_counter()
    validate(cfg)
    split = cfg.get("eval_split", "test")  # checked by validate()
    hparams = training_checkpoint(cfg.ckpt_path)
    with open_dict(cfg):
        if hparams is not None:  # the checkpoint's own model config (its img_size also sets the eval transforms)
            refuse_ignored_overrides(cfg, hparams["model"], hydra_overrides())
            cfg.model = hparams["model"]
            if "decoder" in hparams:  # a segmentation checkpoint's decoder too
                cfg.decoder = hparams["decoder"]
        else:
            cfg.ema.enabled = False
    datamodule, num_classes = prepare(cfg)
    if split == "test" and hasattr(datamodule, "has_test") and not datamodule.has_test():
        split = "val"  # data.val_split=0: the validation split is the test split
    task = task_of(cfg)
    if hparams is not None:
        module = task.module_class.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    else:
        try:
            module = task.module_class(**task.module_kwargs(cfg, num_classes))
            report = task.load_eval_weights(module, cfg.ckpt_path)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        print(f"ckpt_path: {report}", file=sys.stderr)
    trainer = build_trainer(cfg, [], [])
    on_cuda = isinstance(trainer.accelerator, CUDAAccelerator)
    compile_setting = resolve_compile(cfg.get("eval_compile", "auto"), cuda=on_cuda)
    module.set_compile(compile_setting)
    print(f"eval_compile: {compile_setting}", file=sys.stderr)
    (trainer.test if split == "test" else trainer.validate)(module, datamodule=datamodule, verbose=False)
    metrics = {k: _num(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(split)}
    result = {"mode": "eval", "ckpt_path": str(cfg.ckpt_path), "split": split,
              "final": metrics if split == "val" else {}, "test": metrics if split == "test" else None,
              "eval_compile": compile_setting,
              "wall_seconds": round(time.perf_counter() - start, 2)}
    if hasattr(datamodule, "bad_images"):
        result["bad_images"] = len(datamodule.bad_images())
        result["splits"] = datamodule.split_sizes
    if trainer.is_global_zero:
        result.update(describe(cfg, module, num_classes))
        result.update(task.extra_results(cfg, module, datamodule, trainer))
        write_metrics(Path(cfg.output_dir), result)
        beside = beside_checkpoint(cfg.ckpt_path, split)
        if beside is not None:
            beside.write_text(json.dumps(result, indent=2) + "\n")
            result["beside_checkpoint"] = str(beside)
        print(summary(result))
        if beside is not None:
            print(f"also written beside the checkpoint: {beside}")
    return result


def hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests calling train() directly)
        return []


def _num(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: _num(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val")}


def describe(cfg: DictConfig, module: L.LightningModule, num_classes: int) -> dict[str, Any]:
    size = task_of(cfg).input_shape(cfg)
    net = module.net
    overrides = hydra_overrides()
    return {
        "status": "ok", "model": cfg.model.name, "model_config": config_choices().get("model"),
        "components": components(cfg.model), "label": model_label(cfg), "params_note": params_note(cfg, num_classes),
        "task": task_of(cfg).name, "dataset": cfg.data.dataset, "num_classes": num_classes,
        "params": count_params(net), "macs": count_macs(net, size), "overrides": overrides,
        "output_dir": str(cfg.output_dir),
    }


def write_metrics(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")


def summary(result: dict[str, Any]) -> str:
    """The console summary: the task's table (validation split and, when there is one, the test split), then the
    splits, the checkpoint tested, the best validation, time and where metrics.json is."""
    label = result.get("label") or result["model"]
    lines = [f"\n{label}", f"{result['params'] / 1e6:.3g} M params ({result.get('params_note', '')}), "
             f"{result['macs'] / 1e9:.3g} GMACs/image", *task_named(result.get("task", "classification")).table(result)]
    if result.get("splits"):
        sp = result["splits"]
        lines.append(f"images: train {sp['train']}, val {sp['val']} ({sp['val_from']})"
                     + (f", test {sp['test']}" if sp.get("test") else ""))
    if result.get("test_ckpt"):
        lines.append(f"test: once, with {result['test_ckpt']} (selected by the validation split)")
    if result["mode"] == "train":
        best = ", ".join(f"{k} {100 * v:.2f}" for k, v in result["best"].items() if v is not None)
        lines.append(f"best validation: {best or 'none (no validation ran)'}")
        lines.append(f"{result['epochs']} epochs, {result['steps']} steps; training {result['train_seconds']:.0f} s "
                     f"({result['train_images_per_s']} images/s); total {result['wall_seconds']:.0f} s")
        if result.get("nonfinite_skipped"):
            lines.append(f"skipped {result['nonfinite_skipped']} updates with a non-finite loss or gradient")
    if result.get("bad_images"):
        lines.append(f"skipped {result['bad_images']} unreadable images (listed in "
                     f"{Path(result['output_dir']) / 'bad_images.txt'})")
    lines.append(f"metrics.json: {Path(result['output_dir']) / 'metrics.json'}")
    return "\n".join(lines)


def main(cfg: DictConfig) -> float | None:
    """Dispatch on ``mode``; returns the monitored metric (for Hydra sweepers)."""
    if cfg.mode == "train":
        result = train(cfg)
        key = task_of(cfg).best_suffix
        return result["final"].get(cfg.checkpoint.monitor, result["final"].get(f"val/{key}"))
    if cfg.mode == "eval":
        result = evaluate(cfg)
        return (result["test"] or result["final"]).get(f"{result['split']}/{task_of(cfg).best_suffix}")
    if cfg.mode == "summary":
        from vittm.training.summary import summarize

        summarize(cfg)
        return None
    raise ConfigError(f"mode={cfg.mode!r} is not allowed; choose train, eval or summary")
