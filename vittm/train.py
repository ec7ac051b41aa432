"""``train(cfg)`` and ``evaluate(cfg)``: what ``python run.py`` runs, testable without the command line.

Order of work: validate every setting (vittm.validate) -> pick the checkpoint to resume (``resume=auto``) -> build
the data module (checks paths) -> build the model (checks its arguments) -> train / evaluate -> write
``metrics.json`` and print a summary. Nothing is trained or written before all checks pass.

Nothing lost (README "Robustness"): checkpoints are written atomically and read weights-only (vittm.checkpoints),
every ``checkpoint.every_n_steps`` optimizer steps as well as per epoch; SIGTERM/SIGUSR1 save
``checkpoints/preempted.ckpt`` at the end of the current batch and exit with status 143 (under SLURM, Lightning's
auto-requeue handles SIGUSR1); a resumed epoch continues at the exact batch (vittm.data.resume).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from vittm.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    candidates,
    find_resume,
    save_weights,
)
from vittm.data import ImageDataModule
from vittm.flops import count_macs, count_params
from vittm.lit import NonFiniteError, ViTTMModule, ema_state_dict, resolve_compile
from vittm.models import load_weights
from vittm.validate import ConfigError, check_checkpoint, check_data_size, training_checkpoint, validate


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class TrainTimer(Callback):
    """Wall time and images of training alone (Lightning runs validation inside the epoch: that time is taken out)."""

    def __init__(self) -> None:
        self.seconds, self.images, self._start, self._val_start = 0.0, 0, 0.0, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch

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


class BestMetrics(Callback):
    """The best top-1 each validation reached (both heads and model(x), live and EMA), whether or not checkpoints are
    written; its state travels in checkpoints, so a resumed run keeps the best of its earlier epochs."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val") and key.endswith("acc1"):
                self.best[key] = max(self.best.get(key, -1.0), float(value))

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    data = plain(cfg.data)
    if data["dataset"] == "ffcv":  # imported only here: FFCV is an optional extra
        from vittm.data.ffcv_loader import FFCVDataModule

        return FFCVDataModule(**data, augment=plain(cfg.augment), seed=cfg.seed)
    log = Path(cfg.output_dir) / "bad_images.txt"  # unreadable files, appended by every loader process
    return ImageDataModule(**data, augment=plain(cfg.augment), seed=cfg.seed, bad_image_log=log)


def module_kwargs(cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    model = plain(cfg.model)
    model["num_classes"] = num_classes
    return dict(
        model=model, optimizer=plain(cfg.optimizer), schedule=plain(cfg.schedule), loss=plain(cfg.loss),
        augment=plain(cfg.augment), ema=plain(cfg.ema), freeze=cfg.finetune.freeze, compile=cfg.compile,
        log_grad_norm=cfg.log_grad_norm, nonfinite=cfg.nonfinite,
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
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=trainer_plugins(cfg))


def trainer_plugins(cfg: DictConfig) -> list:
    """Atomic, weights-only checkpoint IO; under SLURM, Lightning's auto-requeue as ``preemption.requeue`` says
    (on SIGUSR1 it saves ``hpc_ckpt_N.ckpt`` in the run directory and runs ``scontrol requeue``)."""
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=bool(cfg.preemption.requeue), requeue_signal=signal.SIGUSR1))
    return plugins


def checkpoint_callbacks(cfg: DictConfig, ckpt_dir: Path, two_heads: bool, with_ema: bool) -> list[Callback]:
    """best.ckpt by the monitored live metric (+ best_ema.ckpt by its EMA twin), last.ckpt every epoch, ``step-N.ckpt``
    every ``checkpoint.every_n_steps`` optimizer steps (the newest ``checkpoint.keep`` kept), ``preempted.ckpt``."""
    monitor = cfg.checkpoint.monitor if two_heads else "val/acc1"  # baselines have no memory head
    # Fixed names, replaced in place: a run resumed from an older checkpoint of its own directory writes last.ckpt
    # again, not last-v1.ckpt (validate() keeps other runs out of this directory).
    common = dict(dirpath=ckpt_dir, mode="max", auto_insert_metric_name=False, enable_version_counter=False)
    callbacks: list[Callback] = [ModelCheckpoint(filename="best", monitor=monitor, save_top_k=1, **common)]
    if with_ema:
        callbacks.append(ModelCheckpoint(filename="best_ema", monitor=monitor.replace("val/", "val_ema/"),
                                         save_top_k=1, **common))
    # Its own callback: since Lightning 2.6 ``save_last=True`` writes last.ckpt only when the top-k checkpoint was
    # saved too, i.e. only in epochs that improved the monitored metric.
    callbacks.append(ModelCheckpoint(filename="last", save_top_k=1, **common))
    if cfg.checkpoint.every_n_steps:  # "step" is always a monitor candidate: the top k by step are the newest k
        callbacks.append(ModelCheckpoint(filename="step-{step}", monitor="step", save_top_k=cfg.checkpoint.keep,
                                         every_n_train_steps=cfg.checkpoint.every_n_steps, **common))
    callbacks.append(PreemptionCheckpoint(ckpt_dir / "preempted.ckpt"))
    return callbacks


