"""``train(cfg)`` and ``evaluate(cfg)``: what ``python run.py`` runs, testable without the command line.

Order of work: validate every setting (vittm.validate) -> build the data module (checks paths) -> build the model
(checks its arguments) -> train / evaluate -> write ``metrics.json`` and print a summary. Nothing is trained or
written before all checks pass.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from vittm.data import ImageDataModule
from vittm.flops import count_macs, count_params
from vittm.lit import ViTTMModule, ema_state_dict
from vittm.validate import ConfigError, check_checkpoint, checkpoint_hparams, validate


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class TrainTimer(Callback):
    """Wall time and images of training alone (Lightning runs validation inside the epoch: that time is taken out)."""

    def __init__(self) -> None:
        self.seconds, self.images, self._start, self._val_start = 0.0, 0, 0.0, None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch[0]) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        self._val_start = time.perf_counter() if fitting else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None:
            self.seconds -= time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._start


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    data = plain(cfg.data)
    if data["dataset"] == "ffcv":  # imported only here: FFCV is an optional extra
        from vittm.data.ffcv_loader import FFCVDataModule

        return FFCVDataModule(**data, augment=plain(cfg.augment), seed=cfg.seed)
    return ImageDataModule(**data, augment=plain(cfg.augment), seed=cfg.seed)


def module_kwargs(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    model = plain(cfg.model)
    model["num_classes"] = num_classes
    return dict(
        model=model, optimizer=plain(cfg.optimizer), schedule=plain(cfg.schedule), loss=plain(cfg.loss),
        augment=plain(cfg.augment), ema=plain(cfg.ema), freeze=cfg.finetune.freeze, compile=cfg.compile,
        log_grad_norm=cfg.log_grad_norm,
    )


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, node in (cfg.logger or {}).items():
        node = plain(node)
        if name == "wandb" and node.get("offline") == "auto":  # offline unless the user configured a key
            node["offline"] = not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb())
        loggers.append(instantiate(node))
    return loggers


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def checkpoint_callbacks(cfg: DictConfig, ckpt_dir: Path, two_heads: bool, with_ema: bool) -> list[ModelCheckpoint]:
    """last.ckpt + best by the monitored live metric (+ best by its EMA twin)."""
    monitor = cfg.checkpoint.monitor if two_heads else "val/acc1"  # baselines have no memory head
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_top_k=1,
                                 save_last=True, auto_insert_metric_name=False)]
    if with_ema:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best_ema", mode="max", save_top_k=1,
                                         monitor=monitor.replace("val/", "val_ema/"), auto_insert_metric_name=False))
    return callbacks


def prepare(cfg: DictConfig) -> tuple[L.LightningDataModule, int]:
    """The data module (paths and class counts checked, no image decoded) and the class count."""
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    num_classes = datamodule.num_classes
    check_checkpoint(cfg, num_classes)
    return datamodule, num_classes


def train(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    validate(cfg)
    datamodule, num_classes = prepare(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        module = ViTTMModule(**module_kwargs(cfg, num_classes))
        if cfg.finetune.from_ckpt:
            module.load_pretrained(cfg.finetune.from_ckpt)
    except ValueError as err:  # model arguments and pre-trained weights are user input too
        raise ConfigError(str(err)) from err

    ckpt_dir = out_dir / "checkpoints"
    save = cfg.checkpoint.save
    checkpoints = checkpoint_callbacks(cfg, ckpt_dir, module.two_heads, module.ema is not None) if save else []
    timer = TrainTimer()
    trainer = build_trainer(cfg, [*checkpoints, timer], build_loggers(cfg))
    if trainer.is_global_zero:
        for lg in trainer.loggers:  # the full resolved config, once per run
            lg.log_hyperparams(plain(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    result = {
        "mode": "train",
        "final": final_metrics(trainer),
        "best": {cb.monitor: _num(cb.best_model_score) for cb in checkpoints},
        "epochs": trainer.current_epoch, "steps": trainer.global_step,
        "train_seconds": round(timer.seconds, 2),
        "train_images_per_s": round(timer.images / timer.seconds, 1) if timer.seconds else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    if trainer.is_global_zero:
        if save and cfg.checkpoint.export_ema:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save(dict(ema_state_dict(module)), ckpt_dir / "ema_weights.pth")
        result.update(describe(cfg, module, num_classes))
        write_metrics(out_dir, result)
        print(summary(result))
    close_loggers(trainer)
    return result


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``mode=eval ckpt_path=...``: top-1/top-5 of both heads, live and EMA, on the configured data's val split."""
    start = time.perf_counter()
    validate(cfg)
    with open_dict(cfg):  # the checkpoint's own model config (its img_size also sets the eval transforms)
        cfg.model = checkpoint_hparams(cfg.ckpt_path)["model"]
    datamodule, num_classes = prepare(cfg)
    module = ViTTMModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    trainer = build_trainer(cfg, [], [])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    result = {"mode": "eval", "ckpt_path": str(cfg.ckpt_path), "final": final_metrics(trainer),
              "wall_seconds": round(time.perf_counter() - start, 2)}
    if trainer.is_global_zero:
        result.update(describe(cfg, module, num_classes))
        write_metrics(Path(cfg.output_dir), result)
        print(summary(result))
    return result


