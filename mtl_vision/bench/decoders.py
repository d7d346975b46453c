"""Step time (forward + backward + AdamW step), peak memory, parameters and FLOPs of every decoder,
and how they grow with the number of tasks and the resolution.

Each decoder of conf/decoder is built from its config with the chosen backbone, resolution and task
set (random NYUD-like batches, no data needed) and measured in a fresh process, so its peak memory
is its own. A task set is a count N (the first N tasks of the synthetic dataset,
`mtl_vision.data.synthetic.TASK_NAMES`: semseg depth normals edge saliency human_parts) or
comma-separated task names. Rows: the task sets at the first size, and the sizes at the
`--resolution-tasks` set (`--grid`: every combination); with several task sets or sizes the two
scaling tables (markdown) follow the table. A decoder that cannot run a setting is reported in its
row with the error. The slow settings of a long table can be bounded: `--max-timed-s` times fewer
steps once they took that long (the row says how many), `--time-limit-s` gives a setting up.

    mtl-bench decoders --backbone resnet18 --size 224x288 --batch 2
    mtl-bench decoders --tasks 2 4 6 --sizes 224x288 448x576 --threads 2 --warmup 1 --steps 3 \\
        --max-timed-s 20 --time-limit-s 400 --json decoders.json
    mtl-bench decoders --backbone vit_base --sizes 448x576 --device cuda --batch 4
    mtl-bench decoders --decoders heads invpt --tasks semseg,depth --overrides decoder.channels=128

Memory: on CUDA the peak of `torch.cuda.max_memory_allocated` over the timed steps; on CPU the
increase of the process's peak resident set size (ru_maxrss) over its resident set just before the
model is built (weights, gradients, AdamW state, activations and the allocator's cache; not Python
or torch themselves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

from mtl_vision.bench.report import Result

__all__ = ["NUM_CLASSES", "add_arguments", "measure", "parse_size", "run", "synthetic_tasks", "task_set"]

# classes of the class-map tasks: NYUD-v2's 40 classes, PASCAL-Context's 7 human parts
NUM_CLASSES = {"semseg": 40, "human_parts": 7}


def synthetic_tasks() -> tuple[str, ...]:
    """The tasks of the built-in synthetic scenes, in their order (`mtl_vision.data.synthetic.TASK_NAMES`)."""
    from mtl_vision.data.synthetic import TASK_NAMES

    return tuple(TASK_NAMES)


def parse_size(text: str) -> tuple[int, int]:
    """`"224x288"` -> (224, 288) (height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers (224x288), got {text!r}")
    return int(parts[0]), int(parts[1])


def task_set(text: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """A count N -> the first N of `names`; `"semseg,depth"` -> those tasks (each one of `names`)."""
    if text.isdigit():
        if not 1 <= int(text) <= len(names):
            raise SystemExit(f"--tasks {text}: the synthetic dataset has {len(names)} tasks ({' '.join(names)}); "
                             f"expected a count from 1 to {len(names)}")
        return names[: int(text)]
    tasks = tuple(t for t in text.split(",") if t)
    if not tasks or any(t not in names for t in tasks) or len(set(tasks)) != len(tasks):
        raise SystemExit(f"--tasks {text!r}: expected a count or comma-separated distinct tasks of {', '.join(names)}")
    return tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="resnet18", help="a conf/backbone option (built with pretrained=false)")
    parser.add_argument("--size", "--sizes", dest="sizes", type=parse_size, nargs="+", default=[(224, 288)],
                        metavar="HxW", help="input resolutions (default 224x288)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["4"], metavar="SET",
                        help="task sets: a count N (the first N tasks of the synthetic dataset) or a,b,c (default 4)")
    parser.add_argument("--resolution-tasks", default=None, metavar="SET",
                        help="task set of the resolution rows (default: the middle of --tasks)")
    parser.add_argument("--grid", action="store_true", help="measure every task set at every size")
    parser.add_argument("--decoders", nargs="+", default=None, help="conf/decoder options (default: all)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--max-timed-s", type=float, default=0.0,
                        help="stop a setting's timed steps once they took this long, after one at least (0: never)")
    parser.add_argument("--time-limit-s", type=float, default=0.0,
                        help="a setting whose process runs longer is reported as over the limit (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0,
                        help="CPU: a setting that needs more is reported as out of memory (0: no limit)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (quick; on CPU the peak memory is then not measured)")


def _decoder_options() -> list[str]:
    from mtl_vision.cli import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "decoder").glob("*.yaml"))


