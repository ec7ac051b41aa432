"""Sweep presets through Hydra's launchers, failed jobs, the Optuna search's resume, and the sweep report."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, run_cli
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from vittm.studies.report import pareto, report
from vittm.studies.sweep import run_group

# One optimizer step per job, no checkpoints: the sweep machinery is under test, not the training.
QUICK = [*TINY, "data.train_subset=64", "data.val_subset=64", "checkpoint.save=false"]

slow = pytest.mark.slow  # ~20 s each on 2 cores: run by `make test-all`, to keep the default suite short
PRESETS = [  # (preset, extra overrides, expected job count)
    pytest.param("rw_heads", [], 6, id="rw_heads"),
    # the preset's axes are for 224 px; on 28-px Fashion-MNIST they are given on the command line (its README line)
    pytest.param("patch_sizes", ["model.memory_ps=4,7", "model.process_ps=7,14"], 4, id="patch_sizes"),
    pytest.param("fusion", [], 3, id="fusion", marks=slow),
    pytest.param("process_embed", [], 3, id="process_embed", marks=slow),
    pytest.param("memory_blocks", [], 3, id="memory_blocks", marks=slow),
    pytest.param("latent_scale", [], 4, id="latent_scale", marks=slow),
    pytest.param("vit_baselines", [], 3, id="vit_baselines", marks=slow),
]


def check_report(sweep: Path, jobs: int, ok: int) -> dict:
    result = report(sweep)
    assert len(result["rows"]) == jobs and sum(r["status"] == "ok" for r in result["rows"]) == ok
    for file in result["files"]:
        assert file.stat().st_size > 0
    table = (sweep / "report.md").read_text()
    assert f"{jobs} jobs: {ok} ok" in table
    csv_lines = (sweep / "report.csv").read_text().splitlines()
    assert len(csv_lines) == jobs + 1  # header + one row per job
    return result


@pytest.mark.parametrize(("preset", "extra", "jobs"), PRESETS)
def test_sweep_preset_basic_launcher(tmp_path, preset, extra, jobs):
    sweep = tmp_path / "sweep"
    proc = run_cli(tmp_path, "-m", f"sweep={preset}", *QUICK, *extra, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == jobs
    swept = {o.split("=")[0] for o in OmegaConf.load(ROOT / "conf" / "sweep" / f"{preset}.yaml").hydra.sweeper.params}
    for name in folders:  # named by the swept values only, e.g. 3_rw_head=la
        keys = {part.split("=")[0] for part in name.split("_", 1)[1].split(",")}
        assert keys == swept, name
    result = check_report(sweep, jobs, jobs)
    assert set(result["axes"]) == swept
    if len(swept) == 2:
        assert (sweep / "heatmap.png").is_file()


def test_failed_job_does_not_stop_the_sweep(tmp_path):
    """process_ps=5 does not divide 28: those jobs fail, the others train, and the report lists the failures."""
    sweep = tmp_path / "sweep"
    proc = run_cli(tmp_path, "-m", "model.process_ps=5,7", "seed=0,1", *QUICK, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process_ps=5" in proc.stderr and "the sweep goes on" in proc.stderr
    result = check_report(sweep, 4, 2)
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    assert {r["overrides"]["model.process_ps"] for r in failed} == {"5"}
    assert all("ConfigError" in r["error"] and "process_ps=5" in r["error"] for r in failed)
    table = (sweep / "report.md").read_text()
    failed_section = table.split("## Failed jobs", 1)[1]
    assert [line.startswith("| ") and "process_ps=5" in line for line in failed_section.splitlines()].count(True) == 2
    assert "| 7 | 2 |" in table  # the surviving configuration, averaged over its two seeds
    for row in result["rows"]:
        if row["status"] == "ok":
            metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
            assert metrics["final"]["val/acc1"] == row["val_acc1"]


def test_report_on_a_partial_sweep(tmp_path):
    """A job still running (folder with .hydra/ but no metrics.json yet) is listed, not dropped."""
    sweep = tmp_path / "sweep"
    proc = run_cli(tmp_path, "-m", "fusion=residual,erase", *QUICK, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    running = sweep / "2_fusion=add_erase"
    (running / ".hydra").mkdir(parents=True)
    (running / ".hydra" / "overrides.yaml").write_text("- fusion=add_erase\n")
    check_report(sweep, 3, 2)
    assert "- 2_fusion=add_erase" in (sweep / "report.md").read_text()


def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(tmp_path, "-m", "hydra/launcher=submitit_local", "fusion=residual,erase", *QUICK,
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit
    check_report(sweep, 2, 2)


def completed_trials(db: Path) -> list[tuple[int, float]]:
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT t.number, v.value FROM trials t JOIN trial_values v ON v.trial_id = t.trial_id "
                               "WHERE t.state = 'COMPLETE' ORDER BY t.number").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []


def test_optuna_search_resumes_from_sqlite(tmp_path):
    args = [sys.executable, str(ROOT / "run.py"), "-m", "sweep=optuna", "study=search_test", *QUICK,
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    db = tmp_path / "outputs" / "search_test" / "optuna.sqlite"
    proc = subprocess.Popen([*args, "hydra.sweeper.n_trials=20"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not completed_trials(db) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # interrupted in the middle of the search
    proc.wait()
    before = completed_trials(db)
    assert 1 <= len(before) < 20, proc.stderr.read().decode()[-3000:]

    done = subprocess.run([*args, "hydra.sweeper.n_trials=2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = completed_trials(db)
    assert after[: len(before)] == before  # the interrupted run's trials are kept
    assert len(after) == len(before) + 2  # and the search went on from them
    # the value Optuna maximised is what the job returned: its final val/memory_acc1 in metrics.json
    values = sorted(json.loads(p.read_text())["final"]["val/memory_acc1"]
                    for p in (tmp_path / "sweep").glob("*/metrics.json"))
    assert all(any(abs(v - value) < 1e-6 for v in values) for _, value in after)


def test_wandb_group_is_shared_by_a_sweep():
    """logger=wandb's group is ${run_group:${study}}: every job of a multirun gets <study>/<sweep folder>."""
    hydra_cfg = OmegaConf.structured(HydraConf)
    hydra_cfg.mode, hydra_cfg.sweep.dir = RunMode.MULTIRUN, "/x/outputs/s/multiruns/2026-11-24_01"
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    try:
        assert run_group("sweep_rw_heads") == "sweep_rw_heads/2026-11-24_01"
    finally:
        HydraConfig.instance().cfg = None
    assert run_group("adhoc") == "adhoc"  # a single run: its study


def test_pareto_front():
    # (GMACs, accuracy): lower MACs and higher accuracy win; (2, 80) is beaten by (1, 85)
    points = [(1.0, 85.0), (2.0, 80.0), (3.0, 90.0), (3.5, 89.0)]
    assert pareto(points, higher_x_better=False) == [0, 2]
    assert pareto(points, higher_x_better=True) == [2, 3]  # (images/s, accuracy): higher is better on both
