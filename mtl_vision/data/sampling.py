"""The training order and augmentation randomness, as functions of (seed, epoch, index) only.

Exact resume needs the data a resumed run sees to equal the data the uninterrupted run would
have seen. `EpochSampler` draws each epoch's permutation from (seed, epoch), splits it across
processes as `DistributedSampler` does, and can start an epoch part-way through. It yields
`(index, sample_seed)` pairs; `SeededSamples` loads `dataset[index]` with torch's RNG seeded by
`sample_seed`, so random crops, flips and jitter depend on neither the number of workers nor on
what ran before. `ResumableLoader` saves the position in the epoch in Lightning checkpoints.
"""

from __future__ import annotations

import warnings
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
        """Iterations of `epoch` leave out its first `skip` samples (of this process), until an
        iteration of another epoch begins. Lightning may start the iterator of a resumed epoch
        twice (it discards the first), so the skip cannot be spent on one iteration."""
        if skip < 0 or skip > self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}] samples, got {skip}")
        self.set_epoch(epoch)
        self._start = (epoch, skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        # decided now, not at the first next(): the epoch may be set again in between
        return iter(list(self._pairs()))

    def _pairs(self) -> Iterator[tuple[int, int]]:
        start = self._start
        if start is not None and start[0] != self.epoch:
            start = self._start = None
        skip = start[1] if start is not None else 0
        epoch = self.epoch
        for index in list(super().__iter__())[skip:]:
            yield index, sample_seed(self.seed, epoch, index)


SKIPPED_KEY = "skipped_corrupt"  # in a training sample: corrupt files passed over to load it


class SeededSamples(Dataset):
    """`dataset[index]` with torch's RNG seeded by the seed the sampler hands with the index; the
    caller's RNG state is left as it was.

    Args:
        dataset: items are task dicts; its transform draws from torch's global RNG.
        skip_corrupt: on a `DataFileError` (a missing or corrupt file, named in the message) load
            the next index instead, up to `MAX_SKIPS` times, and count the skipped samples in the
            item's `skipped_corrupt` entry (the module logs `train/skipped_samples`); otherwise
            the error ends the run.
    """

    MAX_SKIPS = 16

    def __init__(self, dataset: Dataset, *, skip_corrupt: bool = False) -> None:
        self.dataset = dataset
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # the CPU generator alone: torch.manual_seed also seeds every accelerator, ~50x slower
        generator = torch.default_generator
        state = generator.get_state()
        try:
            if not self.skip_corrupt:
                generator.manual_seed(seed)
                return self.dataset[index]
            return self._skipping(index, seed, generator)
        finally:
            generator.set_state(state)

    def _skipping(self, index: int, seed: int, generator: torch.Generator) -> Any:
        from mtl_vision.data.io import DataFileError

        for skipped in range(self.MAX_SKIPS + 1):
            generator.manual_seed(seed)
            try:
                item = self.dataset[(index + skipped) % len(self.dataset)]
            except DataFileError as err:
                if skipped == self.MAX_SKIPS:
                    raise DataFileError(
                        f"{err} (and {self.MAX_SKIPS} samples after it: data.skip_corrupt gave up)"
                    ) from err
                warnings.warn(f"skipped a corrupt training sample: {err}", stacklevel=2)
                continue
            item[SKIPPED_KEY] = skipped
            return item
        raise AssertionError("unreachable")


class ResumableLoader(DataLoader):
    """A DataLoader over an `EpochSampler` whose position in the epoch goes into checkpoints.

    Lightning stores `state_dict()` of training loaders that have one, and hands it back to
    `load_state_dict` before it iterates the loader on resume. `progress` is set by the data
    module: (batches of the current epoch whose update a checkpoint written now holds, batches
    in an epoch as the trainer runs it, which `limit_train_batches` can make fewer than `len`).
    """

    progress: Callable[[], tuple[int, int]] | None = None
    # the trainer's optimiser step count. The epoch of each iteration is decided here, not by the
    # trainer's `set_epoch`: resuming from a checkpoint written at the end of an epoch, Lightning
    # passes one epoch too many (written at validation) or too few (written after the last batch),
    # and it may create an iterator that it then throws away unused.
    step_of: Callable[[], int] | None = None
    _next: tuple[int, int] | None = None  # (epoch, batches to skip) of the next iteration
    _started: tuple[int, int, int] | None = None  # (epoch, skip, step) of the last iteration begun

    def __iter__(self):  # type: ignore[override]
        if self.step_of is not None and isinstance(self.sampler, EpochSampler):
            step = self.step_of()
            if self._next is not None:
                (epoch, skip), self._next = self._next, None
            elif self._started is not None and self._started[2] == step:
                epoch, skip = self._started[:2]  # the last iterator was thrown away before any step
            else:
                epoch, skip = (self._started[0] + 1 if self._started is not None else 0), 0
            self.sampler.start_at(epoch, skip * self.batch_size)
            self._started = (epoch, skip, step)
        return super().__iter__()

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
        self._next, self._started = (epoch, batches), None
