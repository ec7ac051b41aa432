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
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from vittm.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    candidates,
    find_resume,
    save_weights,
)
from vittm.console import ProgressBar, WandbRunLog, quiet_lightning, silence_wandb, steps_per_epoch
from vittm.data import ImageDataModule
from vittm.flops import count_macs, count_params
from vittm.guard import check_cpu_budget
from vittm.lit import NonFiniteError, ViTTMModule, ema_state_dict, resolve_compile
from vittm.models import load_weights
from vittm.naming import components, config_choices, model_label, params_note
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


class ValidateAtMaxSteps(Callback):
    """``trainer.max_steps`` reached mid-epoch: Lightning would stop without validating (an empty summary, nothing
    for best.ckpt). Asking it to stop at that batch makes it validate first, as it does for early stopping, so
    every run ends with a validation and its checkpoints."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


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
        if name == "wandb" and (node.get("settings") or {}).get("silent"):
            silence_wandb()
        loggers.append(instantiate(node))
    return loggers


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list,
                  datamodule: L.LightningDataModule | None = None) -> L.Trainer:
    """The configured Trainer with a quiet console (vittm.console). ``datamodule``, when training: its training set
    caps ``log_every_n_steps`` at one epoch's optimizer steps, so that a short run logs train/loss too."""
    quiet_lightning()
    extra: list[Callback] = [ProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        extra.append(WandbRunLog())
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, *extra], logger=loggers or False,
                          plugins=trainer_plugins(cfg))
    train_set = getattr(datamodule, "train_set", None)
    if train_set is not None:  # set after construction: the world size is only known then
        steps = steps_per_epoch(trainer, len(train_set), cfg.data.batch_size)
        trainer.log_every_n_steps = min(trainer.log_every_n_steps, steps)
    return trainer


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


