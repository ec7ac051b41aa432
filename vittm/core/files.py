"""Weight and checkpoint files that survive crashes and strangers, without Lightning (the models load through it too).

- ``load_checkpoint``: every read goes through ``torch.load(weights_only=True)``; a pickle that would import or call
  anything is refused with one clear line (nothing in it runs), a truncated or corrupt file is named.
- ``atomic_write``: a file is written to a hidden temporary file beside its final name, flushed to disk, then renamed
  over it, so a crash mid-save never leaves a truncated file and the previous one stays whole.
- ``save_weights``: model weights as ``.safetensors`` (or a weights-only ``.pth``), written atomically;
  ``read_weight_file`` reads either kind.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from vittm.core.errors import ConfigError

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


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Model weights as ``.safetensors`` (no pickle at all; ``metadata`` goes into its header) or, for any other
    suffix, a weights-only ``.pth``."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata=metadata)))
    else:
        atomic_write(path, lambda f: torch.save(tensors, f))
    return path


def read_weight_file(path: str | Path, key: str = "file") -> Any:
    """What a weight file holds: a ``.safetensors`` file's tensors (no pickle at all), else ``load_checkpoint``'s
    weights-only read; a file that cannot be read raises a CheckpointError naming ``key``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_checkpoint(path, key=key)
    if not path.is_file():
        raise CheckpointError(f"{key}={str(path)!r}: file does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{key}={str(path)!r}: not a readable .safetensors file ({err})") from None
