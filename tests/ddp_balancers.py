"""Worker of the DDP-equivalence test (`test_balancer_ddp.py`): trains a few steps with each named
balancer on 1 process (global batch) or 2 gloo processes (half the batch each), and saves the
final parameters, so the test can compare them.

`python tests/ddp_balancers.py OUT_DIR DEVICES STEPS BALANCER[:override,...] ...`

The training data is the synthetic validation split (no augmentation), in order: with 2 processes
rank r reads the samples r, r+2, ..., so the two halves of every
step together are the single process's batch. Batch norm layers are kept in eval mode: a batch
norm normalises each process's half with that half's own statistics, which no gradient handling
can make equal to the global batch's (that is SyncBatchNorm's job, which needs CUDA).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler, Subset

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY

from mtl_vision.cli import CONFIG_DIR
from mtl_vision.cli.build import build_datamodule, build_module

# Losses average over valid pixels, so the mean of two half-batch losses is the global batch's loss
# only when every sample has the same number of valid pixels (true of any DDP training). The test
# therefore trains on samples whose targets are valid everywhere, and leaves out human_parts,
# whose labels cover the person only.
TASKS = "[semseg,depth,normals,edge,saliency]"
GLOBAL_BATCH = 4


class Interleaved(Sampler):
    """Samples r, r+R, r+2R, ... in order on rank r of R (decided when iterated, once the process
    group exists), so the ranks' halves of a step together are one process's global batch."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = self._rank()
        return len(range(rank, self.size, world))


class FrozenBatchNorm(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for module in pl_module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def fully_valid(dataset, count: int) -> list[int]:
    """The first `count` samples whose depth and normals are valid at every pixel."""
    chosen = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if bool((sample["depth"] > 0).all()) and bool((sample["normals"].abs().sum(0) > 0).all()):
            chosen.append(i)
        if len(chosen) == count:
            return chosen
    raise RuntimeError(f"only {len(chosen)} fully valid samples among {len(dataset)}; need {count}")


def run(out: Path, devices: int, steps: int, spec: str) -> None:
    name, _, extra = spec.partition(":")
    overrides = [o for o in TINY if not o.startswith("data.dataset.num_samples")]
    overrides += [
        f"balancer={name}",
        f"data.tasks={TASKS}",
        "data.dataset.num_samples={train:4,val:32}",
        "optim=sgd",
        "optim.lr=0.05",
        "seed=3",
        *[o for o in extra.split(",") if o],
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup("validate")
    module = build_module(cfg, datamodule)
    dataset = Subset(datamodule.val_set, fully_valid(datamodule.val_set, GLOBAL_BATCH * steps))
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // devices, sampler=Interleaved(len(dataset)))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[FrozenBatchNorm()],
        use_distributed_sampler=False,
    )
    stem = spec.replace(":", "__").replace(",", "_").replace("=", "-")
    if devices == 1:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out / f"{stem}_initial.pt")
    trainer.fit(module, train_dataloaders=loader)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, out / f"{stem}_{devices}.pt")


if __name__ == "__main__":
    out_dir, n_devices, n_steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    for balancer in sys.argv[4:]:
        run(out_dir, n_devices, n_steps, balancer)