class StopSignals:
    """SIGUSR1 (SLURM's advance warning) and the first Ctrl-C (SIGINT) handled like SIGTERM: Lightning stops at the
    end of the current batch and PreemptionCheckpoint saves the full state. Without a handler SIGUSR1 would kill the
    process on the spot, and Ctrl-C would raise KeyboardInterrupt mid-step, which Lightning turns into exit 1 with
    nothing saved. A second Ctrl-C stops at once, without saving. SIGUSR1 is left to Lightning's SLURM auto-requeue
    when that owns it."""

    def __init__(self, cfg: DictConfig) -> None:
        self.usr1 = not (SLURMEnvironment.detect() and cfg.preemption.requeue)
        self.ctrl_c = False  # whether the stop came from Ctrl-C (exit 130) rather than SIGTERM/SIGUSR1 (143)
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
            return self
        if self.usr1:
            self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._as_sigterm)
        self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._ctrl_c)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _as_sigterm(self, signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def _ctrl_c(self, signum: int, frame: Any) -> None:
        self.ctrl_c = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C raises KeyboardInterrupt
        print("\nCtrl-C: saving the training state at the end of this batch (Ctrl-C again: stop without saving)",
              file=sys.stderr, flush=True)
        self._as_sigterm(signum, frame)


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
        "splits": datamodule.split_sizes if isinstance(datamodule, ImageDataModule) else None,
        "fit": module.fit_plan,  # warmup and EMA decay as fitted to the run's length
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
        result.update(describe(cfg, module, num_classes))
        write_metrics(out_dir, result)
        print(summary(result))
    close_loggers(trainer)
    return result


def run_test(trainer: L.Trainer, module: ViTTMModule, datamodule: L.LightningDataModule,
             checkpoints: list[Callback]) -> tuple[dict[str, float] | None, str | None]:
    """The test split, evaluated once at the end with the checkpoint the validation split selected (``best.ckpt``,
    by ``checkpoint.monitor``: its live weights give ``test/...``, its EMA weights ``test_ema/...``); with
    ``checkpoint.save=false``, the final weights. None when validation already is the test split (val_split=0)."""
    if not (isinstance(datamodule, ImageDataModule) and datamodule.has_test()):
        return None, None
    selected = checkpoints[0].best_model_path if checkpoints else ""
    trainer.test(module, datamodule=datamodule, ckpt_path=selected or None, verbose=False, weights_only=True)
    test = {k: _num(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("test")}
    return test, selected or "final weights"


def fit(cfg: DictConfig, trainer: L.Trainer, module: ViTTMModule, datamodule: L.LightningDataModule,
        callbacks: list[Callback]) -> None:
    """``trainer.fit``, turning a pre-emption into exit status 143 (128 + SIGTERM) and naming the last good checkpoint
    when the numbers went non-finite."""
    stops = StopSignals(cfg)
    try:
        with stops, warnings.catch_warnings():
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
            print(f"{'stopped by Ctrl-C' if stops.ctrl_c else 'preempted'} at step {trainer.global_step}: {where}; "
                  f"to continue, run the same command with resume=auto hydra.run.dir={cfg.output_dir}",
                  file=sys.stderr)
        raise SystemExit(128 + (signal.SIGINT if stops.ctrl_c else signal.SIGTERM)) from None
    except NonFiniteError as err:
        kept = candidates(Path(cfg.output_dir)) if cfg.checkpoint.save else []
        last = f"the checkpoints are kept, the newest is {kept[0]}" if kept else "no checkpoint had been written yet"
        raise NonFiniteError(f"{err}; {last}; lower optimizer.lr, or set nonfinite=skip to skip such steps") from None


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


def beside_checkpoint(ckpt_path: str, split: str) -> Path:
    """Where an evaluation's result is also written: in the checkpoint's run folder, ``eval_<ckpt>_<split>.json``
    (numbered when one exists already: nothing is overwritten)."""
    ckpt = Path(ckpt_path).resolve()
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
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
        else:
            cfg.ema.enabled = False
    datamodule, num_classes = prepare(cfg)
    if split == "test" and isinstance(datamodule, ImageDataModule) and not datamodule.has_test():
        split = "val"  # data.val_split=0: the validation split is the test split
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
    (trainer.test if split == "test" else trainer.validate)(module, datamodule=datamodule, verbose=False)
    metrics = {k: _num(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(split)}
    result = {"mode": "eval", "ckpt_path": str(cfg.ckpt_path), "split": split,
              "final": metrics if split == "val" else {}, "test": metrics if split == "test" else None,
              "eval_compile": compile_setting,
              "wall_seconds": round(time.perf_counter() - start, 2)}
    if isinstance(datamodule, ImageDataModule):
        result["bad_images"] = len(datamodule.bad_images())
        result["splits"] = datamodule.split_sizes
    if trainer.is_global_zero:
        result.update(describe(cfg, module, num_classes))
        write_metrics(Path(cfg.output_dir), result)
        beside = beside_checkpoint(cfg.ckpt_path, split)
        beside.write_text(json.dumps(result, indent=2) + "\n")
        result["beside_checkpoint"] = str(beside)
        print(summary(result))
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


def describe(cfg: DictConfig, module: ViTTMModule, num_classes: int) -> dict[str, Any]:
    size = (cfg.data.in_chans, cfg.model.img_size, cfg.model.img_size)
    net = module.net
    overrides = hydra_overrides()
    return {
        "status": "ok", "model": cfg.model.name, "model_config": config_choices().get("model"),
        "components": components(cfg.model), "label": model_label(cfg), "params_note": params_note(cfg, num_classes),
        "dataset": cfg.data.dataset, "num_classes": num_classes,
        "params": count_params(net), "macs": count_macs(net, size), "overrides": overrides,
        "output_dir": str(cfg.output_dir),
    }


def write_metrics(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")


def summary(result: dict[str, Any]) -> str:
    """The console table: top-1/top-5 per head on the validation split and, when there is one, the test split."""
    val, test = result["final"], result.get("test") or {}
    rows = [("memory", "memory_"), ("process", "process_"), ("model(x)", "")]
    stages = [("val", val, "val"), ("val EMA", val, "val_ema")]
    if test:
        stages += [("test", test, "test"), ("test EMA", test, "test_ema")]
    stages = [st for st in stages if any(k.startswith(st[2] + "/") for k in st[1])]
    label = result.get("label") or result["model"]
    lines = [f"\n{label}", f"{result['params'] / 1e6:.3g} M params ({result.get('params_note', '')}), "
             f"{result['macs'] / 1e9:.3g} GMACs/image",
             f"{'top-1 / top-5 %':<16}" + "".join(f"{name:>16}" for name, _, _ in stages)]
    for head, key in rows:
        cells = []
        for _, metrics, prefix in stages:
            acc1, acc5 = metrics.get(f"{prefix}/{key}acc1"), metrics.get(f"{prefix}/{key}acc5")
            cells.append(f"{100 * acc1:>9.2f} {100 * acc5:>6.2f}" if acc1 is not None else f"{'':>16}")
        if any(c.strip() for c in cells):
            lines.append(f"{head:<16}" + "".join(cells))
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
        result = evaluate(cfg)
        return (result["test"] or result["final"]).get(f"{result['split']}/acc1")
    if cfg.mode == "summary":
        from vittm.summary import summarize

        summarize(cfg)
        return None
    raise ConfigError(f"mode={cfg.mode!r} is not allowed; choose train, eval or summary")
