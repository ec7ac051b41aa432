"""The command line checked before Hydra and torch (cli.py): one ``error:`` line with a did-you-mean for an override
that cannot work, nothing in the way of a valid one, and no torch imported before Hydra parses."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, run_cli

sys.path.insert(0, str(ROOT))  # cli.py sits beside run.py, outside the vittm package
import cli  # noqa: E402


@pytest.mark.parametrize(("argv", "expected"), [
    (["trainer.max_epoch=1"], "trainer.max_epoch=1: no key trainer.max_epoch in the config; "
                              "did you mean trainer.max_epochs=1?"),
    (["batch_size=64"], "did you mean data.batch_size=64 or summary.batch_size=64?"),  # mode=summary's, moved
    (["model=vittm_bse"], "model=vittm_bse: model has no option vittm_bse; did you mean model=vittm_base,"),
    (["modle=vittm_base"], "did you mean model=vittm_base?"),
    (["rw_heads=ca"], "did you mean rw_head=ca?"),
    (["traner.max_epochs=3"], "did you mean trainer.max_epochs=3?"),
    (["model.lr=0.1"], "did you mean optimizer.lr=0.1?"),
    (["hydra.run.dri=/tmp/x"], "did you mean hydra.run.dir=/tmp/x?"),
    (["~trainer.max_epoch"], "did you mean ~trainer.max_epochs?"),
    (["data={batch_sise: 8}"], "no key data.batch_sise in the config; did you mean data.batch_size?"),
    (["+seed=1"], "+seed=1: seed is already in the config; to change it: seed=1"),
    (["seed=0,1"], "seed=0,1: several values need a multirun: python run.py -m seed=0,1"),
    (["x=[1"], "x=[1: not a valid override (no viable alternative at input '[1'"),
    (["trainer.max_epochs"], "trainer.max_epochs: not an override: key=value"),
    (["logger=[csv,wandbb]"], "logger has no option wandbb; did you mean logger=wandb?"),
    (["-m", "rw_head=lin,cax"], "rw_head=lin,cax: rw_head has no option cax; did you mean rw_head=ca"),
    (["-m", "optimizer.lrr=interval(0.1,1)"], "did you mean optimizer.lr=interval(0.1,1)?"),
    (["-m", "hydra.run.dir=a,b"], "Hydra's own settings cannot be swept"),
    (["-m", "sweep=rw_heads", "model.memory_pss=2"], "did you mean model.memory_ps=2?"),
    (["experiment=null"], "experiment=null: a group takes an option; to select none: ~experiment"),
    (["--cfg", "job", "optimizer.lrr=1"], "did you mean optimizer.lr=1?"),
])
def test_mistakes_get_one_line_and_a_suggestion(argv, expected):
    problem = cli.override_problem(argv)
    assert problem is not None and expected in problem and "\n" not in problem
    assert "+trainer" not in problem and "To append" not in problem  # never an append a component would reject


@pytest.mark.parametrize("argv", [
    ["--help"], ["--hydra-help"], ["--cfg", "job"], ["--version"], ["summary.batch_size=2", "summary.threads=1"],
    ["trainer.max_epochs=1", "data.batch_size=64", "hydra.run.dir=/tmp/x", "hydra.job.chdir=false"],
    ["+foo=1"], ["~ema"], ["++seed=3"], ["logger=[csv,wandb]"], ["hydra/launcher=joblib"], ["~experiment"],
    ["+model.write_head={name: lca, latent_size_scale: 2}"], ["study='a b'"],
    ["-m", "seed=0,1", "rw_head=lin,ca"], ["-m", "sweep=rw_heads"], ["-m", "sweep=optuna"],
    ["-m", "sweep=patch_sizes", "model.memory_ps=4,7", "rw_head.latent_size_scale=1,4", "hydra/launcher=joblib",
     "hydra.launcher.n_jobs=2"],  # experiments/patch_latent
    ["-m", "rw_head=glob(*)"], ["-m", "seed=range(0,3)"], ["-m", "optimizer.lr=interval(0.001,0.01)"],
    ["-cp", "/elsewhere", "-cn", "config.yaml", "anything=1"],  # a saved config (Lightning's DDP children): Hydra's
])
def test_valid_command_lines_pass(argv):
    assert cli.override_problem(argv) is None


def test_run_py_refuses_with_status_2_and_one_line(tmp_path):
    proc = run_cli(tmp_path, "trainer.max_epoch=1")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: trainer.max_epoch=1: no key trainer.max_epoch in the config; did you mean trainer.max_epochs=1?"]
    assert not list(tmp_path.iterdir())  # no run folder made


def test_nothing_heavy_imported_before_hydra_parses():
    code = ("import sys; sys.argv = ['run.py']; import run; run.cli.override_problem(['trainer.max_epochs=1', "
            "'-m', 'rw_head=lin,ca']); heavy = {m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'timm', 'torchvision', 'lightning', 'vittm', 'wandb'}; print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_lists_every_group_and_the_composed_config(tmp_path):
    """Answered by cli.answer_help (Hydra's own help re-reads the config repository once per group: seconds)."""
    proc = run_cli(tmp_path, "model=vittm_test", "--help")
    assert proc.returncode == 0, proc.stderr
    for group in ("rw_head: ca, dyna, la, lca, lin, tl", "fusion: add_erase, erase, residual", "trainer: cpu,"):
        assert group in proc.stdout
    assert "img_size: 32" in proc.stdout and "hydra:" not in proc.stdout.split("== Config ==")[1][:200]
    bad = run_cli(tmp_path, "model=vittm_bse", "--help")
    assert bad.returncode == 2 and bad.stderr.startswith("error: model=vittm_bse: model has no option vittm_bse")
