"""`python run.py ...` as a user types it, in a subprocess, writing into a temporary directory."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, compose_cfg, run_cli

from vittm.core.registry import FUSIONS, RW_HEADS
from vittm.tasks.run import evaluate


@pytest.mark.parametrize(("group", "names"), [("rw_head", RW_HEADS.names()), ("fusion", FUSIONS.names())])
def test_multirun_trains_every_option(tmp_path, group, names):
    proc = run_cli(tmp_path, "-m", f"{group}={','.join(names)}", *TINY, "data.train_subset=128",
                   "data.val_subset=128", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == len(names)  # one directory per job
    seen = set()
    for path in jobs:
        metrics = json.loads(path.read_text())
        assert metrics["steps"] == 2 and 0 <= metrics["final"]["val/memory_acc1"] <= 1
        seen |= {o.split("=")[1] for o in metrics["overrides"] if o.startswith(f"{group}=")}
        assert (path.parent / "checkpoints" / "last.ckpt").is_file()
    assert seen == set(names)


def test_cfg_job_and_summary_mode(tmp_path):
    proc = run_cli(tmp_path, "model=vittm_small", "model.memory_ps=16", "model.process_ps=32", "rw_head=ca",
                   "fusion=add_erase", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    assert "name: vittm_small" in proc.stdout and "memory_ps: 16" in proc.stdout and "name: add_erase" in proc.stdout
    proc = run_cli(tmp_path, "mode=summary", "model=vittm_test", "summary.batch_size=2",
                   f"hydra.run.dir={tmp_path / 's'}")
    assert proc.returncode == 0, proc.stderr
    assert "vittm_test:" in proc.stdout and "'memory': [2, 10], 'process': [2, 10]" in proc.stdout


def test_bad_input_one_clear_error_each(tmp_path):
    proc = run_cli(tmp_path, "rw_head=lni")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: rw_head=lni: rw_head has no option lni; did you mean rw_head=lin?"]
    proc = run_cli(tmp_path, "optimizer.lrr=0.1")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: optimizer.lrr=0.1: no key optimizer.lrr in the config; did you mean optimizer.lr=0.1?"]
    proc = run_cli(tmp_path, "optimizer.lr=-1", "data.batch_size=0", "trainer.max_epochs=-2", "data.root=/nope",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-3:] == [
        "error: optimizer.lr=-1: must be a number > 0",
        "error: data.batch_size=0: must be an integer > 0",
        "error: trainer.max_epochs=-2: must be an integer > 0 (or set trainer.max_steps)",
    ]
    assert "Traceback" not in proc.stderr
    proc = run_cli(tmp_path, "data.root=/nope", f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 2 and "error: data.root='/nope' does not exist or is not a directory" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ddp_on_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    proc = run_cli(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *TINY,
                   "data.train_subset=256", "data.val_subset=250", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 256 // (64 * 2)  # each rank its own half of every epoch
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.ckpt", "best_ema.ckpt", "ema_weights.safetensors", "last.ckpt"]
    # metrics reduced across the two ranks equal a single-process evaluation of the same weights on all 250 images
    single = evaluate(compose_cfg(tmp_path / "eval", *TINY, "data.val_subset=250", "mode=eval", "eval_split=val",
                                  f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    for key in ("val/memory_acc1", "val/process_acc1", "val_ema/memory_acc5", "val/loss"):
        assert metrics["final"][key] == pytest.approx(single["final"][key], abs=1e-5), key
