"""Checkpoint files that survive crashes and strangers: atomic writes, weights-only reads, ``resume=auto``, export.

- ``AtomicCheckpointIO`` (a Lightning CheckpointIO plugin): every checkpoint is written to a hidden temporary file
  next to its final name, flushed to disk, then renamed over it, so a crash mid-save never leaves a truncated
  ``last.ckpt``. Lightning's own writer goes through an fsspec transaction whose temporary file lives in the system
  temp directory: on a cluster that is another file system, where the final move is a copy that a crash truncates.
- ``load_checkpoint``: every checkpoint read goes through ``torch.load(weights_only=True)``; a pickle that would
  import or call anything is refused with one clear line (nothing in it runs), a truncated or corrupt file is named.
- ``find_resume``: ``resume=auto`` picks the newest checkpoint of the run directory that loads, warning about each
  newer one it had to pass over.
- ``save_weights``: model weights as ``.safetensors`` (or a weights-only ``.pth``), written atomically too.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save as safetensors_bytes

from vittm.errors import ConfigError

# Code-running pickles name what they would import; torch's weights-only unpickler quotes it in its error.
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, truncated, or one that would run code when loaded."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would import or call code if unpickled; it was refused and nothing in it ran."""


def load_checkpoint(path: str | Path, key: str = "ckpt_path", map_location: Any = "cpu", mmap: bool = False,
                    verify: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one clear error line per failure, naming ``key`` and the file
    (``mmap``: tensors are mapped, not read, e.g. to look at the hyper-parameters only; ``verify``: check every
    record against the CRC-32 torch stored for it, since torch itself reads flipped bits without complaint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}={str(path)!r}: file does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{key}={str(path)!r}: not a readable checkpoint, the file is empty")
    if verify:
        check_crc(path, key)
    try:  # torch can only memory-map its zip format; anything else is read (and refused) the ordinary way
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found:
            raise UnsafeCheckpointError(
                f"{key}={str(path)!r}: refused: loading it would run code ({found.group(1)}); only tensors and plain "
                f"containers are accepted (torch.load weights_only=True), and nothing in the file was run"
            ) from None
        detail = [line for line in str(err).splitlines() if "WeightsUnpickler error" in line or "Unsupported" in line]
        raise CheckpointError(
            f"{key}={str(path)!r}: refused: not a weights-only torch file ({(detail or ['unknown content'])[-1]}); "
            f"nothing in the file was run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__  # torch's 1st sentence
        raise CheckpointError(
            f"{key}={str(path)!r}: not a readable checkpoint, truncated or corrupt ({reason})"
        ) from None


def check_crc(path: Path, key: str) -> None:
    """Every record of a torch zip checkpoint against its stored CRC-32 (one sequential read of the file)."""
    if not zipfile.is_zipfile(path):
        return  # torch.load will say what it is
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        broken = f"unreadable archive: {err}"
    if broken:
        raise CheckpointError(f"{key}={str(path)!r}: not a readable checkpoint, corrupt (checksum mismatch in "
                              f"{broken})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with crash-safe local writes and weights-only reads (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is forced: a resumed checkpoint is as untrusted as any other file
        return load_checkpoint(path, map_location=map_location)


def temp_name(path: Path) -> Path:
    """Hidden, per-process, and not ending in ``.ckpt``: never mistaken for a checkpoint."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, then rename it over ``path`` (atomic on POSIX
    within one file system); on any error the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Model weights as ``.safetensors`` (no pickle at all) or, for any other suffix, a weights-only ``.pth``."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda f: f.write(safetensors_bytes(tensors)))
    else:
        atomic_write(path, lambda f: torch.save(tensors, f))
    return path
