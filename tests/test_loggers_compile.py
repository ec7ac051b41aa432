"""Loggers (CSV default, wandb offline, TensorBoard) and torch.compile-interchangeable checkpoints."""

from __future__ import annotations

import time

import torch
import wandb
from helpers import TINY, compose_cfg

from vittm.tasks.classification import ClassificationModule
from vittm.tasks.run import train


def test_wandb_offline_records_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline is chosen
    train(compose_cfg(tmp_path / "run", *TINY, "data.train_subset=128", "logger=wandb", "study=my_study"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # offline, one run
    wanted = (b"latent_size_scale", b"my_study", b"fashion_mnist")  # protobuf records: config strings verbatim
    deadline = time.monotonic() + 60  # wandb's service process may still be flushing the file after finish()
    while not all(w in runs[0].read_bytes() for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
    record = runs[0].read_bytes()
    assert all(w in record for w in wanted), record[:200]
    assert wandb.run is None  # finished, so the next multirun job starts its own run


def test_tensorboard_and_csv_together(tmp_path):
    train(compose_cfg(tmp_path, *TINY, "data.train_subset=128", "logger=[csv,tensorboard]"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "val/memory_acc1" in (tmp_path / "csv" / "metrics.csv").read_text()


def test_checkpoint_keys_from_a_compiled_module_load_uncompiled():
    kwargs = dict(model=dict(name="vittm_test", num_classes=4, in_chans=1), optimizer=dict(opt="adamw", lr=1e-3),
                  schedule=dict(name="cosine", warmup_steps=0), loss=dict(name="ce"))
    module = ClassificationModule(**kwargs)
    # a checkpoint written by code that compiled the module in place carries "_orig_mod." in its keys
    foreign = {"state_dict": {k.replace("net.", "net._orig_mod."): v for k, v in module.state_dict().items()}}
    fresh = ClassificationModule(**kwargs)
    fresh.on_load_checkpoint(foreign)
    fresh.load_state_dict(foreign["state_dict"])
    for key, value in module.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_compiled_training_checkpoint_loads_uncompiled_and_back(tmp_path):
    """torch.compile on CPU (inductor, needs gcc): about 90 s on 2 cores."""
    train(compose_cfg(tmp_path / "compiled", *TINY, "data.train_subset=128", "compile=true"))
    ckpt = tmp_path / "compiled" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    plain = ClassificationModule.load_from_checkpoint(ckpt, compile=False, weights_only=True)
    compiled = ClassificationModule.load_from_checkpoint(ckpt, compile=True, weights_only=True)
    x = torch.randn(4, 1, 28, 28)
    plain.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled.outputs(x)["memory"], plain.outputs(x)["memory"], rtol=1e-4, atol=1e-4)
    # and back: a checkpoint of the uncompiled run resumes under compile
    train(compose_cfg(tmp_path / "plain", *TINY, "data.train_subset=128"))
    train(compose_cfg(tmp_path / "resumed", *TINY, "data.train_subset=128", "compile=true", "trainer.max_epochs=2",
                      f"ckpt_path={tmp_path / 'plain' / 'checkpoints' / 'last.ckpt'}"))
