"""What Hydra multiruns need beyond Hydra itself: readable job folders, a SQLite URL whose folder exists, a wandb
group per sweep, and jobs whose failure is recorded instead of ending the sweep.

The resolvers are registered when this module is imported (run.py imports it before Hydra composes the config).
"""

from __future__ import annotations

import json
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MAX_DIRNAME = 180  # file names are limited to 255 bytes; the job number is prefixed


def swept_keys(hydra_cfg: Any) -> set[str]:
    """Keys that vary between a sweep's jobs: the sweeper's ``params`` (presets, Optuna) and the command line's
    sweep overrides (``seed=0,1``, ``range(...)``), read back from the basic sweeper's ``multirun.yaml``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        task = OmegaConf.load(saved).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides(list(task))
        keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys


def job_dirname() -> str:
    """A multirun job's folder name: its values of the swept keys (``rw_head=ca,seed=1``), or all of its overrides
    when nothing is known to vary; characters outside [A-Za-z0-9=,._+-[]] become ``_``, length bounded."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = [o.lstrip("+~") for o in hydra_cfg.overrides.task]
    swept = swept_keys(hydra_cfg)
    chosen = [o for o in overrides if o.split("=", 1)[0] in swept] or overrides
    name = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "_", ",".join(chosen)) or "defaults"
    return name[:MAX_DIRNAME]


def sqlite_url(path: str) -> str:
    """``outputs/optuna/x.sqlite`` -> ``sqlite:///<absolute path>``, creating the folder (SQLite will not)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_group(study: str) -> str:
    """wandb group: ``<study>/<sweep folder>`` for a multirun job (all jobs of a sweep share it), else the study."""
    if in_multirun():
        from hydra.core.hydra_config import HydraConfig

        return f"{study}/{Path(HydraConfig.get().sweep.dir).name}"
    return study


for _name, _fn in (("job_dirname", job_dirname), ("sqlite_url", sqlite_url), ("run_group", run_group)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def record_failure(output_dir: str | Path, err: BaseException) -> None:
    """Write the failed job's metrics.json (status, error, overrides) so that `vittm.studies.report` can list it."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}".strip(),
        "overrides": list(HydraConfig.get().overrides.task),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "error.log").write_text("".join(traceback.format_exception(err)))
    print(f"error: job {out.name} failed: {result['error']} (traceback in {out / 'error.log'}); the sweep goes on",
          file=sys.stderr)


def failed_job_value(err: Exception) -> float:
    """What a failed multirun job hands its sweeper: NaN for the basic sweeper (which would otherwise re-raise the
    error after the batch and end the sweep); the error itself for Optuna, which then marks the trial FAIL (telling
    it NaN crashes hydra-optuna-sweeper 1.3: it retries the tell as FAIL with the value attached). The Optuna
    preset sets max_failure_rate so that failed trials do not end the search."""
    from hydra.core.hydra_config import HydraConfig

    if "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")):
        raise err
    return math.nan
