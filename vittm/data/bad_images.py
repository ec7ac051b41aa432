"""Unreadable images in folder datasets (ImageFolder, ImageNet, ImageNet-21K-P): skipped with a warning and
counted, or a clear error naming the file (``data.on_bad_image=skip|fail``).

Files are decoded lazily (checking a million JPEGs up front would take longer than an epoch), so a bad file shows up
when its batch is loaded. Training replaces it by the next readable image of the dataset, keeping batches full
(mixup pairs images; batch shapes stay fixed); validation drops it, so metrics count only real images. Each bad path
is warned about once per process and appended to a log file that the run summary counts (worker processes cannot
share a counter, a file they append to works across workers, processes and ranks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, default_collate

from vittm.core.errors import ConfigError

POLICIES = ("skip", "fail")
# What PIL raises for files it cannot decode: not an image, truncated data, broken chunks, decompression bombs.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class Unreadable(Exception):
    """Raised by ``read_image`` only: (path, reason)."""


class UnreadableImageError(ConfigError):
    """``data.on_bad_image=fail`` met a file it cannot decode."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises as Type("Caught ... in DataLoader worker ...\n<traceback>\nType: message"):
        # keep the one line the user needs.
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


def read_image(path: str) -> Image.Image:
    """ImageFolder's loader, decoding the whole file now (PIL is lazy) and naming the file when that fails."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except DECODE_ERRORS as err:
        raise Unreadable(path, str(err) or type(err).__name__) from None


class SkipUnreadable(Dataset):
    """Wraps a dataset built with ``loader=read_image``; see the module docstring. ``substitute``: replace a bad item
    by the next readable one (training) or return None for the collate to drop (validation)."""

    def __init__(self, dataset: Dataset, policy: str, log: Path | None, substitute: bool) -> None:
        self.dataset, self.policy, self.log, self.substitute = dataset, policy, log, substitute
        self.seen: set[str] = set()  # this process's bad paths (warned once each)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        for offset in range(n):
            try:
                return self.dataset[(index + offset) % n]
            except Unreadable as err:
                self.report(*err.args)
                if not self.substitute:
                    return None
        raise UnreadableImageError(f"data.root: none of the {n} images can be read (data.on_bad_image=skip)")

    def report(self, path: str, reason: str) -> None:
        if self.policy == "fail":
            raise UnreadableImageError(
                f"data.on_bad_image=fail: cannot read {path!r} ({reason}); remove or replace the file, or set "
                f"data.on_bad_image=skip to skip unreadable images"
            )
        if path in self.seen:
            return
        self.seen.add(path)
        warnings.warn(f"data.on_bad_image=skip: skipping unreadable image {path!r} ({reason})", stacklevel=2)
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as f:  # one short append per line: whole lines even with several writers
                f.write(f"{path}\t{reason}\n")


def logged_paths(log: Path | None) -> list[str]:
    """The distinct unreadable files recorded in ``log`` (every epoch meets them again)."""
    if log is None or not log.is_file():
        return []
    return sorted({line.split("\t", 1)[0] for line in log.read_text().splitlines() if line})


class DropUnreadable:
    """Validation collate: leave out the items a SkipUnreadable returned as None, then collate the rest."""

    def __init__(self, collate: Callable = default_collate) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Any:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None  # every image of the batch was unreadable: validation_step skips it
        return self.collate(kept)
