"""`python run.py ...` as a user runs it, in a subprocess writing into a temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_summary_job(tmp_path):
    proc = run(tmp_path, "model=vittm_test", "rw_head=ca", "fusion=add_erase", "batch_size=2")
    assert proc.returncode == 0, proc.stderr
    assert "vittm_test:" in proc.stdout and "'memory': [2, 1000], 'process': [2, 1000]" in proc.stdout
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_cfg_job_prints_the_resolved_config(tmp_path):
    proc = run(tmp_path, "model=vittm_base", "rw_head=lin", "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    assert "name: vittm_base" in proc.stdout and "latent_size_scale: 4" in proc.stdout


def test_bad_values_fail_with_one_clear_line(tmp_path):
    proc = run(tmp_path, "model=vittm_test", "model.memory_ps=5")
    assert proc.returncode != 0
    assert "img_size=32x32 is not divisible by memory_ps=5" in proc.stderr
    proc = run(tmp_path, "rw_head=lni")
    assert proc.returncode != 0 and "Could not find 'rw_head/lni'" in proc.stderr
    assert "lin" in proc.stderr  # Hydra lists the available options
