"""Callbacks every training run uses: training time, the best validation scores, validation at ``max_steps``,
the pre-emption checkpoint, and the signal handling that turns SIGUSR1 and Ctrl-C into a clean, saved stop."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig


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
    """The best score each validation reached (``suffix``: a classifier's top-1 of both heads and model(x), live and
    EMA; a segmenter's mIoU), whether or not checkpoints are written; its state travels in checkpoints, so a resumed
    run keeps the best of its earlier epochs."""

    def __init__(self, suffix: str = "acc1") -> None:
        self.suffix = suffix
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val") and key.endswith(self.suffix):
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
