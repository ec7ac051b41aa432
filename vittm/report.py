"""Gather a sweep into a table and plots: ``python -m vittm.report <multirun dir> [--out DIR]`` (``make report``).

Reads every job folder's ``metrics.json`` (written by run.py for finished and failed jobs) and, for jobs still
running or killed, its ``.hydra/overrides.yaml``, so a partial sweep reports too. Writes into ``--out`` (default:
the multirun folder):

- ``report.csv``: one row per job (status, swept values, metrics, MACs, params, images/s, wall time, error);
- ``report.md``: one row per configuration (the swept values other than ``seed``) with mean ± std over its seeds,
  then the failed jobs with their errors and the jobs without a result yet;
- ``acc_vs_macs.png`` and ``acc_vs_throughput.png`` with the Pareto front marked, and ``heatmap.png`` when two or
  more keys were swept (the first two axes, one panel per value of the others).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

METRIC_COLUMNS = {  # column -> metrics.json "final" key
    "acc1": "val/acc1",  # what model(x) returns: the memory head for ViTTM, the only head for a baseline
    "memory_acc1": "val/memory_acc1",
    "process_acc1": "val/process_acc1",
    "ema_memory_acc1": "val_ema/memory_acc1",
    "ema_process_acc1": "val_ema/process_acc1",
}
OTHER_COLUMNS = ("gmacs", "params_M", "train_images_per_s", "wall_seconds")
HEATMAP_FIRST = ("model.memory_ps", "model.process_ps")  # preferred heat-map axes when both were swept


def split_override(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def read_job(folder: Path) -> dict[str, Any] | None:
    """One job folder -> a row, or None when the folder is not a job."""
    metrics_file, overrides_file = folder / "metrics.json", folder / ".hydra" / "overrides.yaml"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError as err:  # being written right now, or cut short
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {err}"}
    elif overrides_file.is_file():
        metrics = {"status": "no result yet"}
    else:
        return None
    overrides = metrics.get("overrides")
    if overrides is None and overrides_file.is_file():
        overrides = list(OmegaConf.load(overrides_file))
    final = metrics.get("final") or {}
    row: dict[str, Any] = {
        "job": folder.name, "status": metrics.get("status", "ok" if final else "failed"),
        "overrides": dict(split_override(o) for o in overrides or []), "error": metrics.get("error", ""),
    }
    row.update({col: final.get(key) for col, key in METRIC_COLUMNS.items()})
    row["gmacs"] = metrics["macs"] / 1e9 if metrics.get("macs") else None
    row["params_M"] = metrics["params"] / 1e6 if metrics.get("params") else None
    row["train_images_per_s"] = metrics.get("train_images_per_s")
    row["wall_seconds"] = metrics.get("wall_seconds")
    return row


def job_number(folder: Path) -> tuple[int, str]:
    head = folder.name.split("_", 1)[0]
    return (int(head), folder.name) if head.isdigit() else (1 << 30, folder.name)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=job_number)
    return [row for row in map(read_job, folders) if row is not None]


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing from some), in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row["overrides"]))
    return [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def group(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    """Finished jobs grouped by their values of ``axes`` (the swept keys but seed): mean/std of every number."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[tuple(row["overrides"].get(k, "") for k in axes)].append(row)
    out = []
    for values, members in groups.items():
        summary: dict[str, Any] = dict(zip(axes, values, strict=True)) | {"n": len(members)}
        for col in (*METRIC_COLUMNS, *OTHER_COLUMNS):
            summary[col], summary[f"{col}_std"] = mean_std([m[col] for m in members])
        out.append(summary)
    return out