class PreemptionCheckpoint(Callback):
    """Lightning turns SIGTERM into ``SIGTERMException``, raised at the end of the current batch (on every rank at
    once under DDP); this saves the state of that moment. Saving there rather than inside the signal handler means
    no optimizer step is caught half-done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path, weights_only=False)  # the full training state
            self.saved = True


@contextmanager
def usr1_means_sigterm(cfg: DictConfig) -> Iterator[None]:
    """SIGUSR1 (SLURM's advance warning) handled like SIGTERM, unless Lightning's SLURM auto-requeue owns it.
    Without a handler SIGUSR1 would kill the process on the spot."""
    lightning_owns = SLURMEnvironment.detect() and cfg.preemption.requeue
    if lightning_owns or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def resolve_resume(cfg: DictConfig) -> None:
    """``resume=auto|<path>`` becomes ``ckpt_path`` (auto: the newest checkpoint of this run directory that loads;
    none there: a fresh start)."""
    if not cfg.get("resume"):
        return
    path: Any = cfg.resume
    if path != "auto":
        if training_checkpoint(path, key="resume", verify=True) is None:  # a bad file is refused here, as resume
            raise ConfigError(f"resume={str(path)!r}: a weights file, not a training checkpoint of this framework (no "
                              f"training state to continue); to start from its weights use finetune.from_ckpt=...")
    else:
        path = find_resume(cfg.output_dir)
        if path is None and candidates(Path(cfg.output_dir)):
            raise CheckpointError(
                f"resume=auto: none of the checkpoints in {str(cfg.output_dir)!r} can be loaded (see the warnings); "
                f"move them away to start afresh there, or choose a new hydra.run.dir"
            )
        print(f"resume=auto: {f'continuing from {path}' if path else 'no checkpoint yet, starting afresh'}",
              file=sys.stderr)
    with open_dict(cfg):
        cfg.ckpt_path = str(path) if path else None


def prepare(cfg: DictConfig) -> tuple[L.LightningDataModule, int]:
    """The data module (paths and class counts checked, no image decoded) and the class count."""
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    num_classes = datamodule.num_classes
    check_checkpoint(cfg, num_classes)
    train_set = getattr(datamodule, "train_set", None)
    if cfg.mode == "train" and train_set is not None:
        check_data_size(cfg, len(train_set))
    return datamodule, num_classes


def train(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    validate(cfg)
    resolve_resume(cfg)
    datamodule, num_classes = prepare(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        module = ViTTMModule(**module_kwargs(cfg, num_classes))
        if cfg.finetune.from_ckpt:
            print(f"finetune.from_ckpt: {module.load_pretrained(cfg.finetune.from_ckpt)}", file=sys.stderr)
    except ValueError as err:  # model arguments and pre-trained weights are user input too
        raise ConfigError(str(err)) from err

    ckpt_dir = out_dir / "checkpoints"
    save = cfg.checkpoint.save
    checkpoints = checkpoint_callbacks(cfg, ckpt_dir, module.two_heads, module.ema is not None) if save else []
    timer, best = TrainTimer(), BestMetrics()
    trainer = build_trainer(cfg, [*checkpoints, timer, best], build_loggers(cfg))
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

    result = {
        "mode": "train",
        "final": final_metrics(trainer),
        "best": {k: _num(v) for k, v in sorted(best.best.items())},  # max over the validations of this run
        "epochs": trainer.current_epoch, "steps": trainer.global_step,
        "train_seconds": round(timer.seconds, 2),
        "train_images_per_s": round(timer.images / timer.seconds, 1) if timer.seconds else None,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "nonfinite_skipped": module.nonfinite_skipped,
    }
    if isinstance(datamodule, ImageDataModule):
        result["bad_images"] = len(datamodule.bad_images())
    if trainer.is_global_zero:
        if save and cfg.checkpoint.export_ema:
            save_weights(ema_state_dict(module), ckpt_dir / f"ema_weights.{cfg.checkpoint.export_format}")
        result.update(describe(cfg, module, num_classes))
        write_metrics(out_dir, result)
        print(summary(result))
    close_loggers(trainer)
    return result


def fit(cfg: DictConfig, trainer: L.Trainer, module: ViTTMModule, datamodule: L.LightningDataModule,
        callbacks: list[Callback]) -> None:
    """``trainer.fit``, turning a pre-emption into exit status 143 (128 + SIGTERM) and naming the last good checkpoint
    when the numbers went non-finite."""
    try:
        with usr1_means_sigterm(cfg), warnings.catch_warnings():
            if isinstance(datamodule, ImageDataModule):  # it restores its loader's place itself (vittm.data.resume),
                # which Lightning cannot see: its warning about a non-resumable loader does not apply
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            if cfg.ckpt_path:  # resuming into the run's own directory is the point of resume=auto
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:
        saved = [cb.path for cb in callbacks if isinstance(cb, PreemptionCheckpoint) and cb.saved]
        if trainer.is_global_zero:
            where = f"saved {saved[0]}" if saved else "no checkpoint saved (checkpoint.save=false)"
            print(f"preempted at step {trainer.global_step}: {where}; run the same command with resume=auto "
                  f"(and the same hydra.run.dir) to continue", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except NonFiniteError as err:
        kept = candidates(Path(cfg.output_dir)) if cfg.checkpoint.save else []
        last = f"the checkpoints are kept, the newest is {kept[0]}" if kept else "no checkpoint had been written yet"
        raise NonFiniteError(f"{err}; {last}; lower optimizer.lr, or set nonfinite=skip to skip such steps") from None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``mode=eval ckpt_path=...``: top-1/top-5 of both heads, live and EMA, on the configured data's val split.

    A training checkpoint of this framework brings its own model config. Any other weight file (an exported
    ``ema_weights.safetensors``, the authors' checkpoint, a converted one) is loaded, exactly, into the configured
    model (``model=... rw_head=...``): one set of weights, so there are no separate EMA rows."""
    start = time.perf_counter()
    validate(cfg)
    hparams = training_checkpoint(cfg.ckpt_path)
    with open_dict(cfg):
        if hparams is not None:  # the checkpoint's own model config (its img_size also sets the eval transforms)
            cfg.model = hparams["model"]
        else:
            cfg.ema.enabled = False
    datamodule, num_classes = prepare(cfg)
    if hparams is not None:
        module = ViTTMModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    else:
        try:
            module = ViTTMModule(**module_kwargs(cfg, num_classes))
            report = load_weights(module.net, cfg.ckpt_path, key="ckpt_path", heads="require")
        except ValueError as err:
            raise ConfigError(str(err)) from err
        print(f"ckpt_path: {report}", file=sys.stderr)
    trainer = build_trainer(cfg, [], [])
    on_cuda = isinstance(trainer.accelerator, CUDAAccelerator)
    compile_setting = resolve_compile(cfg.get("eval_compile", "auto"), cuda=on_cuda)
    module.set_compile(compile_setting)
    print(f"eval_compile: {compile_setting}", file=sys.stderr)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    result = {"mode": "eval", "ckpt_path": str(cfg.ckpt_path), "final": final_metrics(trainer),
              "eval_compile": compile_setting,
              "wall_seconds": round(time.perf_counter() - start, 2)}
    if isinstance(datamodule, ImageDataModule):
        result["bad_images"] = len(datamodule.bad_images())
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
        if result.get("nonfinite_skipped"):
            lines.append(f"skipped {result['nonfinite_skipped']} updates with a non-finite loss or gradient")
    if result.get("bad_images"):
        lines.append(f"skipped {result['bad_images']} unreadable images (listed in "
                     f"{Path(result['output_dir']) / 'bad_images.txt'})")
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
