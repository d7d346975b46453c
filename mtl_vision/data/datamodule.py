"""One LightningDataModule for every multi-task dataset.

It builds the dataset of each split from a dataset factory (a `_partial_` config node), and
carries the dataset's evaluation protocol (edge positive weight, boundary tolerance, the loss
weights of the reference papers) so that losses, metrics and the fixed balancer read one source.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, default_collate

from mtl_vision.data.io import keep_sample_buffers
from mtl_vision.data.sampling import EpochSampler, ResumableLoader, SeededSamples
from mtl_vision.data.transforms import BINARY_MAPS, CLASS_MAPS, GEOMETRY, target_fill
from mtl_vision.tasks import check_tasks, get_task

TARGET_MAPS = (*CLASS_MAPS, *BINARY_MAPS, *GEOMETRY)


def collate_padded_targets(samples: Sequence[dict]) -> dict:
    """`default_collate`, except that targets of different sizes in one batch (kept at each image's
    own size, `MTINetValTransform(targets="original")`) are padded at the bottom and right to the
    largest with the value every loss and metric ignores (`data.transforms.target_fill`, as
    `pad_sample` pads). Each sample's own size
    travels with it (`ORIGINAL_SIZE_KEY`); the images must share one size."""
    sizes = {tuple(s[k].shape[-2:]) for s in samples for k in TARGET_MAPS if k in s}
    if len(sizes) <= 1:
        return default_collate(list(samples))
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    padded = []
    for sample in samples:
        out = dict(sample)
        for key in TARGET_MAPS:
            if key in sample:
                h, w = sample[key].shape[-2:]
                out[key] = F.pad(sample[key], (0, width - w, 0, height - h), value=target_fill(key))
        padded.append(out)
    return default_collate(padded)


def init_worker(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C, SIGTERM and SIGUSR1: the main process stops training at the
    end of the step and shuts its workers down (engine/interrupt.py); a worker killed by the same
    signal would end the run with "DataLoader worker exited unexpectedly" before anything is saved.
    Then Lightning's seeding of the worker (`seed_everything(workers=True)`), which a set
    `worker_init_fn` would otherwise replace."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    keep_sample_buffers()  # the allocator keeps freed sample-sized blocks (~1/3 of a PASCAL sample's time)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


class MultiTaskDataModule(L.LightningDataModule):
    """Args:
        dataset: `dataset(split=..., tasks=..., transform=...) -> Dataset` whose items are task dicts
            ({"image": 3xHxW in [0,1], <task>: target, "meta": {...}}) and which exposes
            `class_names: dict[task, list[str]]` for its class-map tasks.
        tasks: the tasks to train, e.g. [semseg, depth, normals, edge].
        train_split, val_split: split names passed to the factory.
        batch_size: per-process training batch size; val_batch_size defaults to it.
        num_workers: DataLoader workers per process.
        edge_pos_weight: weight of boundary pixels in the edge loss (dataset protocol).
        edge_tolerance: boundary matching tolerance as a fraction of the image diagonal.
        loss_weights: the reference papers' per-task weights, used by `balancer=fixed`.
        train_transform, val_transform: joint transforms `sample -> sample` handed to the dataset
            of each split (see `mtl_vision.data.transforms`); None = as stored.
        root: the dataset folder, handed to the dataset factory (None for generated data).
        layout: on-disk layout to force (e.g. NYUD `nyud_mt`, `nyudv2`, `mtan`; Cityscapes `mtan`,
            `libmtl`); None = detect.
        crop_size: [height, width] of training crops and padded validation images, read by the
            transforms' config; kept here as part of the dataset protocol.
        name: the dataset's short name (`nyud`, `pascal_context`, `cityscapes`, `synthetic`), used for the
            single-task baselines file and in reports.
        skip_corrupt: training samples with a missing or corrupt file are replaced by the next one
            and counted (`train/skipped_samples`) instead of ending the run; validation stays strict.
        seed: the run's seed; the training order and the augmentation of every sample are
            functions of (seed, epoch, index) (see `data.sampling`), which makes resume exact.
        head_channels: {task: head width} where a task accepts another width than its default
            (`{saliency: 2}`: the two-class softmax head of InvPT, TaskPrompter and MLoRE).
    """

    def __init__(
        self,
        *,
        dataset: Callable[..., Dataset],
        tasks: Sequence[str],
        train_split: str = "train",
        val_split: str = "val",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        edge_pos_weight: float = 0.95,
        edge_tolerance: float = 0.011,
        loss_weights: Mapping[str, float] | None = None,
        train_transform: Callable[[dict], dict] | None = None,
        val_transform: Callable[[dict], dict] | None = None,
        root: str | None = None,
        layout: str | None = None,
        crop_size: Sequence[int] | None = None,
        name: str | None = None,
        seed: int = 0,
        skip_corrupt: bool = False,
        head_channels: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.dataset_factory = dataset
        self.tasks = check_tasks(tasks, where="data.tasks")
        self.train_split, self.val_split = train_split, val_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.edge_pos_weight = edge_pos_weight
        self.edge_tolerance = edge_tolerance
        self.loss_weights = dict(loss_weights or {})
        self.train_transform, self.val_transform = train_transform, val_transform
        # Only what is set reaches the factory, so datasets without a root or layout need not take one.
        self.dataset_kwargs = {k: v for k, v in (("root", root), ("layout", layout)) if v is not None}
        self.crop_size = list(crop_size) if crop_size is not None else None
        self.name = name
        self.seed = int(seed)
        self.skip_corrupt = bool(skip_corrupt)
        self.head_channels = dict(head_channels or {})
        unknown = [t for t in self.head_channels if t not in self.tasks]
        if unknown:
            raise ValueError(f"data.head_channels names {unknown}, which are not in data.tasks {self.tasks}")
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build_split(self, split: str, *, transform: Callable[[dict], dict] | None = None) -> Dataset:
        """The dataset of one split, as configured (used by setup and by `mtl-data check`)."""
        return self.dataset_factory(split=split, tasks=self.tasks, transform=transform, **self.dataset_kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = self.build_split(self.val_split, transform=self.val_transform)
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.build_split(self.train_split, transform=self.train_transform)

    @property
    def class_names(self) -> dict[str, list[str]]:
        """{task: class names} for the class-map tasks."""
        self.setup("validate")
        return {t: list(n) for t, n in getattr(self.val_set, "class_names", {}).items() if t in self.tasks}

    @property
    def task_channels(self) -> dict[str, int]:
        """Output channels of each task's head."""
        names = self.class_names
        channels = {}
        for task in self.tasks:
            spec = get_task(task)
            if spec.is_classification and task not in names:
                raise ValueError(f"dataset {type(self.val_set).__name__} gives no class_names for task {task!r}")
            channels[task] = spec.out_channels(len(names.get(task, ())) or None, requested=self.head_channels.get(task))
        return channels

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        common = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            # each loader's own generator: starting workers must not draw from the global RNG, which
            # a resumed run restores (MultiTaskModule.on_train_start) and then must consume as the
            # uninterrupted run did (which started its persistent workers at other times)
            "generator": torch.Generator().manual_seed(self.seed),
            "worker_init_fn": init_worker if self.num_workers > 0 else None,
        }
        if train:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, seed=self.seed)
            loader = ResumableLoader(
                SeededSamples(dataset, skip_corrupt=self.skip_corrupt),
                batch_size=self.batch_size, sampler=sampler, drop_last=True, **common,
            )
            loader.progress = self._epoch_progress
            if trainer is not None:
                loader.step_of = lambda: int(trainer.global_step)
            return loader
        sampler = None
        if world > 1:
            # Lightning's default DistributedSampler pads the split by repeating samples, which
            # biases split-level metrics; each val sample must be seen exactly once over all ranks.
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            dataset, batch_size=self.val_batch_size, shuffle=False, sampler=sampler,
            collate_fn=collate_padded_targets, **common,
        )  # fmt: skip

    def _epoch_progress(self) -> tuple[int, int]:
        """(batches of the current epoch that a checkpoint written now holds, batches per epoch),
        counted as Lightning counts them on resume: a batch whose step finished but whose
        `on_train_batch_end` did not (a checkpoint written by a callback there) is done; a batch
        caught mid-step is redone."""
        trainer = self.trainer
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        finished_step = progress.ready == progress.started == progress.processed == progress.completed + 1
        return (progress.processed if finished_step else progress.completed), int(trainer.num_training_batches)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, train=False)
