"""Training step time of each balancing strategy relative to equal weighting (`ew`).

Every strategy of conf/balancer runs real training steps (`Trainer.fit` of the module that
`build_module` builds, on random NYUD-like samples) for 2, 4 and 6 tasks (the first N tasks of the
synthetic dataset: semseg depth normals edge saliency human_parts); gradient balancers run in both
`mode=params` and `mode=features`. Each (strategy, mode, tasks) is measured in a fresh process. A
step is timed from `on_train_batch_start` to `on_train_batch_end`: forward, backward(s),
aggregation and the optimiser step, under automatic (weighting) and manual (gradient) optimisation
alike; the median of the timed steps after the warm-up ones is reported.

    mtl-bench balancers
    mtl-bench balancers --balancers ew famo pcgrad --steps 2 --size 64x80 --tasks-counts 2
    mtl-bench balancers --modes features --tasks-counts 4 --json bench.json

Targets: famo at most 1.1x ew; gradient strategies in features mode at most 1.5x ew at 4 tasks
(cells over a target are in bold); params mode is reported as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from mtl_vision.bench.decoders import NUM_CLASSES, parse_size, synthetic_tasks
from mtl_vision.bench.report import Result

__all__ = ["add_arguments", "measure", "run"]

MODES = ("params", "features")
FAMO_TARGET, FEATURES_TARGET, FEATURES_TARGET_TASKS = 1.1, 1.5, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="resnet18", help="a conf/backbone option (not pretrained)")
    parser.add_argument("--size", type=parse_size, default=(128, 160), metavar="HxW", help="default 128x160")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--tasks-counts", type=int, nargs="+", default=[2, 4, 6], metavar="N",
                        help="task counts: the first N tasks of the synthetic dataset")
    parser.add_argument("--balancers", nargs="+", default=None, help="conf/balancer options (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="of gradient balancers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--in-process", action="store_true", help="measure every cell in this process (quick)")


def _strategies() -> dict[str, tuple[str, ...]]:
    """{balancer option: the modes it declares, () for a loss weighting}, from conf/balancer."""
    from omegaconf import OmegaConf

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import balancer_modes

    return {p.stem: balancer_modes(OmegaConf.load(p)) for p in sorted((CONFIG_DIR / "balancer").glob("*.yaml"))}


def _random_dataset(tasks: list[str], size: tuple[int, int], n: int, seed: int = 0) -> list[dict]:
    """n random samples with valid targets in each task's format (see mtl_vision/losses.py)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, w = size
    samples = []
    for _ in range(n):
        sample = {"image": torch.rand(3, h, w, generator=gen)}
        for task in tasks:
            if task in NUM_CLASSES:
                sample[task] = torch.randint(0, NUM_CLASSES[task], (h, w), generator=gen)
            elif task == "depth":
                sample[task] = torch.rand(1, h, w, generator=gen) * 5 + 0.5
            elif task == "normals":
                sample[task] = torch.nn.functional.normalize(torch.randn(3, h, w, generator=gen), dim=0)
            else:  # edge, saliency
                sample[task] = (torch.rand(1, h, w, generator=gen) > 0.8).float()
        samples.append(sample)
    return samples


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time `spec["warmup"] + spec["steps"]` training steps of `Trainer.fit` with balancer
    `spec["balancer"]` (in `spec["mode"]`, None for a weighting) on the first `spec["tasks"]` tasks.
    Returns the median timed step (s), the timed steps, and whether optimisation is manual."""
    import statistics

    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import TaskFacts, build_module
    from mtl_vision.tasks import get_task

    torch.set_num_threads(int(spec["threads"]))
    tasks = list(synthetic_tasks()[: int(spec["tasks"])])
    mode = spec["mode"]
    overrides = [
        f"balancer={spec['balancer']}",
        f"backbone={spec['backbone']}",
        "backbone.pretrained=false",
        "decoder=heads",
        f"data.tasks=[{','.join(tasks)}]",
        *([f"balancer.mode={mode}"] if mode else []),
        *spec["overrides"],
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    channels = {t: get_task(t).out_channels(NUM_CLASSES.get(t)) for t in tasks}
    names = {t: [str(i) for i in range(c)] for t, c in channels.items() if t in NUM_CLASSES}
    facts = TaskFacts(tasks=tasks, task_channels=channels, class_names=names, edge_tolerance=0.011)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, facts)
    warmup, steps, batch = int(spec["warmup"]), int(spec["steps"]), int(spec["batch"])
    total = warmup + steps
    data = _random_dataset(tasks, tuple(spec["size"]), total * batch)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=0)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    timed = timer.times[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"expected {total} training steps, the timer saw {len(timer.times)}")
    return {"step_s": statistics.median(timed), "times_s": timed,
            "manual_optimization": not module.automatic_optimization}


def _runs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(balancer, mode or None) rows: ew first, gradient balancers once per mode."""
    strategies = _strategies()
    chosen = args.balancers or list(strategies)
    unknown = [b for b in chosen if b not in strategies]
    if unknown:
        raise SystemExit(f"--balancers: unknown {unknown}; conf/balancer has {sorted(strategies)}")
    chosen = ["ew", *[b for b in chosen if b != "ew"]]  # the reference is always measured
    rows = []
    for b in chosen:
        rows.extend([(b, m) for m in args.modes if m in strategies[b]] if strategies[b] else [(b, None)])
    return rows


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(spec)` in this process, a failure as {"error": message}."""
    try:
        return measure(spec)
    except Exception as error:  # noqa: BLE001 -- any failure is reported in the strategy's row
        return {"error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]}


def _measure_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(spec)` in a fresh Python process: its result or {"error": the last line of its stderr}."""
    proc = subprocess.run([sys.executable, "-m", "mtl_vision.bench.balancers", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return {"error": err[-1] if err else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(balancer: str, mode: str | None) -> str:
    return f"{balancer} ({mode})" if mode else balancer


def _target(balancer: str, mode: str | None) -> tuple[float, int | None] | None:
    """(max ratio to ew, task count it applies to or None for all) of the issue's targets."""
    if balancer == "famo":
        return FAMO_TARGET, None
    if mode == "features":
        return FEATURES_TARGET, FEATURES_TARGET_TASKS
    return None