def _rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _limit_memory(limit_gb: float) -> None:
    """Cap the address space at its present size plus `limit_gb`, so a setting that needs more fails
    with an allocation error instead of pushing the machine into swap or the OOM killer."""
    import resource

    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + int(limit_gb * 2**30), resource.RLIM_INFINITY))


def random_batch(tasks: list[str], channels: dict[str, int], batch: int, size: tuple[int, int], device) -> dict:
    """A batch of random images (B,3,H,W) and valid targets in each task's format (DESIGN.md)."""
    import torch

    h, w = size
    out = {"image": torch.rand(batch, 3, h, w, device=device)}
    for task in tasks:
        if task in NUM_CLASSES:
            out[task] = torch.randint(0, channels[task], (batch, h, w), device=device)
        elif task == "normals":
            out[task] = torch.nn.functional.normalize(torch.randn(batch, 3, h, w, device=device), dim=1)
        elif task == "depth":
            out[task] = torch.rand(batch, 1, h, w, device=device) + 0.5
        else:  # edge, saliency
            out[task] = (torch.rand(batch, 1, h, w, device=device) > 0.9).float()
    return out


def measure(spec: dict[str, Any]) -> dict[str, float]:
    """Build `spec["decoder"]` and time its training steps; `spec` holds the settings of one cell
    (decoder, backbone, size, batch, tasks, warmup, steps, device, precision, threads, overrides).
    Returns the median step in seconds, the peak memory in MiB, and parameters / forward GFLOPs
    (one image) of decoder and backbone."""
    import resource
    import statistics

    import torch
    from hydra import compose, initialize_config_dir

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import TaskFacts, build_module
    from mtl_vision.models.summary import model_summary
    from mtl_vision.tasks import get_task

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    tasks, size, device = list(spec["tasks"]), tuple(spec["size"]), torch.device(spec["device"])
    # data.crop_size: the input size of decoders built for one (MLoRE's routers, TaskPrompter)
    overrides = [f"decoder={spec['decoder']}", f"backbone={spec['backbone']}", "backbone.pretrained=false",
                 f"data.tasks=[{','.join(tasks)}]", f"++data.crop_size=[{size[0]},{size[1]}]", *spec["overrides"]]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    channels = {t: get_task(t).out_channels(NUM_CLASSES.get(t)) for t in tasks}
    names = {t: [str(i) for i in range(c)] for t, c in channels.items() if t in NUM_CLASSES}
    facts = TaskFacts(tasks=tasks, task_channels=channels, class_names=names, edge_tolerance=0.011)
    batch = random_batch(tasks, channels, int(spec["batch"]), size, device)
    if device.type == "cpu" and spec.get("memory_limit_gb"):
        _limit_memory(float(spec["memory_limit_gb"]))
    rss_before = _rss_mb()
    torch.manual_seed(0)
    module = build_module(cfg, facts)
    summary = model_summary(module.model, size)
    module = module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[spec["precision"]]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = module.loss(module.model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(int(spec["warmup"])):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    for _ in range(int(spec["steps"])):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        if spec.get("max_timed_s") and sum(times) >= float(spec["max_timed_s"]):
            break
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before  # Linux: KiB
    return {
        "steps": len(times),
        "step_s": statistics.median(times),
        "peak_mb": peak_mb,
        "decoder_params_m": summary["decoder/params"] / 1e6,
        "backbone_params_m": summary["backbone/params"] / 1e6,
        "decoder_gflops": summary["decoder/gflops"],
        "backbone_gflops": summary["backbone/gflops"],
    }


_NUMBERS = ("step_s", "peak_mb", "decoder_params_m", "backbone_params_m", "decoder_gflops", "backbone_gflops")


def _root_cause(err: BaseException, limit_gb: float = 0.0) -> str:
    """`Type: message` of the innermost cause of `err` (Hydra wraps a constructor's error), one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())
    if isinstance(err, MemoryError) or any(m in text for m in ("can't allocate memory", "bad_alloc",
                                                                "Cannot allocate memory")):
        return out_of_memory(text, limit_gb)
    return f"{type(err).__name__}: {text}"[:300]


def out_of_memory(text: str, limit_gb: float = 0.0) -> str:
    """The row's message for an allocation that failed: the limit, and the size torch's message names."""
    size = re.search(r"allocate (\d+) bytes", text)
    asked = f" (an allocation of {int(size.group(1)) / 2**30:.2f} GiB failed)" if size else ""
    return f"out of memory: over --memory-limit-gb {limit_gb:g}{asked}" if limit_gb else f"out of memory{asked}"


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(spec)` in this process, a failure as {"error": message}; on CPU without the peak
    memory (the process's peak RSS belongs to every setting measured before)."""
    try:
        out = measure({**spec, "memory_limit_gb": 0})  # a limit would stay on this process
    except Exception as error:  # noqa: BLE001 -- any failure is reported in the decoder's row
        return {"error": _root_cause(error)}
    if spec["device"] == "cpu":
        out["peak_mb"] = math.nan
    return out


def _measure_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure(spec)` in a fresh Python process: {numbers} or {"error": message}."""
    cmd = [sys.executable, "-m", "mtl_vision.bench.decoders", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                              timeout=float(spec["time_limit_s"]) or None)
    except subprocess.TimeoutExpired:
        return {"error": f"over the time limit (--time-limit-s {spec['time_limit_s']:g})"}
    lines = proc.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        return json.loads(lines[-1])
    if proc.returncode < 0:
        kill = " (out of memory?)" if proc.returncode == -9 else ""
        return {"error": f"the measuring process was killed by signal {-proc.returncode}{kill}"}
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"error": err[-1] if err else f"the measuring process exited with code {proc.returncode}"}


def _cells(task_sets: list[tuple[str, ...]], sizes: list[tuple[int, int]], resolution_tasks: tuple[str, ...],
           grid: bool) -> list[tuple[tuple[str, ...], tuple[int, int]]]:
    """(task set, size) settings to measure: the task sets at the first size, then the sizes at
    `resolution_tasks` (every combination when `grid`), without repeats."""
    if grid:
        pairs = [(t, s) for s in sizes for t in task_sets]
    else:
        pairs = [(t, sizes[0]) for t in task_sets] + [(resolution_tasks, s) for s in sizes]
    return list(dict.fromkeys(pairs))


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _tasks_text(tasks: tuple[str, ...], names: tuple[str, ...]) -> str:
    """A task set as the table names it: its count when it is the first N synthetic tasks."""
    return str(len(tasks)) if tasks == names[: len(tasks)] else ",".join(tasks)


def _cell_text(row: dict[str, Any]) -> str:
    """`0.412 s, 823 MiB`, or why the setting failed (cut at a word after 80 characters)."""
    if row["error"]:
        text = row["error"]
        return "fails: " + (text if len(text) <= 80 else text[:80].rsplit(" ", 1)[0] + " ...")
    memory = "" if math.isnan(row["peak_mb"]) else f", {row['peak_mb']:.0f} MiB"
    return f"{row['step_s']:.3f} s{memory}"


def _pivot(rows: list[dict[str, Any]], decoders: list[str], key: str, values: list[str], fixed: tuple[str, str],
           label: str) -> list[str]:
    """A markdown table: one row per decoder, one column per `values` of `key`, at `fixed` = (column, value)."""
    lines = ["| decoder | " + " | ".join(f"{v}{label}" for v in values) + " |", "|---|" + "---:|" * len(values)]
    for decoder in decoders:
        cells = []
        for v in values:
            match = [r for r in rows if r["decoder"] == decoder and r[key] == v and r[fixed[0]] == fixed[1]]
            cells.append(_cell_text(match[0]) if match else "")
        lines.append(f"| {decoder} | " + " | ".join(cells) + " |")
    return lines


def run(args: argparse.Namespace) -> Result:
    started = time.perf_counter()
    options = _decoder_options()
    decoders = args.decoders or options
    unknown = [d for d in decoders if d not in options]
    if unknown:
        raise SystemExit(f"--decoders: unknown {unknown}; conf/decoder has {options}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit(f"--steps >= 1, --warmup >= 0, --batch >= 1 expected, got {args.steps}, {args.warmup}, "
                         f"{args.batch}")
    names = synthetic_tasks()
    task_sets = list(dict.fromkeys(task_set(t, names) for t in args.tasks))
    resolution_tasks = (task_set(args.resolution_tasks, names) if args.resolution_tasks
                        else task_sets[len(task_sets) // 2])
    memory_limit = args.memory_limit_gb if args.device == "cpu" else 0
    rows: list[dict[str, Any]] = []
    for decoder in decoders:
        for tasks, size in _cells(task_sets, args.sizes, resolution_tasks, args.grid):
            spec = {"decoder": decoder, "backbone": args.backbone, "size": list(size), "batch": args.batch,
                    "tasks": list(tasks), "warmup": args.warmup, "steps": args.steps, "device": args.device,
                    "precision": args.precision, "threads": args.threads, "memory_limit_gb": memory_limit,
                    "max_timed_s": args.max_timed_s, "time_limit_s": args.time_limit_s,
                    "overrides": list(args.overrides)}
            t0 = time.perf_counter()
            out = _measure_here(spec) if args.in_process else _measure_in_child(spec)
            row: dict[str, Any] = {"decoder": decoder, "tasks": _tasks_text(tasks, names), "size": _size_text(size)}
            row["steps"] = int(out.get("steps", 0))
            row.update({k: float(out.get(k, math.nan)) for k in _NUMBERS})
            row["error"] = out.get("error", "")
            rows.append(row)
            done = row["error"] or _cell_text(row)
            print(f"  {decoder}, tasks {row['tasks']}, {row['size']}: {done} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)

    counts = sorted({len(t) for t in [*task_sets, resolution_tasks] if t == names[: len(t)]})
    notes = ["tasks: " + "; ".join(f"{n} = {' '.join(names[:n])}" for n in counts)
             + f" (semseg {NUM_CLASSES['semseg']} classes, human_parts {NUM_CLASSES['human_parts']})"]
    memory = ("peak of torch.cuda.max_memory_allocated over the timed steps" if args.device.startswith("cuda")
              else "peak RSS increase over the process's RSS before the model is built")
    timed = f"{args.steps}" + (f" (fewer once they took {args.max_timed_s:g} s: column steps)"
                               if args.max_timed_s else "")
    notes.append(f"step = forward + backward + AdamW, median of {timed} after {args.warmup} warm-up; "
                 f"peak_mb: {memory}; "
                 + ("all settings in this process" if args.in_process else "each setting in a fresh process"))
    if len(task_sets) > 1:
        size0 = _size_text(args.sizes[0])
        notes += ["", f"Step time and peak memory against the number of tasks ({size0}):", ""]
        notes += _pivot(rows, decoders, "tasks", [_tasks_text(t, names) for t in task_sets], ("size", size0),
                        " tasks")
    if len(args.sizes) > 1:
        ref = _tasks_text(resolution_tasks, names)
        notes += ["", f"Step time and peak memory against the resolution ({ref} tasks):", ""]
        notes += _pivot(rows, decoders, "size", [_size_text(s) for s in args.sizes], ("tasks", ref), "")
    notes += ["", f"total {time.perf_counter() - started:.0f} s"]
    settings = {"backbone": args.backbone, "batch": args.batch, "device": args.device, "precision": args.precision,
                "threads": args.threads, "warmup": args.warmup, "steps": args.steps}
    settings.update({k: v for k, v in (("max_timed_s", args.max_timed_s), ("time_limit_s", args.time_limit_s),
                                       ("memory_limit_gb", memory_limit)) if v})
    if args.overrides:
        settings["overrides"] = " ".join(args.overrides)
    return Result(title="Decoders: training step time and peak memory", rows=rows, settings=settings, notes=notes)


if __name__ == "__main__":
    # one measuring process: `python -m mtl_vision.bench.decoders '<spec as JSON>'`
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    spec = json.loads(sys.argv[1])
    try:
        result = measure(spec)
    except Exception as error:  # noqa: BLE001 -- any failure is reported in the decoder's row
        print(json.dumps({"error": _root_cause(error, float(spec.get("memory_limit_gb") or 0))}))
        sys.exit(1)
    print(json.dumps(result))
