"""The evaluation protocol and the first hour of a new user (README "Validation and test", "Your first hour"): a
held-out validation split, a test split evaluated once, schedules fitted to short runs, a validation at
``max_steps``, evaluations that refuse ignored overrides, and a CPU budget that stops a hopeless run up front."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import TINY, compose_cfg, run_cli

from vittm.data.datamodule import DataConfigError, ImageDataModule, split_indices
from vittm.tasks.classification import ClassificationTask
from vittm.tasks.run import evaluate, model_overrides, refuse_ignored_overrides, summary, train
from vittm.training.module import fit_to_run
from vittm.training.validate import ConfigError


def test_split_indices_are_fixed_disjoint_and_in_order():
    train_idx, val_idx = split_indices(1000, 100, seed=0)
    assert len(val_idx) == 100 and len(train_idx) == 900 and not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(1000))
    assert train_idx == sorted(train_idx) and val_idx == sorted(val_idx)  # train_subset = the first N, always
    assert split_indices(1000, 100, seed=0) == (train_idx, val_idx)  # fixed by split_seed, not the run's seed
    assert split_indices(1000, 100, seed=1)[1] != val_idx
    assert len(split_indices(1000, 0.25, seed=0)[1]) == 250  # a fraction
    assert split_indices(10, 0, seed=0) == (list(range(10)), [])
    with pytest.raises(DataConfigError, match=r"data.val_split=10: holds out 10 of the 10 training images"):
        split_indices(10, 10, seed=0)


def test_fashion_mnist_holds_out_5000_training_images_for_validation(tmp_path):
    cfg = compose_cfg(tmp_path)
    data = ClassificationTask.datamodule(cfg)
    assert isinstance(data, ImageDataModule)
    assert data.split_sizes["train"] == 55000 and data.split_sizes["val"] == 5000 and data.split_sizes["test"] == 10000
    held_out = set(data.val_set.indices)
    assert not held_out & set(data.train_set.indices)  # never trained on
    for seed in (0, 3):  # the run's seed does not move the split
        other = ClassificationTask.datamodule(compose_cfg(tmp_path, f"seed={seed}"))
        other.setup()
        assert set(other.val_set.indices) == held_out
    legacy = ClassificationTask.datamodule(compose_cfg(tmp_path, "data.val_split=0"))
    assert not legacy.has_test() and legacy.split_sizes["val"] == 10000


@pytest.mark.parametrize("override", ["data.val_split=-1", "data.val_split=1.5", "data.val_split=true",
                                      "data.val_split='5000'", "data.split_seed=-2"])
def test_a_bad_split_setting_is_refused_naming_the_key(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(DataConfigError, match=rf"^{key}="):
        ClassificationTask.datamodule(compose_cfg(tmp_path, override))


def test_training_reports_validation_and_test_separately(tmp_path):
    result = train(compose_cfg(tmp_path / "run", *TINY))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["final"]) >= {"val/acc1", "val/memory_acc1", "val_ema/memory_acc1"}
    assert all(k.startswith("val") for k in metrics["final"])
    assert set(metrics["test"]) >= {"test/acc1", "test/memory_acc1", "test/process_acc1", "test_ema/memory_acc1"}
    assert metrics["test_ckpt"].endswith("best.ckpt")  # the checkpoint the validation split selected
    assert metrics["splits"]["test"] == 256 and metrics["splits"]["val"] == 256
    text = summary(result)
    assert "test EMA" in text and "best.ckpt (selected by the validation split)" in text


def test_short_runs_get_a_fitted_warmup_and_ema():
    plan = fit_to_run({"warmup_steps": 200, "max_warmup_fraction": 0.25}, {"enabled": True, "decay": 0.999,
                                                                          "max_horizon_fraction": 0.3}, 40)
    assert plan["warmup_steps"] == 10 and plan["ema_decay"] == pytest.approx(1 - 1 / 12)
    assert any("warming up over 10" in n for n in plan["notes"]) and any("using 0.91" in n for n in plan["notes"])
    long = fit_to_run({"warmup_steps": 200, "max_warmup_fraction": 0.25}, {"enabled": True, "decay": 0.999,
                                                                          "max_horizon_fraction": 0.3}, 3432)
    assert long["warmup_steps"] == 200 and long["ema_decay"] == 0.999 and not long["notes"]  # the default run
    kept = fit_to_run({"warmup_steps": 200, "max_warmup_fraction": 1.0}, {"enabled": False}, 40)
    assert kept["warmup_steps"] == 200 and kept["ema_decay"] is None


def test_a_short_run_says_how_it_fitted_its_schedule(tmp_path, capsys):
    result = train(compose_cfg(tmp_path, *TINY, "schedule.warmup_steps=200", "ema.decay=0.999"))
    err = capsys.readouterr().err
    assert "schedule: 200 warmup steps do not fit a run of 8 optimizer steps; warming up over 2" in err
    assert "ema: decay 0.999 averages over ~1000 steps" in err
    assert result["fit"] == {"total_steps": 8, "warmup_steps": 2, "ema_decay": pytest.approx(1 - 1 / 2.4, abs=1e-6)}


def test_max_steps_mid_epoch_still_validates_and_checkpoints(tmp_path):
    result = train(compose_cfg(tmp_path, *TINY, "trainer.max_steps=3", "trainer.max_epochs=-1"))
    assert result["steps"] == 3 and result["final"]["val/memory_acc1"] >= 0
    assert result["best"] and result["test"]["test/acc1"] >= 0
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_only_the_memory_head_can_be_supervised(tmp_path):
    module = train(compose_cfg(tmp_path, *TINY, "loss.heads=memory", "checkpoint.save=false"))
    assert module["steps"] == 8
    from vittm.tasks.classification import ClassificationModule

    m = ClassificationModule(model=dict(name="vittm_test", num_classes=10), optimizer=dict(opt="adamw", lr=1e-3),
                    schedule=dict(name="cosine", warmup_steps=1), loss=dict(name="ce", heads="memory"))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    loss = sum(m.criterion(m.outputs(x)[h], y) for h in m.supervised_heads)
    loss.backward()
    assert m.supervised_heads == ["memory"] and m.net.process_head.weight.grad is None


def test_eval_refuses_model_overrides_a_training_checkpoint_would_ignore(tmp_path):
    train(compose_cfg(tmp_path / "run", *TINY))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]["model"]
    cfg = compose_cfg(tmp_path / "eval", *TINY, "mode=eval", f"ckpt_path={ckpt}", "rw_head=ca")
    with pytest.raises(ConfigError, match=r"brings its own model: model.rw_head=.*'lin'.* the overrides rw_head=ca "
                                          r"would be ignored"):
        refuse_ignored_overrides(cfg, saved, ["rw_head=ca", "data.batch_size=8"])
    same = compose_cfg(tmp_path / "eval", *TINY, "mode=eval", f"ckpt_path={ckpt}")
    refuse_ignored_overrides(same, saved, ["model.depth=2"])  # agrees with the checkpoint: fine
    assert model_overrides(["model=vittm_test", "rw_head.latent_size_scale=2", "seed=1", "data.batch_size=4"]) == [
        "model=vittm_test", "rw_head.latent_size_scale=2"]

    result = evaluate(same)
    beside = tmp_path / "run" / "eval_last_test.json"
    assert result["beside_checkpoint"] == str(beside) and json.loads(beside.read_text())["test"] == result["test"]
    again = evaluate(compose_cfg(tmp_path / "eval2", *TINY, "mode=eval", f"ckpt_path={ckpt}"))
    assert again["beside_checkpoint"].endswith("eval_last_test-1.json")  # nothing overwritten


def test_eval_with_ignored_overrides_stops_on_the_command_line(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg(run, *TINY, "checkpoint.export_ema=false"))
    proc = run_cli(tmp_path, "mode=eval", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *TINY, "rw_head=ca",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and re.search(r"the overrides .*rw_head=ca would be ignored", proc.stderr)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_the_headline_command_stops_before_any_compute_on_a_cpu(tmp_path):
    proc = run_cli(tmp_path, "model=vittm_base", "rw_head=lin", f"hydra.run.dir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "model=vittm_base at 224 px (fashion_mnist's 28-px images upsampled 8x)" in errors[0]
    assert "cpu_budget_hours=2" in errors[0] and "python run.py" in errors[0] and "trainer=gpu" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_summary_names_the_config_and_why_the_parameter_count_differs(tmp_path):
    result = train(compose_cfg(tmp_path, *TINY, "checkpoint.save=false", "rw_head=ca"))
    label = result["label"]
    assert "rw_head=ca" in label and "fusion=residual" in label and "embed_dim=32" in label
    assert result["params_note"] == "for in_chans=1, num_classes=10 from data=fashion_mnist"
    assert result["label"] in summary(result)
