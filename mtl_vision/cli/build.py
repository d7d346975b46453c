"""Builds the training objects from a composed config (shared by the entry points)."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from mtl_vision.data.datamodule import MultiTaskDataModule
from mtl_vision.engine.module import MultiTaskModule
from mtl_vision.models.model import MultiTaskModel
from mtl_vision.tasks import get_task


def build_datamodule(cfg: DictConfig) -> MultiTaskDataModule:
    datamodule = instantiate(cfg.data)
    if not isinstance(datamodule, L.LightningDataModule):
        raise TypeError(f"data: _target_ must build a LightningDataModule, got {type(datamodule).__name__}")
    return datamodule


def check_monitor(monitor: str, tasks: list[str]) -> None:
    """The monitor must name something this run logs: `val/loss` or `val/<task>/<metric>`."""
    parts = monitor.split("/")
    if len(parts) < 2 or parts[0] != "val":
        raise ValueError(f"monitor={monitor!r}: expected 'val/loss' or 'val/<task>/<metric>'")
    if len(parts) >= 3 and parts[1] not in tasks:
        raise ValueError(f"monitor={monitor!r} names task {parts[1]!r}, but the run trains {tasks}; set monitor=val/<task>/<metric>")


def build_module(cfg: DictConfig, datamodule: MultiTaskDataModule) -> MultiTaskModule:
    tasks = datamodule.tasks
    channels = datamodule.task_channels
    class_names = datamodule.class_names
    backbone = instantiate(cfg.backbone)
    decoder = instantiate(cfg.decoder, in_channels=backbone.channels, strides=backbone.strides, task_channels=channels)
    metrics = {
        t: get_task(t).metric(num_classes=channels[t], class_names=class_names.get(t), edge_tolerance=datamodule.edge_tolerance)
        for t in tasks
    }
    return MultiTaskModule(
        model=MultiTaskModel(backbone=backbone, decoder=decoder),
        loss=instantiate(cfg.loss, tasks=tasks),
        balancer=instantiate(cfg.balancer, tasks=tasks),
        metrics=metrics,
        optimizer=instantiate(cfg.optim),
        scheduler=instantiate(cfg.sched) if cfg.get("sched") else None,
    )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
