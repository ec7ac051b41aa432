"""Pick a setting per configuration on the validation split: ``python -m vittm.tune SWEEP_DIR [--key optimizer.lr]
[--metric val/acc1]``.

A study tunes in two stages: a sweep over a small grid of ``--key`` (one seed), then the other seeds at each
configuration's chosen value. This prints one line per configuration (the swept values other than ``seed`` and
``--key``) with the overrides of its best value, ready for the second stage's ``python run.py -m <line> seed=1,2``.
Only the validation metric decides (``final`` in metrics.json); the test split is never looked at.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished job of a sweep folder: its overrides (as a dict) and its metrics.json."""
    found = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("status") == "ok" and metrics.get("final"):
            overrides = dict(o.lstrip("+~").split("=", 1) for o in metrics.get("overrides", []) if "=" in o)
            found.append({"overrides": overrides, "metrics": metrics})
    return found


def choose(found: list[dict[str, Any]], key: str, metric: str, swept: set[str]) -> dict[tuple, tuple[str, float]]:
    """configuration -> (best value of ``key``, its mean ``metric`` over seeds); ``swept``: the keys that define a
    configuration (the others are the study's fixed budget)."""
    scores: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for job in found:
        config = tuple(sorted((k, v) for k, v in job["overrides"].items() if k in swept))
        value = job["overrides"].get(key)
        if value is not None and metric in job["metrics"]["final"]:
            scores[config][value].append(job["metrics"]["final"][metric])
    return {config: max(((v, statistics.mean(s)) for v, s in by_value.items()), key=lambda vs: vs[1])
            for config, by_value in scores.items()}


def varying_keys(found: list[dict[str, Any]], key: str) -> set[str]:
    """Keys whose value differs between jobs, other than ``seed`` and ``key``."""
    values: dict[str, set[str]] = defaultdict(set)
    for job in found:
        for k, v in job["overrides"].items():
            values[k].add(v)
    keys = {k for k, vs in values.items() if len(vs) > 1 or any(k not in j["overrides"] for j in found)}
    return keys - {"seed", key, "hydra.sweep.dir"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--key", default="optimizer.lr", help="the tuned setting (default: optimizer.lr)")
    parser.add_argument("--metric", default="val/acc1", help="validation metric to maximise (default: val/acc1)")
    args = parser.parse_args(argv)
    found = jobs(args.sweep_dir)
    if not found:
        parser.error(f"{args.sweep_dir}: no finished job (metrics.json with status ok)")
    for config, (value, score) in sorted(choose(found, args.key, args.metric, varying_keys(found, args.key)).items()):
        print(" ".join([*(f"{k}={v}" for k, v in config), f"{args.key}={value}"]), f"# {args.metric} {score:.4f}")


if __name__ == "__main__":
    main()
