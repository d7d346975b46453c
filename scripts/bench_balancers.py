"""Training step time of each balancing strategy relative to equal weighting (`ew`).

Every strategy of conf/balancer runs real training steps (`Trainer.fit` of the module that
`build_module` builds, on random NYUD-like samples) for 2, 4 and 6 tasks; gradient balancers run
in both `mode=params` and `mode=features`. Each (strategy, mode, tasks) is measured in a fresh
process. A step is timed from `on_train_batch_start` to `on_train_batch_end`: forward, backward(s),
aggregation and the optimiser step, under automatic (weighting) and manual (gradient) optimisation
alike; the median of the timed steps after the warm-up ones is reported.

    python scripts/bench_balancers.py
    python scripts/bench_balancers.py --balancers ew famo pcgrad --steps 2 --size 64 80 --tasks-counts 2
    python scripts/bench_balancers.py --modes features --tasks-counts 4 --json bench.json

Targets: famo at most 1.1x ew; gradient strategies in features mode at most 1.5x ew at 4 tasks
(cells over a target are in bold); params mode is reported as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

NYUD_CHANNELS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1, "saliency": 1, "human_parts": 7}
TASK_ORDER = list(NYUD_CHANNELS)  # 2 tasks = the first two, 4 = the first four, 6 = all
MODES = ("params", "features")
FAMO_TARGET, FEATURES_TARGET, FEATURES_TARGET_TASKS = 1.1, 1.5, 4


def _strategies() -> dict[str, tuple[str, ...]]:
    """{balancer option: the modes it declares, () for a loss weighting}, from conf/balancer."""
    from omegaconf import OmegaConf

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import balancer_modes

    return {p.stem: balancer_modes(OmegaConf.load(p)) for p in sorted((CONFIG_DIR / "balancer").glob("*.yaml"))}


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", help="a conf/backbone option (not pretrained)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--tasks-counts", type=int, nargs="+", default=[2, 4, 6], choices=range(1, 7))
    parser.add_argument("--balancers", nargs="+", default=None, help="conf/balancer options (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="of gradient balancers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # balancer:mode:n_tasks
    return parser.parse_args(argv)


def _random_dataset(tasks: list[str], size: tuple[int, int], n: int, seed: int = 0) -> list[dict]:
    """n random samples with valid targets in each task's format (see mtl_vision/losses.py)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, w = size
    samples = []
    for _ in range(n):
        sample = {"image": torch.rand(3, h, w, generator=gen)}
        for task in tasks:
            c = NYUD_CHANNELS[task]
            if task in ("semseg", "human_parts"):
                sample[task] = torch.randint(0, c, (h, w), generator=gen)
            elif task == "depth":
                sample[task] = torch.rand(1, h, w, generator=gen) * 5 + 0.5
            elif task == "normals":
                sample[task] = torch.nn.functional.normalize(torch.randn(3, h, w, generator=gen), dim=0)
            else:  # edge, saliency
                sample[task] = (torch.rand(1, h, w, generator=gen) > 0.8).float()
        samples.append(sample)
    return samples


def measure(args: argparse.Namespace, balancer: str, mode: str | None, n_tasks: int) -> dict:
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import TaskFacts, build_module

    torch.set_num_threads(args.threads)
    tasks = TASK_ORDER[:n_tasks]
    overrides = [
        f"balancer={balancer}",
        f"backbone={args.backbone}",
        "backbone.pretrained=false",
        "decoder=heads",
        f"data.tasks=[{','.join(tasks)}]",
        *([f"balancer.mode={mode}"] if mode else []),
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    channels = {t: NYUD_CHANNELS[t] for t in tasks}
    names = {t: [str(i) for i in range(c)] for t, c in channels.items() if t in ("semseg", "human_parts")}
    facts = TaskFacts(tasks=tasks, task_channels=channels, class_names=names, edge_tolerance=0.011)
    L.seed_everything(0, verbose=False)
    module = build_module(cfg, facts)
    total = args.warmup + args.steps
    data = _random_dataset(tasks, tuple(args.size), total * args.batch)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)

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
    timed = timer.times[args.warmup :]
    if len(timed) != args.steps:
        raise RuntimeError(f"expected {total} training steps, the timer saw {len(timer.times)}")
    return {
        "step_s": statistics.median(timed),
        "times_s": timed,
        "manual_optimization": not module.automatic_optimization,
    }


