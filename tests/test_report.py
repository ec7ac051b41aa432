"""The sweep report (vittm.studies.report) on job folders faked by the tests: what a training job leaves behind
(metrics.json, .hydra/config.yaml, .hydra/overrides.yaml), without training anything."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import vittm.studies.report as report_module
from vittm.studies.report import main, report, significant

BASE_CONFIG = {
    "seed": 0, "output_dir": "${hydra:runtime.output_dir}",
    "model": {"name": "vittm_fmnist", "embed_dim": 64, "img_size": 28, "rw_head": "lin", "memory_ps": 4,
              "process_ps": 7},
    "data": {"dataset": "fashion_mnist", "batch_size": 128, "train_subset": 12800, "val_split": 5000,
             "img_size": "${model.img_size}", "num_workers": 0},
    "optimizer": {"opt": "adamw", "lr": 1e-3, "betas": [0.9, 0.999]},
    "schedule": {"name": "cosine", "warmup_steps": 500},
    "trainer": {"max_epochs": 3, "max_steps": -1, "log_every_n_steps": 50},
    "ema": {"enabled": True, "decay": 0.999},
}


def fake_job(root: Path, name: str, overrides: list[str], val: float, test: float | None = None, *,
             macs: float = 3.62e6, ips: float = 500.0, steps: int = 300) -> Path:
    """A finished job folder; ``val``/``test``: its acc1 (the other heads a little below); ``test=None``: an older
    metrics.json, from before the test split was evaluated."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    cfg = OmegaConf.create(BASE_CONFIG)
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    metrics = {"status": "ok", "final": {"val/acc1": val, "val/memory_acc1": val, "val/process_acc1": val - 0.01},
               "params": 287_000, "macs": macs, "steps": steps, "train_images_per_s": ips, "wall_seconds": 60.0,
               "overrides": overrides, "fit": {"total_steps": steps, "warmup_steps": 75, "ema_decay": 0.98889}}
    if test is not None:
        metrics["test"] = {"test/acc1": test, "test/memory_acc1": test, "test/process_acc1": test - 0.02,
                           "test_ema/memory_acc1": test - 0.05}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def table_rows(md: str, section: str = "## Results") -> list[dict[str, str]]:
    """The markdown table that follows ``section`` as dicts by column name."""
    after = md.split(section, 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    end = next((i for i, line in enumerate(after[start:], start) if not line.startswith("|")), len(after))
    head, _, *body = ([c.strip() for c in line.strip("|").split("|")] for line in after[start:end])
    return [dict(zip(head, cells, strict=True)) for cells in body]


def test_val_and_test_side_by_side_full_precision_csv(tmp_path):
    fake_job(tmp_path, "0_model.rw_head=lin", ["model.rw_head=lin"], 0.80, 0.78)
    fake_job(tmp_path, "1_model.rw_head=ca", ["model.rw_head=ca"], 0.85, 0.83, macs=1.1e7)
    report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    rows = {r["model.rw_head"]: r for r in table_rows(md)}
    assert rows["lin"]["val acc1 %"] == "80.00" and rows["lin"]["test acc1 %"] == "78.00"
    assert rows["lin"]["test process_acc1 %"] == "76.00" and rows["lin"]["test ema_memory_acc1 %"] == "73.00"
    assert "val process_acc1 %" not in rows["lin"]  # with a test split, val only for what selects
    assert rows["lin"]["GMACs"] == "0.00362" and rows["ca"]["GMACs"] == "0.0110"  # 3 significant figures
    with open(tmp_path / "report.csv") as f:
        by_job = {r["job"]: r for r in csv.DictReader(f)}
    assert float(by_job["0_model.rw_head=lin"]["gmacs"]) == 3.62e6 / 1e9  # full precision
    assert float(by_job["0_model.rw_head=lin"]["test_acc1"]) == 0.78
    assert float(by_job["1_model.rw_head=ca"]["val_acc1"]) == 0.85


def test_older_metrics_without_test_still_report(tmp_path):
    fake_job(tmp_path, "0_model.rw_head=lin", ["model.rw_head=lin"], 0.80)
    fake_job(tmp_path, "1_model.rw_head=ca", ["model.rw_head=ca"], 0.85)
    result = report(tmp_path)
    assert all(r["test_acc1"] is None for r in result["rows"])
    with open(tmp_path / "report.csv") as f:
        assert all(r["test_acc1"] == "" and r["val_acc1"] for r in csv.DictReader(f))  # test columns empty
    md = (tmp_path / "report.md").read_text()
    rows = {r["model.rw_head"]: r for r in table_rows(md)}
    assert rows["ca"]["val process_acc1 %"] == "84.00" and not any(k.startswith("test") for k in rows["ca"])
    assert rows["lin"]["gap to best (val acc1, points)"] == "5.00"
    assert "no test metrics" in md


@pytest.mark.parametrize(("value", "want"), [(0.00362, "0.00362"), (0.0202, "0.0202"), (17.56, "17.6"),
                                             (1234.4, "1234"), (0.0, "0")])
def test_significant_figures(value, want):
    assert significant(value) == want


def test_budget_lists_the_settings_common_to_all_jobs(tmp_path):
    fake_job(tmp_path, "0", ["model.rw_head=lin", "optimizer.lr=0.004"], 0.80, 0.78)
    fake_job(tmp_path, "1", ["model.rw_head=ca", "optimizer.lr=0.004"], 0.85, 0.83)
    report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    budget = md.split("## Budget", 1)[1].split("## Results", 1)[0]
    model_line = next(line for line in budget.splitlines() if line.startswith("- model:"))
    assert "rw_head" not in model_line and "embed_dim=64" in model_line  # the swept key is the table's column
    assert "lr=0.004" in budget and "betas=[0.9, 0.999]" in budget
    assert "batch_size=128" in budget and "train_subset=12800" in budget and "val_split=5000" in budget
    assert "img_size=28" in budget  # data.img_size's ${model.img_size}, resolved
    assert "max_epochs=3" in budget and "max_steps=-1" in budget and "decay=0.999" in budget
    assert "num_workers" not in budget and "log_every_n_steps" not in budget and "output_dir" not in budget
    assert "- optimizer steps run: 300" in budget
    assert "- warmup steps (fitted to the run): 75" in budget and "- EMA decay (fitted to the run): 0.98889" in budget


def test_seeds_wording(tmp_path):
    one, three = tmp_path / "one", tmp_path / "three"
    fake_job(one, "0", ["model.rw_head=lin"], 0.80, 0.78)
    fake_job(one, "1", ["model.rw_head=ca"], 0.85, 0.83)
    report(one)
    md = (one / "report.md").read_text()
    assert "there is no spread" in md and "±" not in md.split("## Results", 1)[1].split("\n\n")[1]  # no ± in the table
    assert all(r["gap > 2 SE"] in ("n/a", "–") for r in table_rows(md))
    for i, (seed, acc) in enumerate([(0, 0.80), (1, 0.82), (2, 0.84)]):
        fake_job(three, str(i), [f"seed={seed}"], acc, acc)
    report(three)
    md = (three / "report.md").read_text()
    assert "Mean ± sample std over 3 seeds." in md
    assert table_rows(md)[0]["test acc1 %"] == "82.00 ± 2.00"  # the sample std of 80, 82, 84


def test_gap_to_best_and_what_the_seeds_support(tmp_path):
    accs = {"a": [0.90, 0.91, 0.92], "b": [0.80, 0.81, 0.82], "c": [0.87, 0.90, 0.93], "d": [0.70]}
    for head, values in accs.items():
        for seed, acc in enumerate(values):
            fake_job(tmp_path, f"{head}{seed}", [f"model.rw_head={head}", f"seed={seed}"], acc, acc)
    report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    rows = {r["model.rw_head"]: r for r in table_rows(md)}
    gap, verdict = "gap to best (test acc1, points)", "gap > 2 SE"
    assert (rows["a"][gap], rows["a"][verdict]) == ("best", "–")
    assert (rows["b"][gap], rows["b"][verdict]) == ("10.00", "yes")  # 10 points, SE sqrt(2 x 1²/3) = 0.82
    assert (rows["c"][gap], rows["c"][verdict]) == ("1.00", "no")  # SE sqrt(1²/3 + 3²/3) = 1.83
    assert (rows["d"][gap], rows["d"][verdict]) == ("21.00", "n/a")  # one seed: no spread to test against
    assert "sqrt(s1²/n1 + s2²/n2)" in md


def test_throughput_measured_under_load_is_said(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.__setitem__(path.name, fig))
    fake_job(tmp_path, "0", ["model.rw_head=lin"], 0.80, 0.78, ips=600)
    fake_job(tmp_path, "1", ["model.rw_head=ca"], 0.85, 0.83, ips=400)
    report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "train img/s (shared CPU)" in table_rows(md)[0]
    assert md.count("other jobs shared the CPU") >= 2  # under the table and by the plots
    ax = figures["acc_vs_throughput.png"].axes[0]
    assert "shared the CPU" in ax.get_title() and "sharing the CPU" in ax.get_xlabel()
    assert ax.get_ylabel().startswith("test top-1")  # the plots show the reported (test) accuracy


def point_colours(ax) -> dict[str, tuple]:
    """Legend label -> colour of that configuration's marker."""
    return {c.get_label(): tuple(c.lines[0].get_color()) for c in ax.containers}


def test_one_colour_per_configuration_across_figures(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.__setitem__(path.name, fig))
    for i, head in enumerate(["lin", "ca", "tl", "la"]):
        fake_job(tmp_path, str(i), [f"model.rw_head={head}"], 0.8 + i / 100, 0.78 + i / 100, ips=600 - 50 * i)
    report(tmp_path)
    macs, speed = (point_colours(figures[f].axes[0]) for f in ("acc_vs_macs.png", "acc_vs_throughput.png"))
    assert set(macs) == {"lin", "ca", "tl", "la"} and macs == speed
    assert len(set(macs.values())) == 4  # and distinct between configurations


def test_heatmap_panels_share_one_colour_scale(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.__setitem__(path.name, fig))
    i = 0
    for head, offset in (("lin", 0.0), ("ca", 0.1)):  # the ca panel is 10 points better everywhere
        for mem in (4, 7):
            for proc in (7, 14):
                acc = 0.7 + offset + mem / 100 + proc / 1000
                fake_job(tmp_path, str(i), [f"model.rw_head={head}", f"model.memory_ps={mem}",
                                            f"model.process_ps={proc}"], acc, acc)
                i += 1
    result = report(tmp_path)
    assert {f.name for f in result["files"]} >= {"heatmap.png"}
    fig = figures["heatmap.png"]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    assert len(fig.axes) == 3  # the two panels and a single colorbar
    clims = {ax.images[0].get_clim() for ax in panels}
    assert len(clims) == 1
    low, high = clims.pop()
    assert math.isclose(low, 100 * (0.7 + 0.04 + 0.007)) and math.isclose(high, 100 * (0.8 + 0.07 + 0.014))


def study(root: Path) -> tuple[Path, Path]:
    """A study's two stages: seed 0 over an lr grid for two heads (``tune``), then seeds 1 and 2 at each head's
    chosen lr in folders of their own (``seeds/<configuration>/``)."""
    tune, seeds = root / "tune", root / "seeds"
    val = {("lin", "1e-3"): 0.80, ("lin", "2e-3"): 0.84, ("lin", "4e-3"): 0.82,
           ("ca", "1e-3"): 0.86, ("ca", "2e-3"): 0.85, ("ca", "4e-3"): 0.70}
    for i, ((head, lr), acc) in enumerate(val.items()):
        # the test split favours lin's 4e-3: selection must not look at it
        test = 0.95 if (head, lr) == ("lin", "4e-3") else acc - 0.02
        fake_job(tune, f"{i}_rw", [f"model.rw_head={head}", f"optimizer.lr={lr}", "seed=0"], acc, test)
    for head, lr, accs in (("lin", "2e-3", (0.78, 0.79)), ("ca", "1e-3", (0.84, 0.85))):
        for seed, acc in enumerate(accs, 1):
            # lin's extra seeds are worse than its seed 0: over all its seeds 2e-3 averages below 4e-3's one seed
            fake_job(seeds / f"model.rw_head_{head}", f"{seed - 1}_seed={seed}",
                     [f"model.rw_head={head}", f"optimizer.lr={lr}", f"seed={seed}"], acc, acc - 0.02)
    return tune, seeds


def test_tune_pools_sweep_folders_and_chooses_on_validation(tmp_path):
    tune, seeds = study(tmp_path)
    result = report([tune, seeds], tmp_path / "out", tune="optimizer.lr")
    assert len(result["rows"]) == 10 and len({r["job"] for r in result["rows"]}) == 10  # pooled, unambiguous
    assert {r["job"].split("/")[0] for r in result["rows"]} == {"tune", "seeds"}
    md = (tmp_path / "out" / "report.md").read_text()
    rows = {r["model.rw_head"]: r for r in table_rows(md)}
    assert set(rows) == {"lin", "ca"}  # one row per configuration
    assert (rows["lin"]["optimizer.lr"], rows["lin"]["seeds"]) == ("2e-3", "3")  # seed 0 chose it, not the test
    assert (rows["ca"]["optimizer.lr"], rows["ca"]["seeds"]) == ("1e-3", "3")
    assert rows["lin"]["val acc1 %"] == "80.33 ± 3.21"  # mean ± sample std of 84, 78, 79
    assert rows["lin"]["test acc1 %"] == "78.33 ± 3.21"
    grid = table_rows(md, "## Tuning grid")
    assert len(grid) == 6
    chosen = {(r["model.rw_head"], r["optimizer.lr"]) for r in grid if r["chosen"] == "yes"}
    assert chosen == {("lin", "2e-3"), ("ca", "1e-3")}
    lin = {r["optimizer.lr"]: r for r in grid if r["model.rw_head"] == "lin"}
    assert [r["optimizer.lr"] for r in grid if r["model.rw_head"] == "lin"] == ["1e-3", "2e-3", "4e-3"]  # numeric
    assert (lin["2e-3"]["seeds"], lin["2e-3"]["val acc1 % compared (seeds)"]) == ("3", "84.00 (0)")
    assert lin["4e-3"]["val acc1 % (all its seeds)"] == "82.00"
    with open(tmp_path / "out" / "report.csv") as f:
        header = next(csv.reader(f))
    assert {"model.rw_head", "optimizer.lr", "seed", "val_acc1", "test_acc1"} <= set(header)


def test_tune_plots_use_the_chosen_rows_and_test_accuracy(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.__setitem__(path.name, fig))
    report(list(study(tmp_path)), tmp_path / "out", tune="optimizer.lr")
    ax = figures["acc_vs_macs.png"].axes[0]
    points = {c.get_label(): c.lines[0].get_ydata()[0] for c in ax.containers}
    assert points == pytest.approx({"lin": 100 * (0.82 + 0.76 + 0.77) / 3, "ca": 100 * (0.84 + 0.82 + 0.83) / 3})


def test_cli_several_folders(tmp_path, capsys):
    tune, seeds = study(tmp_path)
    main([str(tune), str(seeds), "--out", str(tmp_path / "out"), "--tune", "optimizer.lr", "--select", "memory_acc1"])
    printed = capsys.readouterr().out
    assert "## Tuning grid" in printed and "val memory_acc1 %" in printed
    with pytest.raises(SystemExit, match="give --out"):
        report([tune, seeds])
    with pytest.raises(SystemExit, match="--tune model.depth: no job overrides it"):
        report(tune, tmp_path / "x", tune="model.depth")


def test_no_finished_job_yet(tmp_path):
    """Every job failed or still running: the report says so, with its budget, rather than failing."""
    failed = tmp_path / "0_model.rw_head=lin,model.memory_ps=5"
    fake_job(tmp_path, failed.name, ["model.rw_head=lin", "model.memory_ps=5"], 0.0)
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "ConfigError: memory_ps=5",
                                                     "overrides": ["model.rw_head=lin", "model.memory_ps=5"]}))
    running = tmp_path / "1_model.rw_head=ca,model.memory_ps=7" / ".hydra"
    running.mkdir(parents=True)
    (running / "overrides.yaml").write_text("- model.rw_head=ca\n- model.memory_ps=7\n")
    result = report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "2 jobs: 0 ok, 1 failed, 1 no result yet." in md and "No finished job yet." in md
    assert "ConfigError: memory_ps=5" in md and "- 1_model.rw_head=ca,model.memory_ps=7" in md
    assert "heatmap.png" not in {f.name for f in result["files"]}


