"""Builds the training objects from a composed config (shared by the entry points)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_vision.data.datamodule import MultiTaskDataModule
from mtl_vision.engine.checkpoint import read_checkpoint
from mtl_vision.engine.module import RUN_INFO_KEY, MultiTaskModule
from mtl_vision.metrics.delta_m import KEY as DELTA_M_KEY
from mtl_vision.metrics.delta_m import DeltaM, task_metrics, update_baselines
from mtl_vision.metrics.protocols import check_protocol, protocol_primary
from mtl_vision.models.model import MultiTaskModel
from mtl_vision.tasks import get_task


def build_datamodule(cfg: DictConfig) -> MultiTaskDataModule:
    datamodule = instantiate(cfg.data)
    if not isinstance(datamodule, L.LightningDataModule):
        raise TypeError(f"data: _target_ must build a LightningDataModule, got {type(datamodule).__name__}")
    return datamodule


def build_delta_m(cfg: DictConfig) -> DeltaM | None:
    """The Δm calculator of `cfg.delta_m`, or None when the config has no `delta_m` node."""
    node = cfg.get("delta_m")
    if node is None:
        return None
    return DeltaM(node.get("baselines"), node.get("convention", "mtinet"), protocol=eval_protocol(cfg))


def balancer_modes(node: DictConfig) -> tuple[str, ...]:
    """The modes a balancer config node declares it runs in: those of its GradientBalancer
    (`GradientBalancer.modes`: a strategy with state per shared parameter runs in params mode
    only), () for a loss weighting (a node without `mode`)."""
    if "mode" not in node:
        return ()
    node = node.copy()
    with open_dict(node):
        node.seed, node.mode = 0, "params"
    return tuple(instantiate(node, tasks=["semseg", "depth"]).modes)


def evaluated_tasks(cfg: DictConfig, tasks: list[str]) -> list[str]:
    """The trained tasks that get a final prediction, metrics and pictures: all of `tasks` but the
    decoder's `auxiliary_tasks` (supervised only through its intermediate predictions, as the
    edges and normals of MTI-Net's and PAD-Net's NYUD runs)."""
    from mtl_vision.models.decoders.common import final_tasks_of

    return final_tasks_of(tasks, list((cfg.get("decoder") or {}).get("auxiliary_tasks") or []))


def eval_protocol(cfg: DictConfig) -> str:
    """`cfg.eval.protocol` checked (mtl_vision/metrics/protocols.py); `atrc` for configs without it
    (checkpoints written before the key existed)."""
    return check_protocol((cfg.get("eval") or {}).get("protocol"), where="eval.protocol")


def check_monitor(monitor: str, tasks: list[str], delta_m: DeltaM | None = None) -> None:
    """The monitor must name something this run logs: `val/loss`, `val/delta_m` (with baselines
    for every task) or `val/<task>/<metric>`."""
    parts = monitor.split("/")
    if len(parts) < 2 or parts[0] != "val":
        raise ValueError(f"monitor={monitor!r}: expected 'val/loss', 'val/delta_m', 'val/<task>/<metric>' or 'auto'")
    if parts[1] == DELTA_M_KEY and len(parts) == 2:
        if delta_m is None or not delta_m.covers(tasks):
            where = delta_m.path if delta_m is not None else "(no delta_m config)"
            have = sorted(delta_m.baselines) if delta_m is not None else []
            raise ValueError(
                f"monitor={monitor!r} needs single-task baselines for every task {tasks} in {where}, which has {have}; "
                "write them with `mtl-train experiment=single_task data.tasks=[<task>]`"
            )
    elif len(parts) >= 3 and parts[1] not in tasks:
        raise ValueError(
            f"monitor={monitor!r} names task {parts[1]!r}, but the run trains {tasks}; set monitor=val/<task>/<metric>"
        )


def resolve_monitor(cfg: DictConfig, tasks: list[str], delta_m: DeltaM | None) -> None:
    """Replace `monitor: auto` (and its mode) by a concrete metric, then check the monitor.

    auto = `val/delta_m` (max) when the baselines cover every task, else the first task's primary
    metric under the run's evaluation protocol (MTI-Net's saliency mIoU under `mtinet`), or its
    training-time stand-in (e.g. `odsF_approx`, where the primary is too costly to compute at every
    validation), in that metric's direction.
    """
    if cfg.monitor == "auto":
        if delta_m is not None and delta_m.covers(tasks):
            monitor, mode = f"val/{DELTA_M_KEY}", "max"
        else:
            spec = get_task(tasks[0])
            key = protocol_primary(tasks[0], eval_protocol(cfg)) or spec.selection_key
            monitor = f"val/{tasks[0]}/{key}"
            mode = "min" if key in spec.lower_is_better_keys else "max"
        with open_dict(cfg):
            cfg.monitor, cfg.monitor_mode = monitor, mode
    check_monitor(cfg.monitor, tasks, delta_m)


@dataclass(frozen=True)
class TaskFacts:
    """What the heads and metrics are built from: the dataset's tasks, output channels, class
    names and boundary tolerance. Saved in checkpoints, so a model can be rebuilt without its data."""

    tasks: list[str]
    task_channels: dict[str, int]
    class_names: dict[str, list[str]]
    edge_tolerance: float

    @classmethod
    def of(cls, datamodule: MultiTaskDataModule) -> TaskFacts:
        return cls(
            tasks=list(datamodule.tasks),
            task_channels=dict(datamodule.task_channels),
            class_names=dict(datamodule.class_names),
            edge_tolerance=float(datamodule.edge_tolerance),
        )


def run_info(cfg: DictConfig, facts: TaskFacts) -> dict:
    """What a checkpoint stores to be rebuilt: the resolved config without Hydra's own node, and
    the task facts."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return {"config": OmegaConf.to_container(cfg, resolve=True), "facts": asdict(facts)}


