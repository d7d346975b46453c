"""`mtl-train`: compose the config, train, validate the final weights, report.

Writes `<run dir>/metrics.json` (flat `val/<task>/<metric>` dict from a validation pass over the
final weights) and returns the monitored value, so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from mtl_vision.cli import CONFIG_DIR, check_config_dir
from mtl_vision.cli.build import (
    build_datamodule,
    build_delta_m,
    build_module,
    build_trainer,
    resolve_monitor,
    write_baseline,
)
from mtl_vision.engine.callbacks import ImageThroughput
from mtl_vision.engine.report import print_metric_table, write_json
from mtl_vision.engine.tracking import finish_wandb
from mtl_vision.models.summary import format_summary, model_summary

log = logging.getLogger(__name__)


def summary_size(datamodule) -> tuple[int, int]:
    """The input size of the startup summary: the crop size, else the first validation image's."""
    if datamodule.crop_size:
        return tuple(datamodule.crop_size)
    datamodule.setup("validate")
    return tuple(datamodule.val_set[0]["image"].shape[-2:])


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint `fit` resumes from.

    `ckpt_path=last` (and, with `auto_resume`, no ckpt_path at all) takes the newest of the run
    directory's `checkpoints/last.ckpt` and the `hpc_ckpt_<n>.ckpt` that Lightning's SLURM
    environment writes when the job is preempted; a requeued job thereby continues from its own
    latest state. Any other value is a checkpoint file.

    Raises:
        FileNotFoundError: `ckpt_path` names no file, or `last` finds no checkpoint in the run directory.
    """
    run_dir = Path(cfg.paths.output_dir)
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    newest = str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        if newest is None:
            raise FileNotFoundError(
                f"ckpt_path=last: the run directory {run_dir} holds no checkpoints/last.ckpt or hpc_ckpt_*.ckpt; "
                "point hydra.run.dir at the run to resume"
            )
        return newest
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt_path={str(ckpt)!r}: no such checkpoint file")
        return str(ckpt)
    return newest if cfg.get("auto_resume", True) else None


def train(cfg: DictConfig) -> float:
    """Run one training job from a composed config; returns the monitored metric."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    if cfg.get("write_baselines") and len(datamodule.tasks) != 1:
        raise ValueError(f"write_baselines (experiment=single_task) trains one task, got data.tasks={datamodule.tasks}")
    resolve_monitor(cfg, datamodule.tasks, build_delta_m(cfg))
    module = build_module(cfg, datamodule, save_run_info=True)
    trainer = build_trainer(cfg, module)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg)

    if trainer.is_global_zero:
        log.info(
            "tasks %s, output channels %s; run directory %s", datamodule.tasks, datamodule.task_channels, output_dir
        )
        if ckpt_path is not None:
            log.info("resuming from %s", ckpt_path)
        if cfg.get("summary", True):
            size = summary_size(datamodule)
            summary = model_summary(module.model, size)
            log.info("%s", format_summary(summary, size))
            for logger in trainer.loggers:
                logger.log_hyperparams({f"model/{k}": v for k, v in summary.items()})

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.save_last and checkpoint.dirpath:
        # Lightning leaves last.ckpt at the previous validation when max_steps ends training on
        # an epoch boundary; the last checkpoint must hold the final weights.
        trainer.save_checkpoint(
            Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        )
    # Lightning skips validation when max_steps ends training mid-epoch; the reported numbers must
    # always describe the final weights, so validate them unless that just happened.
    if module.last_val_step != trainer.global_step or not module.last_val_metrics:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = dict(module.last_val_metrics)
    if cfg.monitor not in metrics:
        raise KeyError(f"monitor={cfg.monitor!r} was not computed; available: {sorted(metrics)}")

    if trainer.is_global_zero:
        throughput = next((c for c in trainer.callbacks if isinstance(c, ImageThroughput)), None)
        if throughput is not None and throughput.mean_images_per_s is not None:
            log.info("training throughput: %.1f images/s", throughput.mean_images_per_s)
        write_json(output_dir / "metrics.json", metrics)
        print_metric_table(metrics, datamodule.tasks, title=f"validation ({cfg.monitor} = {metrics[cfg.monitor]:.4g})")
        log.info("metrics written to %s", output_dir / "metrics.json")
        if cfg.get("write_baselines"):
            path = write_baseline(cfg, datamodule.tasks, datamodule.name, metrics, source=str(output_dir))
            log.info("single-task baseline of %s written to %s", datamodule.tasks[0], path)
    finish_wandb()  # complete the wandb run's files before the next job of a sweep starts its own
    return metrics[cfg.monitor]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    if cfg.get("print_config", False):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    return train(cfg)


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
