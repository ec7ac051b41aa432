"""Lightning's checkpoints, surviving crashes and strangers: atomic writes, weights-only reads, ``resume=auto``.

- ``AtomicCheckpointIO`` (a Lightning CheckpointIO plugin): every checkpoint is written to a hidden temporary file
  next to its final name, flushed to disk, then renamed over it (``vittm.core.files.atomic_write``), so a crash mid-save
  never leaves a truncated ``last.ckpt``. Lightning's own writer goes through an fsspec transaction whose temporary
  file lives in the system temp directory: on a cluster that is another file system, where the final move is a copy
  that a crash truncates. Reads go through ``vittm.core.files.load_checkpoint`` (weights-only, one clear error line).
- ``find_resume``: ``resume=auto`` picks the newest checkpoint of the run directory that loads, warning about each
  newer one it had to pass over.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vittm.core.files import (  # noqa: F401  (re-exported: the training code's file helpers in one place)
    CheckpointError,
    UnsafeCheckpointError,
    atomic_write,
    load_checkpoint,
    save_weights,
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with crash-safe local writes and weights-only reads (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is forced: a resumed checkpoint is as untrusted as any other file
        return load_checkpoint(path, map_location=map_location)


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints a run directory may hold, newest first: ours under ``checkpoints/`` and Lightning's SLURM
    ``hpc_ckpt_N.ckpt`` (saved on the requeue signal) in the directory itself."""
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_resume(run_dir: str | Path) -> Path | None:
    """``resume=auto``: the newest checkpoint of ``run_dir`` that loads and is one of ours; None when there is none.

    Truncated or corrupt files are passed over with a warning (the previous good one is used); a file that would run
    code stops everything, since it cannot have been written by a run of this framework."""
    for path in candidates(Path(run_dir)):
        try:
            ckpt = load_checkpoint(path, key="resume=auto: checkpoint", verify=True)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=2)
            continue
        if isinstance(ckpt, Mapping) and "state_dict" in ckpt and "hyper_parameters" in ckpt:
            return path
        warnings.warn(f"resume=auto: checkpoint={str(path)!r}: not a training checkpoint of this framework; "
                      f"skipped", stacklevel=2)
    return None


