"""The sweep report (vittm.studies.report) and tune (vittm.studies.tune) on faked segmentation job folders: the same
tables, choice and plots as for classification, in mIoU."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import vittm.studies.report as report_module
from tests.test_report import fake_job, table_rows
from vittm.studies.report import main, report
from vittm.studies.tune import main as tune_main

SEG_CONFIG = {
    "seed": 0, "task": {"name": "segmentation"},
    "model": {"name": "vittm_scenes", "memory_ps": 4, "process_ps": 8},
    "data": {"dataset": "fmnist_scenes", "batch_size": 64, "val_split": 1000, "num_workers": 0,
             "pipeline": {"crop_size": 64, "flip_prob": 0.5}},
    "decoder": {"name": "segmenter", "n_layers": 2},
    "optimizer": {"opt": "adamw", "lr": 1e-3},
    "trainer": {"max_epochs": -1, "max_steps": 300},
}
# decoder x lr -> val and test mIoU of seeds 0 and 1: the validation split chooses segmenter 1e-3 and linear 2e-3,
# the test split would choose the other lr of each
MIOU = {("segmenter", "1e-3"): ([0.50, 0.52], [0.40, 0.42]), ("segmenter", "2e-3"): ([0.45, 0.47], [0.60, 0.62]),
        ("linear", "1e-3"): ([0.30, 0.32], [0.55, 0.57]), ("linear", "2e-3"): ([0.40, 0.44], [0.36, 0.40])}


def seg_job(root: Path, name: str, overrides: list[str], val: float, test: float | None, **metrics) -> Path:
    """A finished segmentation job as run.py leaves it; ``val``/``test``: its mIoU (pixel accuracy 0.3 above, the
    EMA weights 0.01 below); ``test=None``: a dataset without a separate test split."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    cfg = OmegaConf.create(SEG_CONFIG)
    for override in overrides:
        OmegaConf.update(cfg, *override.split("=", 1))
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")

    def split(prefix: str, miou: float) -> dict[str, float]:
        values = {"miou": miou, "pixel_acc": miou + 0.3, "macc": miou + 0.1}
        return ({f"{prefix}/{k}": v for k, v in values.items()} | {f"{prefix}/loss": 0.8}
                | {f"{prefix}_ema/{k}": v - 0.01 for k, v in values.items()})

    (folder / "metrics.json").write_text(json.dumps({
        "status": "ok", "task": "segmentation", "model": "vittm_scenes", "label": "ViTTM scenes",
        "final": split("val", val), "test": None if test is None else split("test", test),
        "best": {"val/miou": val, "val_ema/miou": val - 0.01}, "params": 1_500_000, "macs": 2e8, "steps": 300,
        "train_images_per_s": 200.0, "wall_seconds": 90.0, "overrides": overrides,
        "fit": {"total_steps": 300, "warmup_steps": 30, "ema_decay": 0.99}} | metrics))
    return folder


def seg_sweep(root: Path, with_test: bool = True) -> Path:
    """2 decoders x 2 lrs x 2 seeds (the linear decoder cheaper and faster), a failed job and one still running."""
    for i, ((decoder, lr), (vals, tests)) in enumerate(MIOU.items()):
        for seed in (0, 1):
            seg_job(root, f"{2 * i + seed}", [f"decoder.name={decoder}", f"optimizer.lr={lr}", f"seed={seed}"],
                    vals[seed], tests[seed] if with_test else None,
                    macs=2e8 if decoder == "segmenter" else 1e8, train_images_per_s=200.0 if decoder == "segmenter"
                    else 300.0)
    overrides = ["decoder.name=linear", "optimizer.lr=4e-3", "seed=0"]
    failed = seg_job(root, "8", overrides, 0.0, None)  # as sweep.py writes it: no task, the config says
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: NaN loss",
                                                     "overrides": overrides}))
    (root / "9" / ".hydra").mkdir(parents=True)
    (root / "9" / ".hydra" / "overrides.yaml").write_text("- decoder.name=linear\n- optimizer.lr=8e-3\n- seed=0\n")
    return root


