"""`mtl-train`: compose the config, train, validate the final weights, report.

Writes `<run dir>/metrics.json` (flat `val/<task>/<metric>` dict from a validation pass over the
final weights) and returns the monitored value, so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_vision.cli import CONFIG_DIR, check_config_dir, exit_with_one_line, user_errors
from mtl_vision.cli.overrides import check_overrides
from mtl_vision.cli.resume import read_resume_point, resume_checkpoint
from mtl_vision.errors import TrainingStopped

# torch, Lightning and the model code are imported inside train(): `mtl-train --help` and
# `--cfg job` answer without them

log = logging.getLogger(__name__)


def summary_size(datamodule) -> tuple[int, int]:
    """The input size of the startup summary: the crop size, else the first validation image's."""
    if datamodule.crop_size:
        return tuple(datamodule.crop_size)
    datamodule.setup("validate")
    return tuple(datamodule.val_set[0]["image"].shape[-2:])


def non_finite_results(metrics: dict[str, float], tasks: list[str], monitor: str) -> list[str]:
    """The monitored metric and the tasks' primary metrics that are inf or NaN."""
    from mtl_vision.tasks import get_task

    keys = {monitor, *(f"val/{t}/{get_task(t).selection_key}" for t in tasks)}
    return sorted(k for k in keys if k in metrics and not math.isfinite(metrics[k]))


def found_in_run_dir(cfg: DictConfig) -> bool:
    """Whether the checkpoint to resume from is picked from the run directory (auto_resume,
    ckpt_path=last) rather than named."""
    return cfg.get("ckpt_path") in (None, "last")


def write_run_config(cfg: DictConfig, output_dir: Path) -> None:
    """`<run dir>/.hydra/{config,hydra,overrides}.yaml`, as Hydra writes them; `mtl-train` turns
    Hydra's own write off (`hydra.output_subdir: null`) so that a run directory's files are only
    rewritten once its checkpoint is known to fit the new config."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = output_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    task_cfg = cfg.copy()
    with open_dict(task_cfg):
        task_cfg.pop("hydra", None)
    OmegaConf.save(task_cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def resume_command(output_dir: Path) -> str:
    """The command that continues this run: its overrides and its run directory."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "ckpt_path=", "auto_resume="))]
    return shlex.join(["mtl-train", *kept, f"hydra.run.dir={output_dir}"])


def train(cfg: DictConfig) -> float:
    """Run one training job from a composed config; returns the monitored metric.

    Raises:
        TrainingInterrupted: SIGINT, SIGTERM or SIGUSR1 stopped training after writing a checkpoint.
    """
    import lightning as L

    from mtl_vision.cli.build import (
        build_datamodule,
        build_delta_m,
        build_module,
        build_trainer,
        evaluated_tasks,
        resolve_monitor,
        write_baseline,
    )
    from mtl_vision.cli.preflight import preflight
    from mtl_vision.engine.callbacks import ImageThroughput
    from mtl_vision.engine.history import continue_history
    from mtl_vision.engine.quiet import quiet_lightning
    from mtl_vision.cli.build import eval_protocol
    from mtl_vision.engine.report import print_metric_table, write_json
    from mtl_vision.engine.tracking import finish_wandb
    from mtl_vision.engine.weights import load_model_weights
    from mtl_vision.models.summary import format_summary, model_summary

    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    if cfg.get("write_baselines") and len(datamodule.tasks) != 1:
        raise ValueError(f"write_baselines (experiment=single_task) trains one task, got data.tasks={datamodule.tasks}")
    resolve_monitor(cfg, evaluated_tasks(cfg, datamodule.tasks), build_delta_m(cfg))
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg)
    point = read_resume_point(ckpt_path, cfg, found=found_in_run_dir(cfg)) if ckpt_path is not None else None
    module = build_module(cfg, datamodule, save_run_info=True)
    init_report = None
    if cfg.get("init_from"):
        if point is not None:
            log.warning("init_from=%s is not used: the run resumes from %s", cfg.init_from, ckpt_path)
        else:
            init_report = load_model_weights(
                module.model, cfg.init_from, skip_mismatched=bool(cfg.get("init_from_skip_mismatched"))
            )
    trainer = build_trainer(cfg, module)
    warning = preflight(cfg, datamodule, module, trainer, point.global_step if point else 0)
    # only now that the checkpoint fits: the run directory's config, and its history continued
    if trainer.is_global_zero:
        write_run_config(cfg, output_dir)
    continue_history(trainer.loggers, point.global_step if point else None)

    if trainer.is_global_zero:
        log.info(
            "tasks %s, output channels %s; run directory %s", datamodule.tasks, datamodule.task_channels, output_dir
        )
        if point is not None:
            log.info("resuming from %s (step %d)", ckpt_path, point.global_step)
        if init_report is not None:
            log.info("%s", init_report.summary(cfg.init_from))
        if warning:
            log.warning("%s", warning)
        if cfg.get("summary", True):
            size = summary_size(datamodule)
            summary = model_summary(module.model, size)
            log.info("%s", format_summary(summary, size))
            for logger in trainer.loggers:
                logger.log_hyperparams({f"model/{k}": v for k, v in summary.items()})

    # our own checkpoints hold the run config and callback states: plain Python objects
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
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
        print_metric_table(
            metrics,
            module.eval_tasks,
            title=f"validation ({cfg.monitor} = {metrics[cfg.monitor]:.4g})",
            protocol=eval_protocol(cfg),
        )
        log.info("metrics written to %s", output_dir / "metrics.json")
    diverged = non_finite_results(metrics, module.eval_tasks, cfg.monitor)
    if trainer.is_global_zero and cfg.get("write_baselines") and not diverged:
        path = write_baseline(cfg, datamodule.tasks, datamodule.name, metrics, source=str(output_dir))
        log.info("single-task baseline of %s written to %s", datamodule.tasks[0], path)
    finish_wandb()  # complete the wandb run's files before the next job of a sweep starts its own
    if diverged:
        raise TrainingStopped(
            f"the final weights give non-finite {diverged} (metrics.json has them): the run diverged, "
            f"{module.guard.skipped} of {trainer.global_step} optimiser steps were skipped as non-finite "
            f"(train/skipped_steps); lower optim.lr"
        )
    return metrics[cfg.monitor]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    if cfg.get("print_config", False):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    from mtl_vision.engine.interrupt import TrainingInterrupted
    from mtl_vision.engine.tracking import finish_wandb

    try:
        return train(cfg)
    except TrainingInterrupted as stop:
        output_dir = Path(cfg.paths.output_dir)
        finish_wandb(exit_code=1)
        if stop.requeued:
            log.warning("%s; the requeued job resumes from it", stop)
            raise SystemExit(0) from None
        log.warning("%s; resume with:\n  %s", stop, resume_command(output_dir))
        raise SystemExit(128 + stop.signum) from None
    except user_errors() as err:
        exit_with_one_line(err, Path(cfg.paths.output_dir) / "train.log")


def main() -> None:
    check_config_dir()
    check_overrides("train", sys.argv[1:])
    try:
        _hydra_main()
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: the checkpoints stay as they were
        print("interrupted; checkpoints already in the run directory are unchanged", file=sys.stderr)
        raise SystemExit(128 + 2) from None


if __name__ == "__main__":
    main()
