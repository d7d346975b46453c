"""TaskMoE with many vs few experts, and the training step of task-conditioned ViT backbones.

Rows `layer`: forward + backward (the balancing loss included) of one `TaskMoE` layer over random
tokens, for each expert count at equal expert size and top-k; `ratio` is against the fewest experts
(sparse dispatch: a token pays for its top-k experts only, so many experts should cost about as
much as few; target <= 1.2x). Rows `step`: a training step (forward + backward + AdamW) of the model
composed from conf/ with `--backbone` and `--decoder` on a random batch, dense and with
`backbone.moe_layers`, the latter with the tasks stacked in one backbone pass
(`backbone.task_passes=stacked`, the default) and with one backbone pass per task (`per_task`, the
reference); `ratio` is against dense (target <= 1.5x). All settings of a table are built first and
then timed in turn, step by step, after warm-up (medians), so that a busy machine slows them alike.

    mtl-bench moe
    mtl-bench moe --experts 16 2 --tokens 8192 --dim 768 --hidden 3072 --device cuda --precision bf16
    mtl-bench moe --capacity-factor none --dispatch grouped --skip-step
    mtl-bench moe --skip-layer --backbone vit_small --size 224x288 --batch 2 --moe-layers 9 11
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mtl_vision.bench.report import Result

__all__ = ["add_arguments", "run"]


def _size(text: str) -> tuple[int, int]:
    from mtl_vision.bench.decoders import parse_size

    return parse_size(text)


def _capacity(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from err
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    layer = parser.add_argument_group("layer rows (one TaskMoE layer)")
    layer.add_argument("--experts", type=int, nargs="+", default=[16, 2], help="expert counts to compare")
    layer.add_argument("--top-k", type=int, default=2)
    layer.add_argument("--tokens", type=int, default=4096)
    layer.add_argument("--dim", type=int, default=384)
    layer.add_argument("--hidden", type=int, default=1536, help="hidden size of every expert")
    layer.add_argument("--capacity-factor", type=_capacity, default=1.25, help="a number or 'none'")
    layer.add_argument("--dispatch", choices=["auto", "fixed", "grouped"], default="auto",
                       help="TaskMoE dispatch (auto: grouped on CPU, fixed-capacity on accelerators)")
    layer.add_argument("--skip-layer", action="store_true", help="no layer rows")
    step = parser.add_argument_group("step rows (a composed model)")
    step.add_argument("--backbone", default="vit_small", help="a conf/backbone option with transformer blocks")
    step.add_argument("--decoder", default="heads", help="a conf/decoder option")
    step.add_argument("--moe-layers", type=int, nargs="+", default=[9, 11], help="backbone.moe_layers")
    step.add_argument("--tasks", nargs="+", default=["semseg", "depth", "normals", "edge"])
    step.add_argument("--size", type=_size, default=(224, 288), help="HxW of the random images")
    step.add_argument("--batch", type=int, default=2)
    step.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides of every model")
    step.add_argument("--no-per-task", action="store_true", help="skip the per-task reference row")
    step.add_argument("--skip-step", action="store_true", help="no step rows")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each setting first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _interleaved(steps: dict[str, Any], warmup: int, timed: int, sync: Any) -> dict[str, float]:
    """Median seconds of each callable of `steps`, run in turn step by step after `warmup` rounds."""
    import statistics

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + timed):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _layer_rows(args: argparse.Namespace, device: Any, dtype: Any, sync: Any) -> list[dict[str, Any]]:
    import torch

    from mtl_vision.models.moe import TaskMoE

    layers, steps = {}, {}
    x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    grad = torch.randn(args.tokens, args.dim, device=device)
    for count in args.experts:
        torch.manual_seed(0)
        moe = TaskMoE(args.dim, args.hidden, count, args.top_k, tasks=["task"],
                      capacity_factor=args.capacity_factor, dispatch=args.dispatch).to(device)
        layers[count] = moe

        def step(moe: TaskMoE = moe) -> None:
            moe.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = moe(x, "task")
            ((out.float() * grad).sum() + 0.01 * moe.pop_aux_loss()).backward()

        steps[f"{count} experts"] = step
    seconds = _interleaved(steps, args.warmup, args.steps, sync)
    fewest = min(args.experts)
    rows = []
    for count, moe in layers.items():
        stats = moe.expert_stats()
        rows.append({
            "rows": "layer",
            "setting": f"{count} experts top-{args.top_k}",
            "ms": 1000 * seconds[f"{count} experts"],
            "ratio": seconds[f"{count} experts"] / seconds[f"{fewest} experts"],
            "dropped_share": stats.get("dropped_share", float("nan")),
        })
    return rows


def _step_rows(args: argparse.Namespace, device: Any, dtype: Any, sync: Any) -> list[dict[str, Any]]:
    import torch
    from hydra import compose, initialize_config_dir

    from mtl_vision.bench.decoders import NUM_CLASSES, random_batch
    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import TaskFacts, build_module
    from mtl_vision.models.moe_backbone import TaskMoEMlp
    from mtl_vision.tasks import get_task

    tasks = list(args.tasks)
    channels = {t: get_task(t).out_channels(NUM_CLASSES.get(t)) for t in tasks}
    names = {t: [str(i) for i in range(c)] for t, c in channels.items() if t in NUM_CLASSES}
    facts = TaskFacts(tasks=tasks, task_channels=channels, class_names=names, edge_tolerance=0.011)
    batch = random_batch(tasks, channels, args.batch, args.size, device)
    base = [f"backbone={args.backbone}", f"decoder={args.decoder}", "backbone.pretrained=false",
            f"data.tasks=[{','.join(tasks)}]", f"++data.crop_size=[{args.size[0]},{args.size[1]}]", *args.overrides]
    moe = f"backbone.moe_layers=[{','.join(map(str, args.moe_layers))}]"
    settings = {"dense": [], f"moe {args.moe_layers} stacked": [moe]}
    if not args.no_per_task:
        settings[f"moe {args.moe_layers} per_task"] = [moe, "++backbone.task_passes=per_task"]
    steps, modules = {}, {}
    for name, extra in settings.items():
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*base, *extra])
        torch.manual_seed(0)
        module = build_module(cfg, facts).to(device).train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
        moe_layers = [m for m in module.model.modules() if isinstance(m, TaskMoEMlp)]
        modules[name] = (module, moe_layers)

        def step(module: Any = module, optimizer: Any = optimizer, moe_layers: list = moe_layers) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                losses = module.loss(module.model(batch["image"]), batch)
            total = sum(losses.values())
            for layer in moe_layers:
                total = total + module.expert_aux_weight * layer.pop_aux_loss()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

        steps[name] = step
    seconds = _interleaved(steps, args.warmup, args.steps, sync)
    rows = []
    for name, (_, moe_layers) in modules.items():
        dropped = [layer.expert_stats().get("dropped_share", 0.0) for layer in moe_layers]
        rows.append({
            "rows": "step",
            "setting": f"{args.backbone} + {args.decoder}, {name}",
            "ms": 1000 * seconds[name],
            "ratio": seconds[name] / seconds["dense"],
            "dropped_share": max(dropped) if dropped else float("nan"),
        })
    return rows


def run(args: argparse.Namespace) -> Result:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = [] if args.skip_layer else _layer_rows(args, device, dtype, sync)
    rows += [] if args.skip_step else _step_rows(args, device, dtype, sync)
    settings = {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
                "warmup": args.warmup, "steps": args.steps}
    notes = []
    if not args.skip_layer:
        settings.update(tokens=args.tokens, dim=args.dim, hidden=args.hidden, top_k=args.top_k,
                        capacity_factor=args.capacity_factor, dispatch=args.dispatch)
        notes.append(f"layer: forward + backward of one TaskMoE, ratio to {min(args.experts)} experts (target <= 1.2x)")
    if not args.skip_step:
        settings.update(backbone=args.backbone, decoder=args.decoder, tasks=" ".join(args.tasks),
                        size=f"{args.size[0]}x{args.size[1]}", batch=args.batch)
        notes.append("step: forward + backward + AdamW of the composed model, ratio to dense (target <= 1.5x); "
                     "dropped_share: the largest share of assignments a MoE layer dropped (capacity)")
    notes.append("ms: median per step; all settings of a table timed in turn, step by step")
    return Result(title="mtl-bench moe", rows=rows, settings=settings, notes=notes)