def fmt(value: float | None, std: float | None, percent: bool) -> str:
    if value is None:
        return "–"
    scale = 100 if percent else 1
    digits = 2 if percent or abs(value) < 100 else 0
    text = f"{scale * value:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]], axes: list[str], title: str) -> str:
    cols = [c for c in METRIC_COLUMNS if any(g[c] is not None for g in groups)]
    head = [*axes, "seeds", *(f"{c} %" for c in cols), "GMACs", "params M", "train img/s", "wall s"]
    lines = [f"# {title}", "", f"{len(rows)} jobs: " + ", ".join(
        f"{sum(r['status'] == s for r in rows)} {s}" for s in ("ok", "failed", "no result yet")) + ".", "",
        "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for g in sorted(groups, key=lambda g: -(g["acc1"] or 0)):
        cells = [str(g[a]) for a in axes] + [str(g["n"])]
        cells += [fmt(g[c], g[f"{c}_std"], percent=True) for c in cols]
        cells += [f"{g['gmacs']:.3g}" if g["gmacs"] else "–", f"{g['params_M']:.3g}" if g["params_M"] else "–"]
        cells += [fmt(g[c], g[f"{c}_std"], percent=False) for c in ("train_images_per_s", "wall_seconds")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean ± sample std over the seeds of each row; `acc1` is what `model(x)` returns (the memory head of "
                 "a ViTTM, the only head of a baseline), measured on the validation split at the end of training.")
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


def write_csv(rows: list[dict[str, Any]], axes: list[str], path: Path) -> None:
    fields = ["job", "status", *axes, *METRIC_COLUMNS, *OTHER_COLUMNS, "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row | {k: row["overrides"].get(k, "") for k in axes})


def pareto(points: list[tuple[float, float]], higher_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (accuracy y always higher-is-better)."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_x = a[0] >= b[0] if higher_x_better else a[0] <= b[0]
        return better_x and a[1] >= b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i][0])


def label(g: dict[str, Any], axes: list[str]) -> str:
    return ",".join(str(g[a]) for a in axes) or "defaults"


def scatter(groups: list[dict[str, Any]], axes: list[str], x: str, xlabel: str, higher_x_better: bool,
            path: Path) -> None:
    import matplotlib.pyplot as plt

    shown = [g for g in groups if g[x] is not None and g["acc1"] is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    if shown:
        points = [(g[x], 100 * g["acc1"]) for g in shown]
        errors = [100 * (g["acc1_std"] or 0) for g in shown]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, fmt="o", capsize=3)
        for g, p in zip(shown, points, strict=True):
            ax.annotate(label(g, axes), p, fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto(points, higher_x_better)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "r--", label="Pareto front")
        ax.legend()
    ax.set(xlabel=xlabel, ylabel="top-1 % (model(x), mean over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(groups: list[dict[str, Any]], axes: list[str], path: Path) -> bool:
    """Mean acc1 over the first two axes (memory_ps x process_ps when swept), a panel per value of the rest."""
    if len(axes) < 2:
        return False
    import matplotlib.pyplot as plt

    pair = list(HEATMAP_FIRST) if set(HEATMAP_FIRST) <= set(axes) else axes[:2]
    rest = [a for a in axes if a not in pair]

    def order(values: set[str]) -> list[str]:
        return sorted(values, key=lambda v: (float(v), v) if v.replace(".", "", 1).isdigit() else (math.inf, v))

    rows_v, cols_v = (order({str(g[a]) for g in groups}) for a in pair)
    panels = sorted({tuple(str(g[a]) for a in rest) for g in groups})
    fig, axs = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axs[0], panels, strict=True):
        grid = [[math.nan] * len(cols_v) for _ in rows_v]
        for g in groups:
            if tuple(str(g[a]) for a in rest) == panel and g["acc1"] is not None:
                grid[rows_v.index(str(g[pair[0]]))][cols_v.index(str(g[pair[1]]))] = 100 * g["acc1"]
        image = ax.imshow(grid, cmap="viridis")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                light = not math.isnan(value) and image.norm(value) > 0.6  # dark text on the yellow end
                ax.text(j, i, "–" if math.isnan(value) else f"{value:.1f}", ha="center", va="center",
                        color="k" if light else "w")
        ax.set(xticks=range(len(cols_v)), xticklabels=cols_v, yticks=range(len(rows_v)), yticklabels=rows_v,
               xlabel=pair[1], ylabel=pair[0], title=", ".join(f"{a}={v}" for a, v in zip(rest, panel, strict=True)))
        fig.colorbar(image, ax=ax, label="top-1 %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(sweep_dir: Path, out: Path | None = None) -> dict[str, Any]:
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: sweep_dir={sweep_dir}: not a folder; give a multirun folder "
                         "(hydra.sweep.dir, e.g. outputs/<study>/multiruns/<time>)")
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"error: sweep_dir={sweep_dir}: holds no job folders (none has metrics.json or "
                         ".hydra/overrides.yaml)")
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    swept = swept_keys(rows)
    axes = [k for k in swept if k != "seed"]
    groups = group(rows, axes)
    write_csv(rows, [*axes, *(["seed"] if "seed" in swept else [])], out / "report.csv")
    (out / "report.md").write_text(markdown(rows, groups, axes, f"Sweep {sweep_dir.name}"))
    scatter(groups, axes, "gmacs", "GMACs per image", False, out / "acc_vs_macs.png")
    scatter(groups, axes, "train_images_per_s", "training images / s", True, out / "acc_vs_throughput.png")
    files = ["report.csv", "report.md", "acc_vs_macs.png", "acc_vs_throughput.png"]
    if heatmap(groups, axes, out / "heatmap.png"):
        files.append("heatmap.png")
    return {"rows": rows, "groups": groups, "axes": axes, "files": [out / f for f in files]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the multirun folder)")
    args = parser.parse_args()
    result = report(args.sweep_dir, args.out)
    print((result["files"][1]).read_text())
    print("written: " + ", ".join(str(f) for f in result["files"]))


if __name__ == "__main__":
    main()
