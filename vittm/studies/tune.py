"""Pick a setting per configuration on the validation split: ``python -m vittm.studies.tune SWEEP_DIR [--key
optimizer.lr] [--select HEAD]``.

A study tunes in two stages: a sweep over a small grid of ``--key`` (one seed), then the other seeds at each
configuration's chosen value. This prints one line per configuration (the swept values other than ``seed`` and
``--key``) with the overrides of its best value, ready for the second stage's ``python run.py -m <line> seed=1,2``.
The choice is the report's (``vittm.studies.report --tune``): only the validation metric decides, the test split is
never looked at, and ``--select`` defaults to the task's main metric (``acc1`` for classification, ``miou`` for
segmentation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vittm.studies.report import SELECT_HELP, choose, collect, settle_swept, task_and_select


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--key", default="optimizer.lr", help="the tuned setting (default: optimizer.lr)")
    parser.add_argument("--select", default=None, metavar="HEAD",
                        help=f"validation metric to maximise (default: the task's main one, val/acc1 or val/miou); "
                             f"{SELECT_HELP}")
    args = parser.parse_args(argv)
    rows = [r for r in collect([args.sweep_dir]) if r["status"] == "ok"]
    if not rows:
        parser.error(f"{args.sweep_dir}: no finished job (metrics.json with status ok)")
    _, select = task_and_select(rows, args.select)
    axes = [k for k in settle_swept(rows) if k not in ("seed", args.key)]
    for cell in sorted(choose(rows, axes, args.key, select), key=lambda c: [c[a] for a in axes]):
        if cell["chosen"]:
            overrides = [f"{a}={cell[a]}" for a in axes if cell[a] != ""] + [f"{args.key}={cell[args.key]}"]
            print(" ".join(overrides), f"# val/{select} {cell['score']:.4f}")


if __name__ == "__main__":
    main()
