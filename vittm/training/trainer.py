"""The Trainer around a task's LightningModule: loggers, checkpoint callbacks, plugins, the quiet console, ``fit``
with pre-emption and Ctrl-C handling, ``resume=auto``.

Nothing lost (README "Robustness"): checkpoints are written atomically and read weights-only
(vittm.training.checkpoints), every ``checkpoint.every_n_steps`` optimizer steps as well as per epoch;
SIGTERM/SIGUSR1 save ``checkpoints/preempted.ckpt`` at the end of the current batch and exit with status 143 (under
SLURM, Lightning's auto-requeue handles SIGUSR1); a resumed epoch continues at the exact batch (vittm.data.resume).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vittm.core.errors import ConfigError
from vittm.training.callbacks import PreemptionCheckpoint, StopSignals
from vittm.training.checkpoints import AtomicCheckpointIO, CheckpointError, candidates, find_resume
from vittm.training.console import ProgressBar, WandbRunLog, quiet_lightning, silence_wandb, steps_per_epoch
from vittm.training.module import NonFiniteError
from vittm.training.validate import training_checkpoint


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
    """The configured Trainer with a quiet console (vittm.training.console). ``datamodule``, when training: its
    training set caps ``log_every_n_steps`` at one epoch's optimizer steps, so that a short run logs train/loss too."""
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


def checkpoint_callbacks(cfg: DictConfig, ckpt_dir: Path, monitor: str, with_ema: bool) -> list[Callback]:
    """best.ckpt by the monitored live metric (+ best_ema.ckpt by its EMA twin), last.ckpt every epoch, ``step-N.ckpt``
    every ``checkpoint.every_n_steps`` optimizer steps (the newest ``checkpoint.keep`` kept), ``preempted.ckpt``."""
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


def fit(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
        callbacks: list[Callback]) -> None:
    """``trainer.fit``, turning a pre-emption into exit status 143 (128 + SIGTERM) and naming the last good checkpoint
    when the numbers went non-finite."""
    stops = StopSignals(cfg)
    try:
        with stops, warnings.catch_warnings():
            if getattr(datamodule, "exact_resume", False):  # it restores its loader's place itself (vittm.data.resume),
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


def close_loggers(trainer: L.Trainer) -> None:
    """Finish wandb runs so that each multirun job is its own run."""
    for lg in trainer.loggers:
        experiment = getattr(lg, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node