def test_select_a_head_a_baseline_does_not_have(tmp_path):
    for i, lr in enumerate(["1e-3", "2e-3"]):
        fake_job(tmp_path, f"{i}", ["model.name=vittm_fmnist", f"optimizer.lr={lr}"], 0.80 + i / 100, 0.8)
        vit = fake_job(tmp_path, f"vit{i}", ["model.name=vit_fmnist", f"optimizer.lr={lr}"], 0.82 - i / 100, 0.8)
        metrics = json.loads((vit / "metrics.json").read_text())
        metrics["final"] = {"val/acc1": metrics["final"]["val/acc1"]}  # one head only
        (vit / "metrics.json").write_text(json.dumps(metrics))
    report(tmp_path, tune="optimizer.lr", select="memory_acc1")
    rows = {r["model.name"]: r for r in table_rows((tmp_path / "report.md").read_text())}
    assert rows["vittm_fmnist"]["optimizer.lr"] == "2e-3" and rows["vit_fmnist"]["optimizer.lr"] == "1e-3"


def test_pooled_sweeps_fill_a_key_a_job_did_not_set_from_its_own_config(tmp_path):
    """One sweep varies model.memory_ps, a reused job of another study ran the default without overriding it: the
    report reads that job's value from its own .hydra/config.yaml (a group's choice from .hydra/hydra.yaml), so the
    default row is compared with the others instead of standing apart with an empty cell."""
    a, b = tmp_path / "patch", tmp_path / "reused"
    fake_job(a, "0", ["model.memory_ps=7", "seed=0"], val=0.80, test=0.79)
    fake_job(a, "1", ["model.memory_ps=7", "seed=1"], val=0.81, test=0.80)
    for seed in (0, 1):
        job = fake_job(b, str(seed), ["rw_head=lin", f"seed={seed}"], val=0.78, test=0.77)
        OmegaConf.save({"hydra": {"runtime": {"choices": {"rw_head": "lin", "model": "vittm_fmnist"}}}},
                       job / ".hydra" / "hydra.yaml")
    for seed in (0, 1):  # the patch jobs ran rw_head=lin too, by default
        OmegaConf.save({"hydra": {"runtime": {"choices": {"rw_head": "lin"}}}}, a / str(seed) / ".hydra" / "hydra.yaml")
    rows = table_rows(report([a, b], out=tmp_path / "out")["files"][1].read_text())
    assert [r["model.memory_ps"] for r in rows] == ["7", "4"]  # 4: the reused jobs' own config
    assert "rw_head" not in rows[0]  # lin everywhere once filled: not a swept column


def test_tune_prints_each_configurations_validation_choice(tmp_path, capsys):
    """vittm.studies.tune makes the report's choice (validation only) into the overrides of the second stage."""
    from vittm.studies.tune import main as tune

    sweep = tmp_path / "tune"
    for i, (head, lr, val, test) in enumerate([("lin", "0.002", 0.70, 0.90), ("lin", "0.004", 0.80, 0.10),
                                               ("ca", "0.002", 0.85, 0.10), ("ca", "0.004", 0.75, 0.95)]):
        fake_job(sweep, f"{i}", [f"rw_head={head}", f"optimizer.lr={lr}", "seed=0"], val=val, test=test)
    tune([str(sweep)])
    assert capsys.readouterr().out.splitlines() == [  # the test split's preference plays no part
        "rw_head=ca optimizer.lr=0.002 # val/acc1 0.8500", "rw_head=lin optimizer.lr=0.004 # val/acc1 0.8000"]