def build_module(
    cfg: DictConfig,
    datamodule: MultiTaskDataModule | TaskFacts,
    *,
    edge_exact: bool = False,
    save_run_info: bool = False,
) -> MultiTaskModule:
    """The LightningModule of `cfg` for the tasks of `datamodule` (or of saved `TaskFacts`).

    `edge_exact` adds the exact BSDS boundary metrics (odsF, oisF, ap; about a second per image)
    to the cheap `odsF_approx`; `save_run_info` stores the config and facts in every checkpoint.
    The metrics score with the evaluation protocol `cfg.eval.protocol` (atrc | invpt | mtinet).
    """
    facts = datamodule if isinstance(datamodule, TaskFacts) else TaskFacts.of(datamodule)
    tasks, channels = facts.tasks, facts.task_channels
    protocol = eval_protocol(cfg)  # checked before anything is built
    backbone = instantiate(cfg.backbone, tasks=tasks)
    if cfg.get("peft") is not None:
        # parameter-efficient fine-tuning (conf/peft): adapts the built backbone in place
        instantiate(cfg.peft).apply(backbone, tasks)
    decoder = instantiate(cfg.decoder, in_channels=backbone.channels, strides=backbone.strides, task_channels=channels)
    metrics = {
        t: get_task(t).metric(
            num_classes=channels[t],
            class_names=facts.class_names.get(t),
            edge_tolerance=facts.edge_tolerance,
            edge_exact=edge_exact,
            protocol=protocol,
        )
        for t in evaluated_tasks(cfg, tasks)
    }
    return MultiTaskModule(
        model=MultiTaskModel(backbone=backbone, decoder=decoder),
        loss=instantiate(cfg.loss, tasks=tasks),
        balancer=instantiate(cfg.balancer, tasks=tasks),
        metrics=metrics,
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.sched) if cfg.get("sched") else None,
        delta_m=build_delta_m(cfg),
        expert_aux_weight=cfg.get("experts", {}).get("aux_loss_weight", 0.01),
        expert_stats_every=cfg.get("experts", {}).get("log_every_n_steps", 50),
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        gradient_clip_algorithm=cfg.trainer.get("gradient_clip_algorithm"),
        accumulate_grad_batches=cfg.trainer.get("accumulate_grad_batches") or 1,
        max_consecutive_nonfinite=cfg.get("guard", {}).get("max_consecutive_nonfinite", 25),
        no_weight_decay_1d=bool(cfg.get("no_weight_decay_1d", True)),
        run_info=run_info(cfg, facts) if save_run_info else None,
    )


