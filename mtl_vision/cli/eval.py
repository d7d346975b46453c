"""`mtl-eval ckpt=<path>`: evaluate a checkpoint on a split with the config saved in it.

Writes `eval_<checkpoint>.json` (flat `val/<task>/<metric>` dict, the keys of metrics.json, plus
`val/delta_m` when baselines cover every task) and `eval_<checkpoint>.md` (a paper-style table
with Δm) into the checkpoint's run directory: `eval_best.json` for `best.ckpt`, so evaluating
several checkpoints of a run keeps every result; `eval_<checkpoint>_<split>` for another split.
Under DDP (`trainer=ddp_cpu`, `trainer=ddp`) each image of the split is evaluated by exactly one
process (no padding by repetition) and the metrics' summed states are reduced across processes,
so the numbers equal those of one process.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from mtl_vision.cli import CONFIG_DIR, check_config_dir, exit_with_one_line, user_errors
from mtl_vision.cli.build import build_datamodule, build_module, eval_protocol, load_run, write_baseline
from mtl_vision.cli.overrides import check_overrides
from mtl_vision.engine.report import markdown_report, print_metric_table, write_json
from mtl_vision.fileio import atomic_write_text
from mtl_vision.metrics.protocols import check_protocol

log = logging.getLogger(__name__)


def evaluation_config(cfg: DictConfig) -> tuple[DictConfig, object, dict]:
    """The checkpoint's run config with the overrides of the eval config applied (`data`,
    `delta_m`, `eval.protocol`)."""
    run_cfg, facts, state = load_run(cfg.ckpt)
    with open_dict(run_cfg):
        for key, value in (cfg.get("data") or {}).items():
            if value is None:
                continue
            if key in ("root", "layout") and key not in run_cfg.data:
                raise ValueError(
                    f"data.{key}={value!r}: the checkpoint's dataset ({run_cfg.data.get('name')}) reads no files "
                    f"and takes no {key}; leave data.{key} out"
                )
            run_cfg.data[key] = value
        run_cfg.data.val_split = cfg.split
        for key, value in (cfg.get("delta_m") or {}).items():
            if value is not None:
                run_cfg.delta_m[key] = value
        # eval.protocol: null keeps the protocol the run validated with (atrc before the key existed)
        protocol = (cfg.get("eval") or {}).get("protocol")
        if protocol is not None:
            if run_cfg.get("eval") is None:
                run_cfg.eval = {}
            run_cfg.eval.protocol = check_protocol(protocol, where="eval.protocol")
    return run_cfg, facts, state


def report_stem(ckpt: str, split: str) -> str:
    """`eval_<checkpoint stem>`, with `_<split>` for a split other than val."""
    stem = f"eval_{Path(ckpt).stem}"
    return stem if split == "val" else f"{stem}_{split}"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.ckpt` on `cfg.split`; returns the flat metrics dict (also on every rank)."""
    from mtl_vision.engine.quiet import quiet_lightning

    quiet_lightning()
    run_cfg, facts, state = evaluation_config(cfg)
    datamodule = build_datamodule(run_cfg)
    if datamodule.tasks != facts.tasks:
        raise ValueError(f"data.tasks {datamodule.tasks} differ from the checkpoint's tasks {facts.tasks}")
    module = build_module(run_cfg, facts, edge_exact=bool(cfg.edge_exact))
    module.load_state_dict(state)
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = dict(module.last_val_metrics)

    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        stem = report_stem(cfg.ckpt, cfg.split)
        write_json(out / f"{stem}.json", metrics)
        delta = module.delta_m
        report = markdown_report(
            metrics,
            module.eval_tasks,
            name=Path(cfg.ckpt).name,
            baselines=delta.baselines if delta is not None else None,
            convention=delta.convention if delta is not None else "mtinet",
            protocol=eval_protocol(run_cfg),
        )
        images = len(datamodule.val_set)
        header = f"# {cfg.ckpt}\n\nsplit `{cfg.split}` of `{run_cfg.data.get('name')}`, {images} images.\n\n"
        atomic_write_text(out / f"{stem}.md", header + report)
        print_metric_table(metrics, module.eval_tasks, title=f"{cfg.split}: {cfg.ckpt}", protocol=eval_protocol(run_cfg))
        log.info("wrote %s and %s", out / f"{stem}.json", out / f"{stem}.md")
        if cfg.get("write_baselines"):
            path = write_baseline(run_cfg, facts.tasks, datamodule.name, metrics, source=str(cfg.ckpt))
            log.info("single-task baseline of %s updated in %s", facts.tasks[0], path)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except user_errors() as err:
        exit_with_one_line(err, Path(cfg.paths.output_dir) / "eval.log")


def check_ckpt_argument(args: list[str]) -> None:
    """`ckpt=` must name a file before Hydra makes the run directory from it (its parent's parent)."""
    for arg in args:
        if arg.startswith("ckpt="):
            path = Path(arg.split("=", 1)[1])
            if not path.is_file():
                print(f"error: ckpt={str(path)!r}: no such checkpoint file", file=sys.stderr)
                raise SystemExit(1)


def main() -> None:
    check_config_dir()
    check_ckpt_argument(sys.argv[1:])
    check_overrides("eval", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
