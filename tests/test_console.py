"""A run's console: the progress bar and the results, none of the noise (Lightning's GPU/TPU lines and tips,
torch's deprecation warning, wandb's banner and history, ``v_num``); what carries information goes to run.log;
a run shorter than 50 steps still logs train/loss."""

from __future__ import annotations

import csv
import logging
import warnings
from types import SimpleNamespace

import lightning as L
from helpers import compose_cfg, run_cli
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from vittm.training.console import LIGHTNING_INFO, ProgressBar, quiet_lightning
from vittm.training.trainer import build_trainer

NOISE = ("GPU available", "TPU available", "Tip:", "💡", "is deprecated", "log_every_n_steps", "wandb:", "v_num",
         "site-packages")


def test_a_short_run_prints_no_noise_and_logs_train_loss(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(tmp_path, "model=vittm_test", "data.train_subset=256", "data.val_subset=128",
                   "data.test_subset=128", "data.batch_size=64", "trainer.max_epochs=1",
                   "trainer.num_sanity_val_steps=0", "logger=[wandb,csv]", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Epoch 0: 100%" in output and "metrics.json" in output  # the bar and the summary are still there
    assert [n for n in NOISE if n in output] == []
    log = (run / "run.log").read_text()
    assert "GPU available" in log and "wandb sync " in log and "Tip:" not in log
    with open(run / "csv" / "metrics.csv") as f:
        losses = [row["train/loss"] for row in csv.DictReader(f) if row["train/loss"]]
    assert len(losses) == 1  # 4 optimizer steps: logged once, at the end of the epoch (not every 50 steps)


def test_progress_bar_shows_no_version(tmp_path):
    trainer = L.Trainer(logger=CSVLogger(tmp_path, version="run_bsh_"), accelerator="cpu", enable_checkpointing=False,
                        callbacks=[ProgressBar()])
    assert TQDMProgressBar().get_metrics(trainer, None) == {"v_num": "bsh_"}  # Lightning's default would show it
    assert ProgressBar().get_metrics(trainer, None) == {}
    assert isinstance(trainer.progress_bar_callback, ProgressBar)


def test_log_interval_capped_at_one_epoch(tmp_path):
    def interval(images: int, *overrides: str) -> int:
        cfg = compose_cfg(tmp_path, "data.batch_size=64", "trainer.accelerator=cpu", *overrides)
        trainer = build_trainer(cfg, [], [CSVLogger(tmp_path)], SimpleNamespace(train_set=range(images)))
        return trainer.log_every_n_steps

    assert interval(512) == 8
    assert interval(530) == 8  # the loader drops the last partial batch
    assert interval(512, "trainer.accumulate_grad_batches=2") == 4
    assert interval(512, "trainer.max_steps=3") == 3
    assert interval(512, "trainer.limit_train_batches=2") == 2
    assert interval(64 * 1000) == 50  # the configured interval when an epoch is longer


def test_tips_and_torch_deprecation_silenced(caplog):
    quiet_lightning()
    with caplog.at_level(logging.INFO, logger=LIGHTNING_INFO):
        logging.getLogger(LIGHTNING_INFO).info("💡 Tip: try installing something")
        logging.getLogger(LIGHTNING_INFO).info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
    assert caught == []
