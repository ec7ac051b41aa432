"""A training loader whose every epoch is a function of (seed, epoch) and that can resume at any batch.

- Order: ``EpochSampler``, a DistributedSampler (one device as many) seeded by (seed, epoch), can start ``skip``
  samples into its epoch.
- Augmentation: ``SeededBatches`` fetches and collates each batch under a torch RNG seeded from (seed, epoch, the
  batch's first index), in whichever process loads it, so the images of batch k never depend on the batches before
  it, on worker count or on what the model drew from the RNG.
- Model randomness (dropout, drop-path, mixup): ``EpochLoader`` reseeds the global RNGs from (seed, epoch, rank) when
  an epoch starts; a checkpoint saved after batch k carries the loader's epoch, k and the global RNG states
  (``state()``, saved by the data module), and the resumed epoch skips k batches and restores those states.

Together: a run resumed from any checkpoint, at an epoch boundary or mid-epoch, repeats a straight run bit for bit.
Lightning does not prefetch from a loader with a length, so the batches this loader has yielded are the batches
trained when a checkpoint is written.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """A DistributedSampler that can start ``skip`` samples into its epoch (the loader sets epoch and skip)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)


def batch_seed(seed: int, epoch: int, first_index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, first_index]).generate_state(1, np.uint64)[0])


class SeededBatches(Dataset):
    """Whole batches at once (``DataLoader`` calls ``__getitems__`` with a batch's indices): fetched and collated
    under a private torch RNG, so the global RNG is never touched by data loading."""

    def __init__(self, dataset: Dataset, collate: Callable, seed: int) -> None:
        self.dataset, self.collate, self.seed = dataset, collate, seed
        self.epoch = 0  # set by EpochLoader before its workers start

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(self.seed, self.epoch, indices[0]))
            return self.collate([self.dataset[i] for i in indices])


def as_collated(batch: Any) -> Any:
    """The DataLoader's collate_fn: SeededBatches already collated the batch (module-level: workers pickle it)."""
    return batch


def rng_state() -> dict[str, Any]:
    """The global RNG states, in types ``torch.load(weights_only=True)`` accepts (numpy's array becomes a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochLoader(DataLoader):
    """The training loader (see the module docstring). ``epoch_fn()`` gives the trainer's epoch, ``seed_fn(epoch)``
    the epoch's global seed, ``resume_fn()`` a pending ``state()`` from a checkpoint (or None), taken once."""

    def __init__(self, dataset: SeededBatches, *, sampler: EpochSampler, epoch_fn: Callable[[], int],
                 seed_fn: Callable[[int], int], resume_fn: Callable[[], dict | None], **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, collate_fn=as_collated, **kwargs)
        self.epoch_fn, self.seed_fn, self.resume_fn = epoch_fn, seed_fn, resume_fn
        self.epoch: int | None = None
        self.taken = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing is seeded or read until the first batch is asked for. Lightning may create this
        # iterator before it restores a checkpoint (trainer.estimated_stepping_batches does), and only after the
        # restore are the epoch and the resume state known.
        return self._epoch_batches()

    def _epoch_batches(self) -> Iterator[Any]:
        epoch, state = self.epoch_fn(), self.resume_fn()
        skip = state["batches"] if state and state["epoch"] == epoch else 0
        if not skip:
            seed_everything(self.seed_fn(epoch), verbose=False)
        self.dataset.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip * self.batch_size
        batches = super().__iter__()  # worker processes start (and draw their seeds) here
        if skip:
            set_rng_state(state["rng"])  # as after batch `skip` of the interrupted run
        self.epoch, self.taken = epoch, skip
        for batch in batches:
            self.taken += 1
            yield batch

    def state(self) -> dict[str, Any] | None:
        """Where this epoch stands: saved with every checkpoint (by the data module), used by a resumed run."""
        if self.epoch is None:
            return None
        return {"epoch": self.epoch, "batches": self.taken, "rng": rng_state()}