def _markdown(counts: list[int], runs: list[tuple[str, str | None]], results: dict) -> list[str]:
    """The README table: ew's seconds per step, then every other strategy as a multiple of ew."""
    lines = ["| strategy | " + " | ".join(f"{n} tasks" for n in counts) + " | target |",
             "|---|" + "---:|" * len(counts) + "---|"]
    ew = {n: results[("ew", None, n)] for n in counts}
    lines.append("| ew (s/step) | " + " | ".join(
        f"{ew[n]['step_s']:.3f} s" if "step_s" in ew[n] else "failed" for n in counts) + " | |")
    for balancer, mode in runs:
        if balancer == "ew":
            continue
        target = _target(balancer, mode)
        cells = []
        for n in counts:
            r, ref = results[(balancer, mode, n)], ew[n]
            if "step_s" not in r or "step_s" not in ref:
                cells.append("failed")
                continue
            cell = f"{r['step_s'] / ref['step_s']:.2f}x"
            if target is not None and (target[1] is None or target[1] == n) and r["step_s"] / ref["step_s"] > target[0]:
                cell = f"**{cell}**"
            cells.append(cell)
        note = "" if target is None else f"<= {target[0]:.1f}x" + (f" at {target[1]} tasks" if target[1] else "")
        lines.append(f"| {_label(balancer, mode)} | " + " | ".join(cells) + f" | {note} |")
    return lines


def run(args: argparse.Namespace) -> Result:
    started = time.perf_counter()
    names = synthetic_tasks()
    bad = [n for n in args.tasks_counts if not 1 <= n <= len(names)]
    if bad:
        raise SystemExit(f"--tasks-counts {bad}: the synthetic dataset has {len(names)} tasks ({' '.join(names)})")
    runs = _runs(args)
    results: dict[tuple[str, str | None, int], dict] = {}
    for balancer, mode in runs:
        for n in args.tasks_counts:
            spec = {"balancer": balancer, "mode": mode, "tasks": n, "backbone": args.backbone,
                    "size": list(args.size), "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                    "threads": args.threads, "overrides": list(args.overrides)}
            measured = _measure_here(spec) if args.in_process else _measure_in_child(spec)
            results[(balancer, mode, n)] = r = measured
            done = f"failed: {r['error']}" if "error" in r else f"{r['step_s']:.3f} s/step"
            print(f"  {_label(balancer, mode)}, {n} tasks: {done}", file=sys.stderr, flush=True)
    rows = []
    for balancer, mode in runs:
        for n in args.tasks_counts:
            r, ref = results[(balancer, mode, n)], results[("ew", None, n)]
            ok = "step_s" in r and "step_s" in ref
            rows.append({"balancer": balancer, "mode": mode or "", "tasks": n,
                         "step_s": r.get("step_s", float("nan")),
                         "x_ew": r["step_s"] / ref["step_s"] if ok else float("nan"),
                         "manual_optimization": r.get("manual_optimization", ""),
                         "error": r.get("error", "")})
    h, w = args.size
    notes = [
        f"backbone {args.backbone} (random init), decoder heads, {h}x{w}, batch {args.batch}, cpu, {args.threads} "
        f"threads; step = forward + backward(s) + aggregation + AdamW (Trainer.fit), median of {args.steps} after "
        f"{args.warmup} warm-up; "
        + ("every cell in this process" if args.in_process else "each cell in a fresh process") + "; tasks: "
        + "; ".join(f"{n}: {' '.join(names[:n])}" for n in args.tasks_counts),
        "",
        *_markdown(list(args.tasks_counts), runs, results),
        "",
        f"total {time.perf_counter() - started:.0f} s",
    ]
    settings = {"backbone": args.backbone, "size": f"{h}x{w}", "batch": args.batch, "warmup": args.warmup,
                "steps": args.steps, "threads": args.threads}
    if args.overrides:
        settings["overrides"] = " ".join(args.overrides)
    return Result(title="Balancers: training step time relative to ew", rows=rows, settings=settings, notes=notes)


if __name__ == "__main__":
    # one measuring process: `python -m mtl_vision.bench.balancers '<spec as JSON>'`
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(json.dumps(measure(json.loads(sys.argv[1]))))