def _runs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(balancer, mode or None) rows: ew first, gradient balancers once per mode."""
    strategies = _strategies()
    chosen = args.balancers or list(strategies)
    unknown = [b for b in chosen if b not in strategies]
    if unknown:
        raise SystemExit(f"unknown balancers {unknown}; conf/balancer has {sorted(strategies)}")
    chosen = ["ew", *[b for b in chosen if b != "ew"]]  # the reference is always measured
    rows = []
    for b in chosen:
        rows.extend([(b, m) for m in args.modes if m in strategies[b]] if strategies[b] else [(b, None)])
    return rows


def _child_command(args: argparse.Namespace, balancer: str, mode: str | None, n_tasks: int) -> list[str]:
    h, w = args.size
    cmd = [sys.executable, __file__, "--backbone", args.backbone, "--size", str(h), str(w)]
    cmd += ["--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads)]
    if args.overrides:
        cmd += ["--overrides", *args.overrides]
    return [*cmd, "--one", f"{balancer}:{mode or ''}:{n_tasks}"]


def _label(balancer: str, mode: str | None) -> str:
    return f"{balancer} ({mode})" if mode else balancer


def _target(balancer: str, mode: str | None) -> tuple[float, int | None] | None:
    """(max ratio to ew, task count it applies to or None for all) of the issue's targets."""
    if balancer == "famo":
        return FAMO_TARGET, None
    if mode == "features":
        return FEATURES_TARGET, FEATURES_TARGET_TASKS
    return None


def _table(args: argparse.Namespace, runs: list[tuple[str, str | None]], results: dict) -> str:
    counts = args.tasks_counts
    lines = [
        "| strategy | " + " | ".join(f"{n} tasks" for n in counts) + " | target |",
        "|---|" + "---:|" * len(counts) + "---|",
    ]
    ew = {n: results[("ew", None, n)] for n in counts}
    lines.append(
        "| ew (s/step) | "
        + " | ".join(f"{ew[n]['step_s']:.3f} s" if "step_s" in ew[n] else "failed" for n in counts)
        + " | |"
    )
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
            ratio = r["step_s"] / ref["step_s"]
            r["x_ew"] = ratio
            cell = f"{ratio:.2f}x"
            if target is not None and (target[1] is None or target[1] == n) and ratio > target[0]:
                cell = f"**{cell}**"
            cells.append(cell)
        if target is None:
            note = ""
        else:
            note = f"<= {target[0]:.1f}x" + (f" at {target[1]} tasks" if target[1] else "")
        lines.append(f"| {_label(balancer, mode)} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    if args.one:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        balancer, mode, n_tasks = args.one.split(":")
        print(json.dumps(measure(args, balancer, mode or None, int(n_tasks))))
        return
    started = time.perf_counter()
    runs = _runs(args)
    h, w = args.size
    print("command: " + shlex.join(["python", *sys.argv]))
    print(
        f"backbone {args.backbone} (random init), decoder heads, {h}x{w}, batch {args.batch}, cpu, "
        f"{args.threads} threads; step = forward + backward(s) + aggregation + AdamW (Trainer.fit), "
        f"median of {args.steps} after {args.warmup} warm-up; tasks: "
        + "; ".join(f"{n}: {' '.join(TASK_ORDER[:n])}" for n in args.tasks_counts)
    )
    results: dict[tuple[str, str | None, int], dict] = {}
    for balancer, mode in runs:
        for n in args.tasks_counts:
            proc = subprocess.run(_child_command(args, balancer, mode, n), capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()
                results[(balancer, mode, n)] = {"error": err[-1] if err else f"exit code {proc.returncode}"}
                print(f"  {_label(balancer, mode)}, {n} tasks: failed: {results[(balancer, mode, n)]['error']}")
                continue
            results[(balancer, mode, n)] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {_label(balancer, mode)}, {n} tasks: {r['step_s']:.3f} s/step", flush=True)
    print()
    print(_table(args, runs, results))
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    if args.json:
        payload = {
            "command": shlex.join(["python", *sys.argv]),
            "settings": {k: v for k, v in vars(args).items() if k not in ("one", "json")},
            "total_s": elapsed,
            "results": [
                {"balancer": b, "mode": m, "tasks": n, **results[(b, m, n)]} for b, m in runs for n in args.tasks_counts
            ],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