def _num(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: _num(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val")}


def describe(cfg: DictConfig, module: ViTTMModule, num_classes: int) -> dict[str, Any]:
    size = (cfg.data.in_chans, cfg.model.img_size, cfg.model.img_size)
    net = module.net
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests calling train() directly)
        overrides = []
    return {
        "status": "ok", "model": cfg.model.name, "dataset": cfg.data.dataset, "num_classes": num_classes,
        "params": count_params(net), "macs": count_macs(net, size), "overrides": overrides,
        "output_dir": str(cfg.output_dir),
    }


def write_metrics(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")


def summary(result: dict[str, Any]) -> str:
    final = result["final"]
    rows = [("memory", "val/memory"), ("process", "val/process"), ("memory (EMA)", "val_ema/memory"),
            ("process (EMA)", "val_ema/process"), ("model(x)", "val/"), ("model(x) (EMA)", "val_ema/")]
    lines = [f"\n{result['model']} on {result['dataset']}: {result['params'] / 1e6:.2f} M params, "
             f"{result['macs'] / 1e9:.3f} GMACs/image", f"{'head':<16}{'top-1':>8}{'top-5':>8}"]
    for label, key in rows:
        sep = "" if key.endswith("/") else "_"
        acc1, acc5 = final.get(f"{key}{sep}acc1"), final.get(f"{key}{sep}acc5")
        if acc1 is not None:
            lines.append(f"{label:<16}{100 * acc1:>8.2f}{100 * acc5:>8.2f}")
    if result["mode"] == "train":
        best = ", ".join(f"{k} {100 * v:.2f}" for k, v in result["best"].items() if v is not None)
        lines.append(f"best: {best}")
        lines.append(f"{result['epochs']} epochs, {result['steps']} steps; training {result['train_seconds']:.0f} s "
                     f"({result['train_images_per_s']} images/s); total {result['wall_seconds']:.0f} s")
    lines.append(f"metrics.json: {Path(result['output_dir']) / 'metrics.json'}")
    return "\n".join(lines)


def close_loggers(trainer: L.Trainer) -> None:
    """Finish wandb runs so that each multirun job is its own run."""
    for lg in trainer.loggers:
        experiment = getattr(lg, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def main(cfg: DictConfig) -> float | None:
    """Dispatch on ``mode``; returns the monitored metric (for Hydra sweepers)."""
    if cfg.mode == "train":
        result = train(cfg)
        return result["final"].get(cfg.checkpoint.monitor, result["final"].get("val/acc1"))
    if cfg.mode == "eval":
        return evaluate(cfg)["final"].get("val/acc1")
    if cfg.mode == "summary":
        from vittm.summary import summarize

        summarize(cfg)
        return None
    raise ConfigError(f"mode={cfg.mode!r} is not allowed; choose train, eval or summary")
