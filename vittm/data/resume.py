"""A training loader whose every epoch is a function of (seed, epoch) and that can resume at any batch.

- Order: ``EpochSampler``, a DistributedSampler (one device as many) seeded by (seed, epoch), can start ``skip``
  samples into its epoch.
- Augmentation: ``SeededBatches`` fetches and collates each batch under a torch RNG seeded from (seed, epoch, the
  batch's first index), in whichever process loads it, so the images of batch k never depend on the batches before
  it, on worker count or on what the model drew from the RNG.
- Model randomness (dropout, drop-path, mixup): ``EpochLoader`` reseeds the global RNGs (torch, numpy, random) from
  (seed, epoch, batch, rank) as it hands out each batch. No RNG state then needs saving, and every rank of a DDP run
  continues its own stream after a resume; reseeding costs microseconds per batch.
- Place: a checkpoint saved after batch k carries the loader's (epoch, k) (``state()``, saved by the data module);
  the resumed epoch skips k batches.

Together: a run resumed from any checkpoint, at an epoch boundary or mid-epoch, repeats a straight run bit for bit.
Lightning does not prefetch from a loader with a length, so the batches this loader has yielded are the batches
trained when a checkpoint is written, and nothing draws from the global RNG between handing out a batch and training
on it. Data transforms must draw from torch's RNG (torchvision's do) to be covered by the per-batch seeding.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """A DistributedSampler that can start ``skip`` samples into its epoch (the loader sets epoch and skip)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed that depends on every key (numpy's SeedSequence hashing: no collisions between neighbours)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def seed_all(seed: int) -> None:
    """torch (CPU and every GPU in use), numpy and random, as Lightning's seed_everything does, without its logging.
    Cheaper than ``torch.manual_seed``, which visits every accelerator backend (~170 us against ~10 us per batch on
    this CPU); the GPUs are in use (initialised) by the time batches are handed out."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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
            torch.default_generator.manual_seed(derive_seed(self.seed, self.epoch, indices[0]))  # CPU-side work
            return self.collate([self.dataset[i] for i in indices])


def as_collated(batch: Any) -> Any:
    """The DataLoader's collate_fn: SeededBatches already collated the batch (module-level: workers pickle it)."""
    return batch


class EpochLoader(DataLoader):
    """The training loader (see the module docstring). ``epoch_fn()`` gives the trainer's epoch, ``resume_fn()`` a
    pending ``state()`` from a checkpoint (or None), taken once; ``seed`` and ``rank`` key the global RNG."""

    def __init__(self, dataset: SeededBatches, *, sampler: EpochSampler, epoch_fn: Callable[[], int],
                 resume_fn: Callable[[], dict | None], seed: int, rank: int, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, collate_fn=as_collated, **kwargs)
        self.epoch_fn, self.resume_fn, self.seed, self.rank = epoch_fn, resume_fn, seed, rank
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
        seed_all(derive_seed(self.seed, epoch, self.rank))  # worker processes draw their own seeds from it
        self.dataset.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip * self.batch_size
        self.epoch, self.taken = epoch, skip
        for batch in super().__iter__():
            seed_all(derive_seed(self.seed, epoch, self.taken, self.rank))  # what trains on this batch draws from here
            self.taken += 1
            yield batch

    def state(self) -> dict[str, int] | None:
        """Where this epoch stands: saved with every checkpoint (by the data module), used by a resumed run."""
        return None if self.epoch is None else {"epoch": self.epoch, "batches": self.taken}