def test_tune_chooses_on_val_miou_and_reports_test_miou(tmp_path):
    sweep = seg_sweep(tmp_path / "sweep")
    result = report(sweep, tune="optimizer.lr")
    assert [f.name for f in result["files"]] == ["report.csv", "report.md", "miou_vs_macs.png",
                                                   "miou_vs_throughput.png"]
    assert all(f.stat().st_size > 0 for f in result["files"])
    with open(sweep / "report.csv") as f:
        by_job = {r["job"]: r for r in csv.DictReader(f)}
    assert {"val_miou", "test_miou", "val_pixel_acc", "test_pixel_acc", "val_ema_miou", "test_ema_pixel_acc",
            "decoder.name", "optimizer.lr", "seed"} <= set(by_job["0"])
    assert not any("acc1" in column for column in by_job["0"])
    assert (float(by_job["3"]["val_miou"]), float(by_job["3"]["test_miou"])) == (0.47, 0.62)
    assert float(by_job["3"]["test_pixel_acc"]) == 0.62 + 0.3 and float(by_job["3"]["val_ema_miou"]) == 0.47 - 0.01
    assert by_job["8"]["status"] == "failed" and by_job["9"]["status"] == "no result yet"

    md = (sweep / "report.md").read_text()
    rows = {r["decoder.name"]: r for r in table_rows(md)}
    assert (rows["segmenter"]["optimizer.lr"], rows["linear"]["optimizer.lr"]) == ("1e-3", "2e-3")  # not the test's
    assert rows["segmenter"]["seeds"] == "2"
    assert rows["segmenter"]["val mIoU %"] == "51.00 ± 1.41" and rows["segmenter"]["test mIoU %"] == "41.00 ± 1.41"
    assert rows["linear"]["test mIoU %"] == "38.00 ± 2.83" and rows["linear"]["test pixel_acc %"] == "68.00 ± 2.83"
    assert rows["linear"]["gap to best (test mIoU, points)"] == "3.00"
    grid = table_rows(md, "## Tuning grid")
    assert {(r["decoder.name"], r["optimizer.lr"]) for r in grid if r["chosen"] == "yes"} == {
        ("segmenter", "1e-3"), ("linear", "2e-3")}
    assert grid[0]["val mIoU % compared (seeds)"] == "31.00 (0, 1)"  # linear 1e-3, first in order
    assert "best mean val mIoU" in md and "Gap: points of mean test mIoU" in md and "`miou`: the mean" in md
    assert "acc1" not in md and "top-1" not in md
    budget = md.split("## Budget", 1)[1].split("## Results", 1)[0]
    assert "- decoder: n_layers=2" in budget and "pipeline.crop_size=64" in budget  # the swept name is a column
    assert "RuntimeError: NaN loss" in md.split("## Failed jobs", 1)[1]
    assert "- 9" in md.split("## Without a result yet", 1)[1]


def test_plots_show_test_miou_or_validation_without_a_test_split(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.__setitem__(path.name, fig))
    report(seg_sweep(tmp_path / "test"))  # no --tune: decoder x lr, a heat-map
    assert set(figures) == {"miou_vs_macs.png", "miou_vs_throughput.png", "heatmap.png"}
    ax = figures["miou_vs_macs.png"].axes[0]
    assert ax.get_ylabel().startswith("test mIoU %")
    points = {c.get_label(): c.lines[0].get_ydata()[0] for c in ax.containers}
    assert points["segmenter,2e-3"] == pytest.approx(61.0) and points["linear,1e-3"] == pytest.approx(56.0)
    assert any(line.get_label() == "Pareto front" for line in ax.lines)
    assert figures["heatmap.png"].axes[-1].get_ylabel() == "test mIoU %"  # the colorbar

    figures.clear()
    sweep = seg_sweep(tmp_path / "val", with_test=False)
    report(sweep, tune="optimizer.lr")
    assert figures["miou_vs_throughput.png"].axes[0].get_ylabel().startswith("val mIoU %")
    md = (sweep / "report.md").read_text()
    rows = {r["decoder.name"]: r for r in table_rows(md)}
    assert rows["linear"]["gap to best (val mIoU, points)"] == "9.00" and "no test metrics" in md
    assert rows["linear"]["val ema_mIoU %"] == "41.00 ± 2.83" and not any(k.startswith("test") for k in rows["linear"])


def test_select_belongs_to_the_task(tmp_path, capsys):
    sweep = seg_sweep(tmp_path / "sweep")
    with pytest.raises(SystemExit, match="--select memory_acc1: segmentation jobs: choose one of miou, ema_miou, "
                                         "pixel_acc$"):
        report(sweep, tune="optimizer.lr", select="memory_acc1")
    main([str(sweep), "--tune", "optimizer.lr", "--select", "pixel_acc"])
    assert "| val pixel_acc % (all its seeds) |" in capsys.readouterr().out


def test_a_report_is_for_one_task(tmp_path):
    seg = seg_job(tmp_path, "seg", ["optimizer.lr=1e-3"], 0.5, 0.4)
    cls = fake_job(tmp_path, "cls", ["optimizer.lr=2e-3"], 0.8, 0.8)  # an older metrics.json: no task, classification
    with pytest.raises(SystemExit) as err:
        report(tmp_path)
    message = str(err.value)
    assert message.startswith("error: jobs of different tasks") and "\n" not in message
    assert f"{cls.resolve()} is classification" in message and f"{seg.resolve()} is segmentation" in message


def test_tune_prints_the_val_miou_choice(tmp_path, capsys):
    sweep = seg_sweep(tmp_path / "sweep")
    tune_main([str(sweep)])
    assert capsys.readouterr().out.splitlines() == [  # the test split would choose the other lr of each
        "decoder.name=linear optimizer.lr=2e-3 # val/miou 0.4200",
        "decoder.name=segmenter optimizer.lr=1e-3 # val/miou 0.5100"]
    with pytest.raises(SystemExit, match="--select acc1: segmentation jobs"):
        tune_main([str(sweep), "--select", "acc1"])
