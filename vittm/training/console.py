"""What a run prints: the progress bar and the results on the console; everything else where it belongs.

Each kind of noise is silenced at its source (vittm.tasks.run.build_trainer and build_loggers apply these):

- Lightning's INFO messages (``GPU available: ...``, checkpoint restores) go through Python logging to the root
  logger only, which Hydra sends to ``<run>/run.log`` (conf/hydra/default.yaml), not through the console handlers
  ``import lightning`` adds; its advertisements (``💡 Tip: ... litlogger``) are dropped;
- torch's deprecation warning about ``LeafSpec``, raised inside Lightning, is ignored: nothing a user can act on;
- the logging interval is capped at the optimizer steps of one epoch, so a short run logs ``train/loss`` and Lightning
  has no ``log_every_n_steps`` to warn about;
- the progress bar shows no ``v_num`` (the logger's version: a wandb run id, or an empty string);
- wandb prints nothing (``settings.silent`` in conf/logger/wandb.yaml); where its run lives, and for an offline run
  the command that uploads it, go to run.log.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # the logger behind Lightning's rank_zero_info


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Lightning's messages to the root logger's handlers only (under Hydra: run.log), without its advertisements;
    torch's LeafSpec warning ignored. Idempotent: a filter or warnings rule added twice is kept once."""
    if logging.getLogger().hasHandlers():  # someone (Hydra) set up logging: Lightning's console handlers only echo
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in logger.handlers[:]:
                if not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
            logger.propagate = True
    logging.getLogger(LIGHTNING_INFO).addFilter(_no_tips)
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"  # torch's, about Lightning's own code
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)


def silence_wandb() -> None:
    """wandb warns about the ``anonymous`` argument Lightning always passes before a run's own settings apply: only
    the process-wide setup silences that too."""
    import wandb

    wandb.setup(settings=wandb.Settings(silent=True))


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without ``v_num``."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class WandbRunLog(Callback):
    """Writes to run.log what silenced wandb would have printed and a user needs: where the run is saved, and its
    URL, or for an offline run the command that uploads it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:  # once, not again for the test after training
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                folder = run.settings.sync_dir
                where = f"upload it with: wandb sync {folder}" if run.offline else f"online at {run.url}"
                log.info("wandb: run %s saved in %s; %s", run.id, folder, where)


def steps_per_epoch(trainer: L.Trainer, train_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``train_images`` (each process's loader drops its last partial batch), after
    ``limit_train_batches`` and ``max_steps``."""
    batches = train_images // (batch_size * trainer.world_size)
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    steps = batches // trainer.accumulate_grad_batches
    if trainer.max_steps > 0:
        steps = min(steps, trainer.max_steps)
    return max(1, steps)