def load_run(ckpt: str | os.PathLike) -> tuple[DictConfig, TaskFacts, dict]:
    """(run config, task facts, state_dict) of a checkpoint written by `mtl-train`.

    Raises:
        FileNotFoundError: no file at `ckpt`.
        ValueError: the file is not a checkpoint, or holds no saved run (not written by mtl-train).
    """
    path = Path(ckpt)
    checkpoint = read_checkpoint(path, name=f"ckpt={str(ckpt)!r}")
    info = checkpoint.get(RUN_INFO_KEY) if isinstance(checkpoint, dict) else None
    if not info or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt={str(path)!r} holds no saved run (key {RUN_INFO_KEY!r}); it was not written by mtl-train"
        )
    facts = TaskFacts(**info["facts"])
    cfg = OmegaConf.create(info["config"])
    # the weights come from the checkpoint: never download or read pretrained ones
    with open_dict(cfg):
        cfg.backbone.pretrained = False
        if "checkpoint_path" in cfg.backbone:
            cfg.backbone.checkpoint_path = None
    return cfg, facts, checkpoint["state_dict"]


def write_baseline(cfg: DictConfig, tasks: list[str], dataset: str | None, metrics: dict, source: str) -> Path:
    """Record the metrics of a single-task run in the baselines file `cfg.delta_m.baselines`."""
    if len(tasks) != 1:
        raise ValueError(f"single-task baselines come from one-task runs, this one has tasks {tasks}")
    task = tasks[0]
    return update_baselines(
        cfg.delta_m.baselines,
        task,
        task_metrics(metrics, task),
        dataset=dataset,
        backbone=cfg.backbone.get("name"),
        run=source,
        protocol=eval_protocol(cfg),
    )


def apply_performance_switches(cfg: DictConfig, module: MultiTaskModule) -> None:
    """`trainer.sync_batchnorm`, `channels_last` and `compile` applied to the module's model.

    SyncBatchNorm goes through timm's converter: Lightning's (torch's) converter turns timm's
    `BatchNormAct2d` into a plain `SyncBatchNorm` and silently drops its activation and drop
    layers. `compile` uses `nn.Module.compile`, which compiles in place, so state_dict keys (and
    checkpoints) stay those of the uncompiled model.
    """
    model = module.model
    if cfg.trainer.get("sync_batchnorm"):
        from timm.layers import convert_sync_batchnorm

        module.model = model = convert_sync_batchnorm(model)
    if cfg.get("channels_last"):
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if cfg.get("compile"):
        for part in (model.backbone, model.decoder):
            part.compile(backend=cfg.get("compile_backend") or "inductor")


def build_trainer(cfg: DictConfig, module: MultiTaskModule | None = None) -> L.Trainer:
    """The Trainer of `cfg`, with the module's performance switches applied (see
    `apply_performance_switches`; the Trainer itself then gets `sync_batchnorm=False`). Under
    manual optimisation (balancers that need task gradients) the module applies gradient clipping
    and accumulation itself, so the Trainer gets neither."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    overrides = {}
    if module is not None:
        apply_performance_switches(cfg, module)
        overrides["sync_batchnorm"] = False
        if not module.automatic_optimization:
            overrides |= {"gradient_clip_val": None, "gradient_clip_algorithm": None, "accumulate_grad_batches": 1}
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
