"""The training order and augmentation randomness, as functions of (seed, epoch, index) only.

Exact resume needs the data a resumed run sees to equal the data the uninterrupted run would
have seen. `EpochSampler` draws each epoch's permutation from (seed, epoch), splits it across
processes as `DistributedSampler` does, and can start an epoch part-way through. It yields
`(index, sample_seed)` pairs; `SeededSamples` loads `dataset[index]` with torch's RNG seeded by
`sample_seed`, so random crops, flips and jitter depend on neither the number of workers nor on
what ran before. `ResumableLoader` saves the position in the epoch in Lightning checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of sample `index` in `epoch` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


class EpochSampler(DistributedSampler):
    """Shuffled training order from (seed, epoch), one share per process, resumable mid-epoch.

    A `DistributedSampler`, so Lightning neither replaces it nor wraps it, and calls `set_epoch`
    at every epoch start. Yields `(index, sample_seed)` for `SeededSamples`.

    Args:
        dataset: the training set.
        num_replicas, rank: processes and this process's rank (1 and 0 without DDP).
        shuffle: permute each epoch (else dataset order).
        seed: the run's seed.
        drop_last: drop the tail so every process gets the same number of samples.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._start: tuple[int, int] | None = None  # (epoch, samples of this process to skip)

    def start_at(self, epoch: int, skip: int) -> None:
        """The next iteration is `epoch`, without its first `skip` samples (of this process)."""
        if skip < 0 or skip > self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}] samples, got {skip}")
        self.set_epoch(epoch)
        self._start = (epoch, skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start = self._start
        self._start = None
        skip = start[1] if start is not None and start[0] == self.epoch else 0
        epoch = self.epoch
        for index in list(super().__iter__())[skip:]:
            yield index, sample_seed(self.seed, epoch, index)


class SeededSamples(Dataset):
    """`dataset[index]` with torch's RNG seeded by the seed the sampler hands with the index; the
    caller's RNG state is left as it was.

    Args:
        dataset: items are task dicts; its transform draws from torch's global RNG.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # the CPU generator alone: torch.manual_seed also seeds every accelerator, ~50x slower
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose position in the epoch goes into checkpoints.

    Lightning stores `state_dict()` of training loaders that have one, and hands it back to
    `load_state_dict` before it iterates the loader on resume. `progress` is set by the data
    module: (batches of the current epoch whose update a checkpoint written now holds, batches
    in an epoch as the trainer runs it, which `limit_train_batches` can make fewer than `len`).
    """

    progress: Callable[[], tuple[int, int]] | None = None

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError(f"ResumableLoader needs an EpochSampler, got {type(self.sampler).__name__}")
        epoch = int(self.sampler.epoch)
        done, per_epoch = self.progress() if self.progress is not None else (0, len(self))
        if done >= per_epoch:  # written at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.start_at(epoch, batches * self.batch_size)
