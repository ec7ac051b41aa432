"""Gather sweeps into tables and plots: ``python -m vittm.studies.report DIR [DIR ...] [--out OUT] [--tune KEY]
[--select HEAD]`` (``make report``).

``DIR``: a multirun folder (``hydra.sweep.dir``), or a folder of them (searched three levels down, e.g. a study's
``seeds1/<configuration>/`` folders). The jobs of every ``DIR`` are pooled: a study's tuning sweep (seed 0 over a
grid) and its extra-seed sweeps at the chosen values report as one table. The jobs' task (metrics.json's ``task``,
else their config's ``task.name``; classification for older files) decides the metrics (``TASKS``): top-1 accuracy
(``acc1``) for classification, mIoU (``miou``, with ``pixel_acc`` beside it) for segmentation. A report is for one
task: jobs of two are refused.

- ``--out OUT``: where to write (default: ``DIR`` when there is one; required with several);
- ``--tune KEY`` (e.g. ``optimizer.lr``): per configuration (the swept values other than ``seed`` and ``KEY``), the
  ``KEY`` value with the best mean validation ``--select`` is chosen, compared over the seeds every value of that
  configuration ran (so that seeds added at the chosen value afterwards cannot change the choice). The main table
  has one row per configuration at its chosen value, a second table the whole grid, and the plots use the chosen
  rows;
- ``--select HEAD``: the validation metric that chooses, by default the task's main one. Classification: ``acc1``
  (default: ``val/acc1``, what ``model(x)`` returns), ``memory_acc1``, ``process_acc1``, ``ema_memory_acc1``,
  ``ema_process_acc1``; a configuration without that head (a baseline ViT's only head is ``acc1``) is chosen by
  ``acc1``. Segmentation: ``miou`` (default: ``val/miou``), ``ema_miou``, ``pixel_acc``.

Reads every job folder's ``metrics.json`` (written by run.py for finished and failed jobs; ``final``: the validation
split, ``test``: the test split once with the selected checkpoint, absent in older files) and ``.hydra/config.yaml``;
for jobs still running or killed, ``.hydra/overrides.yaml``, so a partial sweep reports too. Writes into ``OUT``:

- ``report.csv``: one row per job (status, swept values, val_* and test_* metrics, GMACs, params, images/s, wall
  time, steps, error), numbers at full precision;
- ``report.md``: the budget (every setting the same for all jobs, the steps run, the fitted warmup and EMA decay),
  one row per configuration with mean ± sample std over its seeds (validation for selection, test reported) and its
  gap to the best row with whether the seeds support it, the tuning grid with ``--tune``, then the failed jobs with
  their errors and the jobs without a result yet;
- ``acc_vs_macs.png`` and ``acc_vs_throughput.png`` (``miou_vs_...`` for segmentation: the main metric on the test
  split, validation for sweeps without a test split) with the Pareto front marked and one colour per configuration in
  both, and ``heatmap.png`` when two or more keys were swept (the first two axes, one panel per value of the others,
  one colour scale for all panels).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vittm.core.figures import colours, significant

SPLITS = {"val": "final", "test": "test"}  # column prefix -> the metrics.json entry holding that split's metrics


@dataclass(frozen=True)
class Task:
    """What the report reads and says for the jobs of one task (metrics.json's ``task``)."""

    name: str
    heads: dict[str, str]  # what --select may name: column suffix -> metric name after the split ("val", "test"),
    # "_ema" marking the EMA weights; the first is the main metric (the default --select, the gap, plots, heat-map)
    also: dict[str, str]  # further columns, reported only
    metric: str  # the main metric in headings and notes
    unit: str  # the plots' axis for it
    of: str  # what it measures, on the plots' axis
    about: str  # the note under the table
    plots: str  # the plots' file names begin with it
    budget: tuple[str, ...] = ()  # config keys of the budget besides BUDGET

    @property
    def main(self) -> str:
        return next(iter(self.heads))

    @property
    def columns(self) -> dict[str, tuple[str, str]]:
        """Column -> (the metrics.json entry, the metric's key in it)."""
        return {f"{split}_{head}": (entry, split + key)
                for split, entry in SPLITS.items() for head, key in (self.heads | self.also).items()}

    def say(self, name: str) -> str:
        """A column or head as headings write it (``val miou`` -> ``val mIoU``)."""
        return name.replace(self.main, self.metric)


TASKS = {task.name: task for task in (
    Task("classification", heads={
        "acc1": "/acc1",  # what model(x) returns: the memory head for ViTTM, the only head for a baseline
        "memory_acc1": "/memory_acc1",
        "process_acc1": "/process_acc1",
        "ema_memory_acc1": "_ema/memory_acc1",
        "ema_process_acc1": "_ema/process_acc1",
    }, also={}, metric="acc1", unit="top-1 %", of="model(x)", plots="acc",
         about="`acc1` is what `model(x)` returns (the memory head of a ViTTM, the only head of a baseline)."),
    Task("segmentation", heads={"miou": "/miou", "ema_miou": "_ema/miou", "pixel_acc": "/pixel_acc"},
         also={"ema_pixel_acc": "_ema/pixel_acc"}, metric="mIoU", unit="mIoU %", of="mean over classes", plots="miou",
         about="`miou`: the mean over the classes of each class's intersection over union (mIoU); `pixel_acc`: the "
               "share of pixels labelled right; `ema_`: with the EMA weights.",
         budget=("decoder.", "data.pipeline.", "data.compose.")),  # the decoder, crops and scenes' recipe
)}
OLDER = "classification"  # the task of a finished job whose metrics.json and config name none (written before tasks)
SELECT_HELP = "; ".join(f"{t.name}: {', '.join(t.heads)}" for t in TASKS.values())
OTHER_COLUMNS = ("gmacs", "params_M", "train_images_per_s", "wall_seconds", "steps")
HEATMAP_FIRST = ("model.memory_ps", "model.process_ps")  # preferred heat-map axes when both were swept
BUDGET = ("seed", "model.", "optimizer.", "schedule.", "ema.", "loss.", "augment.", "data.dataset", "data.batch_size",
          "data.train_subset", "data.val_subset", "data.val_split", "data.img_size", "trainer.max_epochs",
          "trainer.max_steps", "trainer.accumulate_grad_batches")  # config keys (a trailing dot: a whole group)
SHARED_CPU = "measured while other jobs shared the CPU: compare within this report only"




def split_override(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def read_settings(path: Path, budget: tuple[str, ...] = BUDGET) -> dict[str, str] | None:
    """The ``budget`` keys of a job's composed config, flattened to dotted keys, resolved where they can be
    outside Hydra (``${hydra:...}`` cannot), as text."""
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    found: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif any(dotted == b or (b.endswith(".") and dotted.startswith(b)) for b in budget):
                try:
                    value = OmegaConf.select(cfg, dotted, throw_on_resolution_failure=True)
                    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                except OmegaConfBaseException:
                    pass  # keep the interpolation as written
                found[dotted] = text(value)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def read_job(folder: Path, name: str) -> dict[str, Any]:
    """A job folder -> a row (``name``: how the report calls it)."""
    metrics_file, overrides_file = folder / "metrics.json", folder / ".hydra" / "overrides.yaml"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError as err:  # being written right now, or cut short
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {err}"}
    else:
        metrics = {"status": "no result yet"}
    overrides = metrics.get("overrides")
    if overrides is None and overrides_file.is_file():
        overrides = list(OmegaConf.load(overrides_file))
    row: dict[str, Any] = {
        "job": name, "status": metrics.get("status", "ok" if metrics.get("final") else "failed"),
        "overrides": dict(split_override(o) for o in overrides or []), "error": metrics.get("error", ""),
    }
    # a job without a result yet, or failed before its config was written, may not know its task: None
    row["task"] = (metrics.get("task") or job_setting(folder, "task.name")
                   or (OLDER if row["status"] == "ok" else None))
    task = TASKS.get(row["task"], TASKS[OLDER])  # an unknown task is refused by task_of
    for col, (entry, key) in task.columns.items():
        row[col] = (metrics.get(entry) or {}).get(key)
    row["gmacs"] = metrics["macs"] / 1e9 if metrics.get("macs") else None
    row["params_M"] = metrics["params"] / 1e6 if metrics.get("params") else None
    for key in ("train_images_per_s", "wall_seconds", "steps"):
        row[key] = metrics.get(key)
    # warmup and EMA decay as fitted to the run's length (train.py's "fit"; "schedule"/"ema_decay" in other writers)
    fit = metrics.get("fit") or {}
    schedule = metrics.get("schedule") if isinstance(metrics.get("schedule"), dict) else {}
    row["warmup_steps"] = fit.get("warmup_steps", schedule.get("warmup_steps"))
    row["ema_decay"] = fit.get("ema_decay", metrics.get("ema_decay"))
    row["settings"] = read_settings(folder / ".hydra" / "config.yaml", BUDGET + task.budget)
    row["folder"] = folder
    return row


def job_setting(folder: Path, key: str) -> str | None:
    """A job's own value of ``key`` when its command line did not set it: a config group's choice from
    ``.hydra/hydra.yaml`` (``model`` -> ``vittm_fmnist``), a dotted key from ``.hydra/config.yaml``."""
    try:
        if "." not in key:
            choices = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.runtime.choices
            return None if choices.get(key) is None else text(choices.get(key))
        value = OmegaConf.select(OmegaConf.load(folder / ".hydra" / "config.yaml"), key)
    except (OSError, OmegaConfBaseException):
        return None
    return None if value is None else text(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def fill_defaults(rows: list[dict[str, Any]], keys: list[str]) -> None:
    """Pooled sweeps override different keys (one sweeps ``model``, another ``rw_head``): a job that did not set a
    swept key gets the value it actually ran with, so that rows compare like with like."""
    for row in rows:
        for key in keys:
            if key not in row["overrides"]:
                value = job_setting(row["folder"], key)
                if value is not None:
                    row["overrides"][key] = value


def job_number(folder: Path) -> tuple[int, str]:
    head = folder.name.split("_", 1)[0]
    return (int(head), folder.name) if head.isdigit() else (1 << 30, folder.name)


def is_job(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() or (folder / ".hydra" / "overrides.yaml").is_file()


def job_folders(folder: Path, depth: int = 3) -> list[Path]:
    """The job folders at most ``depth`` levels below ``folder`` (or ``folder`` itself); a job's own subfolders
    (checkpoints, logs) are not searched."""
    if is_job(folder):
        return [folder]
    if depth == 0:
        return []
    children = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=job_number)
    return [job for child in children for job in job_folders(child, depth - 1)]


def collect(sweep_dirs: list[Path]) -> list[dict[str, Any]]:
    """The rows of every job under ``sweep_dirs``, named by their path below the folders' common parent (their
    folder name for one multirun folder)."""
    base = Path(os.path.commonpath([d.resolve() for d in sweep_dirs]))
    folders = dict.fromkeys(f.resolve() for d in sweep_dirs for f in job_folders(d))  # a folder given twice: once
    rows = []
    for folder in folders:
        relative = folder.relative_to(base)
        rows.append(read_job(folder, relative.as_posix() if relative.parts else folder.name))
    return rows


def task_of(rows: list[dict[str, Any]]) -> Task:
    """The one task of the jobs that name theirs (a table compares like with like); ``OLDER`` when none does."""
    first: dict[str, Path] = {}  # task -> the first job folder of it
    for row in rows:
        if row["task"] is not None:
            first.setdefault(row["task"], row["folder"])
    if len(first) > 1:
        (one, a), (other, b) = list(first.items())[:2]
        raise SystemExit(f"error: jobs of different tasks cannot share a report: {a} is {one}, {b} is {other}; "
                         "report each task's folders apart")
    name = next(iter(first), OLDER)
    if name not in TASKS:
        raise SystemExit(f"error: {first[name]}: task {name!r}: the report knows {', '.join(TASKS)}")
    return TASKS[name]


def task_and_select(rows: list[dict[str, Any]], select: str | None) -> tuple[Task, str]:
    """The jobs' task and the validation head that chooses (``None``: the task's main metric), refused when it is
    not one of that task's."""
    task = task_of(rows)
    select = select or task.main
    if select not in task.heads:
        raise SystemExit(f"error: --select {select}: {task.name} jobs: choose one of {', '.join(task.heads)}")
    return task, select


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing from some), in first-seen order. ``sweep``
    (a preset's name: its values come as overrides of their own) and ``hydra.*`` are not settings of a job."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row["overrides"]))
    return [k for k in keys if k != "sweep" and not k.startswith("hydra.")
            and len({row["overrides"].get(k) for row in rows}) > 1]


def settle_swept(rows: list[dict[str, Any]]) -> list[str]:
    """The swept keys once every job has a value for each (``fill_defaults``): the columns that define a row."""
    fill_defaults(rows, [k for k in swept_keys(rows) if k != "seed"])
    return swept_keys(rows)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None with one value) and count of the values that are numbers."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def config_of(row: dict[str, Any], keys: list[str]) -> tuple[str, ...]:
    return tuple(row["overrides"].get(k, "") for k in keys)


def group(rows: list[dict[str, Any]], keys: list[str], task: Task) -> list[dict[str, Any]]:
    """Finished jobs grouped by their values of ``keys``: ``n`` jobs, mean/std/count of every number."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[config_of(row, keys)].append(row)
    out = []
    for values, members in groups.items():
        summary: dict[str, Any] = dict(zip(keys, values, strict=True)) | {"n": len(members), "members": members}
        for col in (*task.columns, *OTHER_COLUMNS):
            summary[col], summary[f"{col}_std"], summary[f"{col}_n"] = mean_std([m[col] for m in members])
        out.append(summary)
    return out


def choose(rows: list[dict[str, Any]], axes: list[str], key: str, select: str | None = None) -> list[dict[str, Any]]:
    """The grid: one group per configuration (``axes``) x ``key`` value, each with ``score`` (mean validation
    ``select``, default the task's main metric, over the seeds every value of its configuration ran, ``compared_on``
    those seeds) and ``chosen`` (the best score of its configuration)."""
    task, select = task_and_select(rows, select)
    grid = group(rows, [*axes, key], task)
    by_config: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for cell in grid:
        by_config[tuple(cell[a] for a in axes)].append(cell)
    for cells in by_config.values():
        # a configuration without that head (a baseline ViT has no memory head) is chosen by its main metric
        has_head = any(m[f"val_{select}"] is not None for c in cells for m in c["members"])
        metric = f"val_{select}" if has_head else f"val_{task.main}"
        seeds = [{seed_of(m) for m in c["members"]} for c in cells]
        common = set.intersection(*seeds)
        for cell in cells:
            cell["compared_on"] = sorted(common, key=numeric_order)
            cell["score"] = mean_std([m[metric] for m in cell["members"] if not common or seed_of(m) in common])[0]
            cell["chosen"] = False
        scored = [c for c in cells if c["score"] is not None]
        if scored:
            max(scored, key=lambda c: c["score"])["chosen"] = True
    return grid


def seed_of(row: dict[str, Any]) -> str:
    """The job's seed: its override, else its config's (a sweep that left the default seed)."""
    return row["overrides"].get("seed") or (row["settings"] or {}).get("seed", "")


def numeric_order(value: str) -> tuple:
    """Numbers in numeric order (2e-3 before 1e-2), then other values alphabetically."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def fmt(value: float | None, std: float | None, percent: bool) -> str:
    if value is None:
        return "–"
    scale = 100 if percent else 1
    digits = 2 if percent or abs(value) < 100 else 0
    out = f"{scale * value:.{digits}f}"
    return out + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def gap_cells(g: dict[str, Any], best: dict[str, Any], col: str) -> list[str]:
    """Gap to the best row in points of ``col``, and whether it exceeds 2 standard errors of the difference."""
    if g[col] is None:
        return ["–", "–"]
    if g is best:
        return ["best", "–"]
    gap = 100 * (best[col] - g[col])
    if min(g[f"{col}_n"], best[f"{col}_n"]) < 2:
        return [f"{gap:.2f}", "n/a"]
    se = 100 * math.sqrt(best[f"{col}_std"] ** 2 / best[f"{col}_n"] + g[f"{col}_std"] ** 2 / g[f"{col}_n"])
    return [f"{gap:.2f}", "yes" if gap > 2 * se else "no"]


def seeds_note(counts: list[int]) -> str:
    if not counts:
        return "No finished job yet."
    low, high = min(counts), max(counts)
    if high == 1:
        return "One seed per row: there is no spread to show (no ±), and no gap can be tested against the seeds."
    if low == high:
        return f"Mean ± sample std over {low} seeds."
    return (f"Mean ± sample std over the seeds of each row ({low} to {high}, column `seeds`); a row with one seed "
            "has no spread and shows no ±.")


def reported_metric(table: list[dict[str, Any]], task: Task) -> str:
    """The main metric on the test split when the jobs have one, else on the validation split (older metrics.json,
    or a dataset without a separate test split)."""
    test = f"test_{task.main}"
    return test if any(g[test] is not None for g in table) else f"val_{task.main}"


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The settings that are the same for every job (by its .hydra/config.yaml), grouped by config group, then
    what the finished jobs ran."""
    configs = [r["settings"] for r in rows if r["settings"] is not None]
    lines = ["## Budget (the same for every job)", ""]
    if configs:
        common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs[1:])}
        by_group: dict[str, list[str]] = defaultdict(list)
        for key, value in common.items():
            head, _, rest = key.partition(".")
            by_group[head].append(f"{rest}={value}" if rest else value)
        lines.append(f"From `.hydra/config.yaml` of {len(configs)} of {len(rows)} jobs; the swept settings are the "
                     "table's columns.")
        lines += [""] + [f"- {head}: " + ", ".join(items) for head, items in by_group.items()]
    else:
        lines.append("No job folder has `.hydra/config.yaml`: the fixed settings are unknown.")
    ok = [r for r in rows if r["status"] == "ok"]
    ran = [(name, spread([r[col] for r in ok])) for name, col in (
        ("optimizer steps run", "steps"), ("warmup steps (fitted to the run)", "warmup_steps"),
        ("EMA decay (fitted to the run)", "ema_decay"))]
    lines += [f"- {name}: {value}" for name, value in ran if value is not None]
    return lines


def spread(values: list[Any]) -> str | None:
    """One value, or the range of the values when jobs differ; None when no job has one."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if len(set(values)) == 1:
        return text(values[0])
    return f"{text(min(values))} to {text(max(values))} (differs between jobs)"


def main_table(table: list[dict[str, Any]], axes: list[str], tune: str | None, select: str, task: Task) -> list[str]:
    reported = reported_metric(table, task)
    split = reported.split("_")[0]
    has_test = split == "test"
    val_cols = list(dict.fromkeys([f"val_{task.main}", f"val_{select}"])) if has_test else [
        c for c in task.columns if c.startswith("val_") and any(g[c] is not None for g in table)]
    test_cols = [c for c in task.columns if c.startswith("test_") and any(g[c] is not None for g in table)]
    head = [*axes, *([tune] if tune else []), "seeds",
            *(task.say(c.replace("_", " ", 1)) + " %" for c in val_cols + test_cols), "GMACs", "params M",
            "train img/s (shared CPU)", "wall s", f"gap to best ({split} {task.metric}, points)", "gap > 2 SE"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ranked = sorted(table, key=lambda g: (g[reported] is None, -(g[reported] or 0)))
    best = ranked[0] if ranked and ranked[0][reported] is not None else None
    for g in ranked:
        cells = [str(g[a]) for a in [*axes, *([tune] if tune else [])]] + [str(g["n"])]
        cells += [fmt(g[c], g[f"{c}_std"], percent=True) for c in val_cols + test_cols]
        cells += [significant(g["gmacs"]) if g["gmacs"] else "–", significant(g["params_M"]) if g["params_M"] else "–"]
        cells += [fmt(g[c], g[f"{c}_std"], percent=False) for c in ("train_images_per_s", "wall_seconds")]
        cells += gap_cells(g, best, reported) if best else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [seeds_note([g["n"] for g in table]),
             f"{task.about} val: the held-out validation split at the end of training"
             + (f", which chose `{tune}`" if tune else "")
             + "; test: the test split, evaluated once with the checkpoint the validation split selected."
             + ("" if has_test else " These jobs have no test metrics (metrics.json without `test`)."),
             f"Gap: points of mean {'test' if has_test else 'validation'} {task.metric} below the best row; gap > 2 "
             "SE: whether it exceeds twice the standard error of the difference, sqrt(s1²/n1 + s2²/n2) over the two "
             "rows' seeds (n/a with fewer than 2 seeds in either).",
             f"train img/s: each job's training images per second, {SHARED_CPU} (python -m vittm.bench times "
             "models side by side)."]
    return lines + [line for note in notes for line in ("", note)]  # a paragraph each


def grid_table(grid: list[dict[str, Any]], axes: list[str], tune: str, select: str, task: Task) -> list[str]:
    shown = task.say(select)
    head = [*axes, tune, "seeds", f"val {shown} % (all its seeds)", f"val {shown} % compared (seeds)", "chosen"]
    lines = ["## Tuning grid", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ordered = sorted(grid, key=lambda c: ([numeric_order(str(c[a])) for a in axes], numeric_order(str(c[tune]))))
    col = f"val_{select}"
    for c in ordered:
        seeds = ", ".join(c["compared_on"]) or "its seeds"  # no seed common to all values: each value's own
        compared = "–" if c["score"] is None else f"{100 * c['score']:.2f} ({seeds})"
        cells = [str(c[a]) for a in [*axes, tune]] + [str(c["n"]), fmt(c[col], c[f"{col}_std"], percent=True),
                                                       compared, "yes" if c["chosen"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Per configuration, the `{tune}` value with the best mean val {shown} over the seeds every value "
              "of that configuration ran (so that seeds added later at the chosen value cannot change the choice); "
              "the test split plays no part."]
    return lines


def markdown(rows: list[dict[str, Any]], table: list[dict[str, Any]], axes: list[str], title: str, task: Task,
             select: str, tune: str | None = None, grid: list[dict[str, Any]] | None = None,
             plots: list[str] = ()) -> str:
    lines = [f"# {title}", "", f"{len(rows)} jobs: " + ", ".join(
        f"{sum(r['status'] == s for r in rows)} {s}" for s in ("ok", "failed", "no result yet")) + ".", ""]
    lines += [*budget_lines(rows), "", "## Results", "", *main_table(table, axes, tune, select, task)]
    if plots:
        split = reported_metric(table, task).split("_")[0]
        links = ", ".join(f"[{p.removesuffix('.png')}]({p})" for p in plots)
        lines += ["", f"Plots ({split} {task.metric} of the rows above, Pareto front dashed; the throughput plot's "
                  f"images/s are the table's, {SHARED_CPU}): {links}"]
    if tune and grid:
        lines += ["", *grid_table(grid, axes, tune, select, task)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed jobs", "", "| job | error |", "| --- | --- |"]
        lines += [f"| {r['job']} | {r['error'].replace('|', '/').splitlines()[0] if r['error'] else '?'} |"
                  for r in failed]
    waiting = [r for r in rows if r["status"] == "no result yet"]
    if waiting:
        lines += ["", "## Without a result yet (running, or stopped before writing metrics.json)", ""]
        lines += [f"- {r['job']}" for r in waiting]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], keys: list[str], task: Task, path: Path) -> None:
    fields = ["job", "status", *keys, *task.columns, *OTHER_COLUMNS, "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row | {k: row["overrides"].get(k, "") for k in keys})


def pareto(points: list[tuple[float, float]], higher_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (accuracy y always higher-is-better)."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_x = a[0] >= b[0] if higher_x_better else a[0] <= b[0]
        return better_x and a[1] >= b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def label(g: dict[str, Any], axes: list[str]) -> str:
    return ",".join(str(g[a]) for a in axes) or "defaults"




def scatter(groups: list[dict[str, Any]], axes: list[str], task: Task, metric: str, x: str, xlabel: str,
            higher_x_better: bool, palette: dict[str, tuple], title: str = ""):
    import matplotlib.pyplot as plt

    shown = [g for g in groups if g[x] is not None and g[metric] is not None]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    points = [(g[x], 100 * g[metric]) for g in shown]
    for g, p in zip(shown, points, strict=True):
        name = label(g, axes)
        ax.errorbar(*p, yerr=100 * (g[f"{metric}_std"] or 0), fmt="o", capsize=3, color=palette[name], label=name)
        ax.annotate(name, p, fontsize=7, xytext=(3, 3), textcoords="offset points", color=palette[name])
    if points:
        front = pareto(points, higher_x_better)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", label="Pareto front")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the points stay visible
    ax.set(xlabel=xlabel, ylabel=f"{metric.split('_')[0]} {task.unit} ({task.of}, mean ± std over seeds)", title=title)
    ax.grid(alpha=0.3)
    return fig


def heatmap(groups: list[dict[str, Any]], axes: list[str], task: Task, metric: str, tune: str | None = None):
    """Mean ``metric`` over the first two axes (memory_ps x process_ps when swept), a panel per value of the rest,
    all on one colour scale (a colour means the same value in every panel). None with fewer than two axes."""
    if len(axes) < 2 or not groups:
        return None
    import matplotlib.pyplot as plt

    pair = list(HEATMAP_FIRST) if set(HEATMAP_FIRST) <= set(axes) else axes[:2]
    rest = [a for a in axes if a not in pair]
    rows_v, cols_v = (sorted({str(g[a]) for g in groups}, key=numeric_order) for a in pair)
    panels = sorted({tuple(str(g[a]) for a in rest) for g in groups})
    values = [100 * g[metric] for g in groups if g[metric] is not None]
    vmin, vmax = (min(values), max(values)) if values else (0.0, 100.0)
    fig, axs = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 4), squeeze=False, layout="constrained")
    for ax, panel in zip(axs[0], panels, strict=True):
        grid = [[math.nan] * len(cols_v) for _ in rows_v]
        notes = [[""] * len(cols_v) for _ in rows_v]
        for g in groups:
            if tuple(str(g[a]) for a in rest) == panel and g[metric] is not None:
                i, j = rows_v.index(str(g[pair[0]])), cols_v.index(str(g[pair[1]]))
                grid[i][j] = 100 * g[metric]
                notes[i][j] = f"\n{tune.rsplit('.', 1)[-1]} {g[tune]}" if tune else ""  # the chosen value
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax)
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                light = not math.isnan(value) and image.norm(value) > 0.6  # dark text on the yellow end
                ax.text(j, i, "–" if math.isnan(value) else f"{value:.1f}{notes[i][j]}", ha="center", va="center",
                        color="k" if light else "w", fontsize=8)
        ax.set(xticks=range(len(cols_v)), xticklabels=cols_v, yticks=range(len(rows_v)), yticklabels=rows_v,
               xlabel=pair[1], ylabel=pair[0], title=", ".join(f"{a}={v}" for a, v in zip(rest, panel, strict=True)))
    fig.colorbar(image, ax=axs[0].tolist(), label=f"{metric.split('_')[0]} {task.unit}")  # one scale for all panels
    return fig


def save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sweep_dirs: Path | list[Path], out: Path | None = None, tune: str | None = None,
           select: str | None = None) -> dict[str, Any]:
    dirs = [sweep_dirs] if isinstance(sweep_dirs, Path) else list(sweep_dirs)
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"error: sweep_dir={d}: not a folder; give a multirun folder "
                             "(hydra.sweep.dir, e.g. outputs/<study>/multiruns/<time>)")
    if out is None and len(dirs) > 1:
        raise SystemExit("error: several sweep folders: give --out, where the pooled report goes")
    rows = collect(dirs)
    if not rows:
        raise SystemExit(f"error: sweep_dir={', '.join(map(str, dirs))}: holds no job folders (none has "
                         "metrics.json or .hydra/overrides.yaml)")
    task, select = task_and_select(rows, select)
    swept = settle_swept(rows)
    if tune and not any(tune in r["overrides"] for r in rows):
        raise SystemExit(f"error: --tune {tune}: no job overrides it (swept: {', '.join(swept) or 'nothing'})")
    out = out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    axes = [k for k in swept if k not in ("seed", tune)]
    grid = choose(rows, axes, tune, select) if tune else None
    table = [c for c in grid if c["chosen"]] if grid is not None else group(rows, axes, task)
    keys = [*axes, *([tune] if tune else []), *(["seed"] if "seed" in swept else [])]
    write_csv(rows, keys, task, out / "report.csv")
    metric = reported_metric(table, task)
    palette = colours([label(g, axes) for g in table])
    plots = [f"{task.plots}_vs_macs.png", f"{task.plots}_vs_throughput.png"]
    save(scatter(table, axes, task, metric, "gmacs", "GMACs per image", False, palette), out / plots[0])
    save(scatter(table, axes, task, metric, "train_images_per_s", "training images / s (jobs sharing the CPU)", True,
                 palette, title=f"images/s {SHARED_CPU}"), out / plots[1])
    fig = heatmap(table, axes, task, metric, tune)
    if fig is not None:
        save(fig, out / "heatmap.png")
        plots.append("heatmap.png")
    title = ("Sweep " if len(dirs) == 1 else "Sweeps ") + ", ".join(d.name for d in dirs)
    (out / "report.md").write_text(markdown(rows, table, axes, title, task, select, tune, grid, plots))
    files = ["report.csv", "report.md", *plots]
    return {"rows": rows, "groups": table, "grid": grid, "axes": axes, "files": [out / f for f in files]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="multirun folders (hydra.sweep.dir), pooled")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the one multirun folder)")
    parser.add_argument("--tune", default=None, metavar="KEY",
                        help="choose this swept setting per configuration on the validation split, e.g. optimizer.lr")
    parser.add_argument("--select", default=None, metavar="HEAD",
                        help="validation metric that chooses with --tune (default: the task's main one, acc1 = "
                             f"val/acc1 or miou = val/miou); {SELECT_HELP}")
    args = parser.parse_args(argv)
    result = report(args.sweep_dirs, args.out, args.tune, args.select)
    print(result["files"][1].read_text())
    print("written: " + ", ".join(str(f) for f in result["files"]))


if __name__ == "__main__":
    main()
