"""The training step of our Trainer run against a plain PyTorch loop of the same config.

    mtl-bench step                                                  # the default config (mtl-train's)
    mtl-bench step decoder=invpt backbone=vit_small data.batch_size=2 trainer.log_every_n_steps=50
    mtl-bench step experiment=invpt_nyud data.batch_size=2 --device cuda --precision bf16-mixed
    mtl-bench step balancer=nashmtl --steps 30 --json step.json

Both loops train the model, loss, balancer, optimiser, schedule and precision that the overrides
compose (`mtl-train`'s config), on the same batches: the first `--batches` batches of the
training loader, collated once and held in memory, so the data pipeline is not what is compared
(`mtl-bench data` measures it). The Trainer run is `mtl-train`'s: `build_module`, `build_trainer`
(callbacks, loggers, progress bar, NaN guard, `log_every_n_steps`), without validation. The plain
loop drives the same module object by hand, with an optimiser and scheduler of its own from the
same factories: forward, losses, balancer, backward (the balancer's task-gradient step for
gradient balancers), clipping, optimiser and scheduler steps. Both loops move the same weights
(a copy of the model would sit elsewhere in memory and time differently: 4 % on the default).

Timing: one process; the plain loop runs in blocks of `--block` steps between the Trainer's
steps (from a callback, its time taken out of the Trainer's), alternating, after `--warmup`
steps of each. A Trainer step is the time from one batch start to the next (so logging, the
progress bar and Lightning's loop are counted); a plain step likewise. The medians of `--steps`
steps each, their ratio (Trainer / plain: the framework's overhead), images/s and peak memory are
printed, with the per-phase split (medians per step): exclusive time in data wait, forward (model and losses),
backward, balancer, optimiser, logging (`self.log`, the loggers) and `other` (the rest of the
step: hooks, callbacks, the progress bar, Lightning's loop). On CUDA the phase times are host
times unless `--phase-sync` synchronises at every phase boundary (which slows both loops).
Peak memory is `torch.cuda.max_memory_allocated` per loop on CUDA, the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

from mtl_vision.bench.report import Result

__all__ = ["PHASES", "add_arguments", "run"]

PHASES = ("data", "forward", "backward", "balancer", "optimizer", "logging", "other")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of mtl-train's config (experiment=..., ...)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each loop (median over these)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop first")
    parser.add_argument("--block", type=int, default=5, help="steps of one loop before switching to the other")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches held in memory, used in turn")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--phase-sync", action="store_true", help="CUDA: synchronise at phase boundaries")
    parser.add_argument(
        "--clock", choices=("wall", "thread"), default="wall",
        help="wall: elapsed time; thread: CPU time of the calling thread (CPU, with --threads 1: robust on a "
        "machine shared with other jobs)",
    )


# ---------------------------------------------------------------------------------------- phases
class PhaseClock:
    """Exclusive time per phase: a phase entered inside another (the forward inside Lightning's
    optimiser closure) is taken out of the outer one. `sync()` is called at every boundary."""

    def __init__(self, sync: Any = None, clock: str = "wall") -> None:
        import time

        self._now = time.perf_counter if clock == "wall" else time.thread_time
        self._sync = sync
        self._stack: list[list[Any]] = []  # [phase, start, time of the phases inside]
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.enabled = False

    def enter(self, phase: str) -> None:
        if not self.enabled:
            return
        if self._sync is not None:
            self._sync()
        self._stack.append([phase, self._now(), 0.0])

    def leave(self) -> None:
        if not self.enabled or not self._stack:
            return
        if self._sync is not None:
            self._sync()
        phase, start, inner = self._stack.pop()
        spent = self._now() - start
        self.totals[phase] += spent - inner
        if self._stack:
            self._stack[-1][2] += spent

    def take(self) -> dict[str, float]:
        """The phase totals since the last take (seconds), then cleared."""
        totals, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return totals


def _timed(inner: Any, clock: PhaseClock, phase: str) -> Any:
    """`inner` with its calls timed as `phase`; `functools.wraps` keeps the marks others put on it
    (an LR scheduler's on `optimizer.step`)."""
    import functools

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        clock.enter(phase)
        try:
            return inner(*args, **kwargs)
        finally:
            clock.leave()

    return timed


def _wrap(obj: Any, name: str, clock: PhaseClock, phase: str) -> None:
    """Time `obj.name(...)` as `phase` (an attribute on the instance shadows the class's method)."""
    setattr(obj, name, _timed(getattr(obj, name), clock, phase))


class _Patched:
    """`torch.autograd.backward` and `torch.autograd.grad` timed as `backward` while active."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock

    def __enter__(self) -> _Patched:  # noqa: PYI034
        import torch

        self._saved = (torch.autograd.backward, torch.autograd.grad)
        torch.autograd.backward, torch.autograd.grad = (_timed(f, self.clock, "backward") for f in self._saved)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.autograd.backward, torch.autograd.grad = self._saved


def _instrument(module: Any, clock: PhaseClock) -> None:
    """Time the parts of one MultiTaskModule (ours or the plain loop's copy): the model's and the
    losses' forward, the balancer (its weighting, and for gradient balancers the aggregation that
    writes the gradients) and `self.log`."""
    from mtl_vision.engine.task_gradients import TaskGradientStep

    _wrap(module.model, "forward", clock, "forward")
    _wrap(module.loss, "forward", clock, "forward")
    _wrap(module.balancer, "forward", clock, "balancer")
    _wrap(module, "log", clock, "logging")
    if not module.automatic_optimization:
        if module._task_step is None:
            module._task_step = TaskGradientStep(module.model, module.balancer, module.tasks)
        _wrap(module._task_step, "write_gradients", clock, "balancer")


# ---------------------------------------------------------------------------------------- batches
class HeldBatches:
    """The same collated batches in turn, `length` of them; `__getitem__` is timed as data wait."""

    def __init__(self, batches: list[dict], length: int, clock: PhaseClock) -> None:
        self.batches, self.length, self.clock = batches, length, clock

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        self.clock.enter("data")
        try:
            return self.batches[index % len(self.batches)]
        finally:
            self.clock.leave()


def _to(batch: Any, device: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------- plain loop
class PlainLoop:
    """The step of `MultiTaskModule` written as a plain PyTorch loop, on its own copy of the module."""

    def __init__(self, module: Any, cfg: Any, precision: str, device: Any, total_steps: int) -> None:
        import torch

        self.module, self.device, self.precision = module, device, precision
        self.model, self.loss, self.balancer = module.model, module.loss, module.balancer
        self.manual = not module.automatic_optimization
        built = module.build_optimizers(total_steps, cfg.trainer.get("max_epochs"), total_steps)
        if isinstance(built, dict):
            self.optimizer, self.scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
        else:
            self.optimizer, self.scheduler = built, None
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else None
        self.clip = cfg.trainer.get("gradient_clip_val")
        self.clip_algorithm = cfg.trainer.get("gradient_clip_algorithm") or "norm"
        self.task_step = module._task_step

    def _context(self) -> Any:
        import contextlib

        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _expert_loss(self) -> Any:
        expert = self.module._expert_aux_loss()
        return None if expert is None else self.module.expert_aux_weight * expert

    def step(self, batch: dict) -> None:
        import torch

        batch = _to(batch, self.device)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        if self.manual:
            with self._context():
                self.task_step.micro_batch(
                    batch["image"], lambda preds: self.loss(preds, batch), self._expert_loss, scale=scale, divide=1
                )
            self.task_step.write_gradients(scale=scale)
        else:
            with self._context():
                preds = self.model(batch["image"])
                losses = self.loss(preds, batch)
                total = self.balancer(losses)
                expert = self._expert_loss()
                if expert is not None:
                    total = total + expert
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
        if self.scaler is not None and not self.manual:
            self.scaler.unscale_(self.optimizer)
        if self.clip:
            params = [p for p in self.model.parameters() if p.grad is not None]
            if self.clip_algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(params, self.clip * (scale if self.manual else 1.0))
            else:
                torch.nn.utils.clip_grad_value_(params, self.clip * (scale if self.manual else 1.0))
        if self.scaler is not None and not self.manual:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if not self.manual:
            after = None
            if self.balancer.needs_losses_after_step:
                with torch.no_grad(), self._context():
                    after = self.balancer.reference_losses(self.loss(self.model(batch["image"]), batch))
                    self._expert_loss()
            self.balancer.after_step(after)
        else:
            self.balancer.after_step(None)


# ---------------------------------------------------------------------------------------- the run
def _compose(overrides: list[str], out: str) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.overrides import check_overrides

    check_overrides("train", overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"hydra.run.dir={out}"], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = out
        cfg.paths.work_dir = out
    return cfg


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(args: argparse.Namespace) -> Result:
    import tempfile

    import lightning as L
    import torch
    from omegaconf import open_dict

    from mtl_vision.cli.build import build_datamodule, build_module, build_trainer
    from mtl_vision.engine.quiet import quiet_lightning

    if args.steps < 1 or args.block < 1 or args.warmup < 0 or args.batches < 1:
        raise SystemExit("mtl-bench step: --steps and --block must be >= 1, --warmup >= 0, --batches >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mtl-bench step --device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    step_sync = sync or (lambda: None)
    if args.clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("mtl-bench step --clock thread: needs --device cpu and --threads 1 (one thread does the work)")
    clock = PhaseClock(sync if args.phase_sync else None, args.clock)
    blocks = -(-args.steps // args.block)
    timed_trainer_steps = blocks * args.block
    total = args.warmup + timed_trainer_steps + 1  # one more: the last timed step ends where the next begins

    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as out:
        cfg = _compose(list(args.overrides), out)
        with open_dict(cfg):
            cfg.trainer.accelerator = "gpu" if device.type == "cuda" else "cpu"
            cfg.trainer.devices = 1
            cfg.trainer.num_nodes = 1
            cfg.trainer.strategy = "auto"
            if args.precision:
                cfg.trainer.precision = args.precision
            cfg.trainer.max_steps = total
            cfg.trainer.max_epochs = -1
            cfg.trainer.limit_train_batches = None
            cfg.trainer.limit_val_batches = 0
            cfg.trainer.num_sanity_val_steps = 0
            cfg.trainer.val_check_interval = None
        precision = str(cfg.trainer.precision)
        if precision not in PRECISIONS:
            raise SystemExit(f"mtl-bench step: trainer.precision={precision!r}, expected one of {PRECISIONS}")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        datamodule.setup("fit")
        batches = []
        for batch in datamodule.train_dataloader():
            batches.append(batch)
            if len(batches) == args.batches:
                break
        batch_size = int(batches[0]["image"].shape[0])
        module = build_module(cfg, datamodule)
        _instrument(module, clock)
        plain = PlainLoop(module, cfg, precision, device, total)
        _wrap(plain.optimizer, "step", clock, "optimizer")
        trainer = build_trainer(cfg, module)
        for logger in trainer.loggers:
            _wrap(logger, "log_metrics", clock, "logging")

        trainer_steps: list[float] = []
        plain_steps: list[float] = []
        phases: dict[str, list[dict[str, float]]] = {"trainer": [], "plain": []}  # per timed step
        peaks = {"trainer": 0.0, "plain": 0.0}
        held = [_to(b, device) for b in batches] if device.type == "cuda" else batches

        def cuda_peak() -> float:
            return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")

        def plain_block(steps: int, timed: bool) -> None:
            clock.enabled = timed
            if device.type == "cuda":
                peaks["trainer"] = max(peaks["trainer"], cuda_peak())
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode(False), torch.enable_grad():
                step_sync()
                start = clock._now()
                for k in range(steps):
                    plain.step(held[(len(plain_steps) + k) % len(held)])
                    step_sync()
                    now = clock._now()
                    if timed:
                        plain_steps.append(now - start)
                        phases["plain"].append(clock.take())
                    start = now
            if device.type == "cuda":
                peaks["plain"] = max(peaks["plain"], cuda_peak())
                torch.cuda.reset_peak_memory_stats(device)

        class Alternate(L.Callback):
            """Times the Trainer's steps and runs the plain loop's blocks between them."""

            def __init__(self) -> None:
                self.start: float | None = None
                self.excluded = 0.0

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                for optimizer in trainer.optimizers:
                    _wrap(optimizer, "step", clock, "optimizer")

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                step_sync()
                now = clock._now()
                index = trainer.global_step  # the step that is about to run
                if self.start is not None and index > args.warmup:
                    trainer_steps.append(now - self.start - self.excluded)
                    phases["trainer"].append(clock.take())
                clock.take()  # the plain block's and the warm-up's phases are not the Trainer's
                clock.enabled = index >= args.warmup and len(trainer_steps) < timed_trainer_steps
                self.start, self.excluded = clock._now(), 0.0

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
                done = trainer.global_step  # optimiser steps completed
                run_block = done == args.warmup or (
                    done > args.warmup and (done - args.warmup) % args.block == 0 and len(plain_steps) < args.steps
                )
                if not run_block:
                    return
                enabled, totals = clock.enabled, clock.take()
                step_sync()
                begin = clock._now()
                if done == args.warmup:
                    plain_block(args.warmup, timed=False)
                else:
                    plain_block(min(args.block, args.steps - len(plain_steps)), timed=True)
                self.excluded += clock._now() - begin
                clock.totals, clock.enabled = totals, enabled

        trainer.callbacks.append(Alternate())
        loader = torch.utils.data.DataLoader(
            HeldBatches(held, total, clock), batch_size=None, shuffle=False, num_workers=0
        )
        with _Patched(clock):
            trainer.fit(module, train_dataloaders=loader)

    trainer_steps = trainer_steps[: args.steps]
    rows = []
    for name, times in (("trainer", trainer_steps), ("plain", plain_steps)):
        median = _median(times)
        steps = phases[name][: len(times)]
        row: dict[str, Any] = {
            "loop": name,
            "steps": len(times),
            "median_s": median,
            "ratio": median / _median(plain_steps),
            "images_per_s": batch_size / median,
            "peak_mem_mb": peaks[name] if device.type == "cuda" else _peak_rss_mb(),
        }
        for phase in PHASES[:-1]:
            row[f"{phase}_ms"] = 1e3 * _median([s[phase] for s in steps])
        row["other_ms"] = max(1e3 * median - sum(row[f"{p}_ms"] for p in PHASES[:-1]), 0.0)
        rows.append(row)
    settings = {
        "overrides": " ".join(args.overrides) or "(defaults)",
        "device": str(device),
        "precision": precision,
        "batch_size": batch_size,
        "log_every_n_steps": cfg.trainer.get("log_every_n_steps"),
        "balancer": cfg.balancer.get("_target_", "").rsplit(".", 1)[-1],
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "step_times_s": {"trainer": trainer_steps, "plain": plain_steps},
    }
    ratio = rows[0]["ratio"]
    notes = [
        (
            f"framework overhead: Trainer / plain = {ratio:.3f} (median step {rows[0]['median_s']:.4g} s "
            f"vs {rows[1]['median_s']:.4g} s)"
        ),
        "phases: median exclusive ms per step; other = the median step less their sum (hooks, callbacks, "
        "progress bar, Lightning's loop)"
        + ("" if device.type == "cpu" or args.phase_sync else "; CUDA host times (no --phase-sync)"),
    ]
    if device.type == "cpu":
        notes.append("peak_mem_mb: the process's peak RSS (both loops share the process)")
    return Result(title="mtl-bench step: Trainer vs plain loop", rows=rows, settings=settings, notes=notes)
