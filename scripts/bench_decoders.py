"""Step time (forward + backward + AdamW step), peak memory, parameters and FLOPs per decoder.

Each decoder is built from its conf/decoder/<name>.yaml with the chosen backbone, resolution and
tasks (no data needed) and measured in a fresh process, so peak memory is its own.

    python scripts/bench_decoders.py --backbone resnet18 --size 224 288 --batch 2
    python scripts/bench_decoders.py --backbone vit_base --size 448 576 --device cuda --batch 4
    python scripts/bench_decoders.py --decoders heads invpt --overrides decoder.channels=128

Memory: on CUDA the peak of `torch.cuda.max_memory_allocated`; on CPU the peak resident set size
of the measuring process (includes Python, torch and the model).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

NYUD_CHANNELS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1, "saliency": 1, "human_parts": 7}


def _parse(argv=None) -> argparse.Namespace:
    from mtl_vision.cli import CONFIG_DIR

    decoders = sorted(p.stem for p in (CONFIG_DIR / "decoder").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", help="a conf/backbone option")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 288), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["semseg", "depth", "normals", "edge"])
    parser.add_argument("--decoders", nargs="+", default=decoders)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, decoder: str) -> dict[str, float]:
    import torch
    from hydra import compose, initialize_config_dir

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import TaskFacts, build_module
    from mtl_vision.models.summary import model_summary

    overrides = [f"decoder={decoder}", f"backbone={args.backbone}", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    channels = {t: NYUD_CHANNELS[t] for t in args.tasks}
    names = {t: [str(i) for i in range(c)] for t, c in channels.items() if t in ("semseg", "human_parts")}
    facts = TaskFacts(tasks=list(args.tasks), task_channels=channels, class_names=names, edge_tolerance=0.011)
    torch.manual_seed(0)
    module = build_module(cfg, facts)
    summary = model_summary(module.model, args.size)
    device = torch.device(args.device)
    module = module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    h, w = args.size
    batch = {"image": torch.rand(args.batch, 3, h, w, device=device)}
    for task, c in channels.items():
        if task in ("semseg", "human_parts"):
            batch[task] = torch.randint(0, c, (args.batch, h, w), device=device)
        elif task == "normals":
            batch[task] = torch.nn.functional.normalize(torch.randn(args.batch, 3, h, w, device=device), dim=1)
        elif task == "depth":
            batch[task] = torch.rand(args.batch, 1, h, w, device=device) + 0.5
        else:
            batch[task] = (torch.rand(args.batch, 1, h, w, device=device) > 0.9).float()
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = module.loss(module.model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "step_s": statistics.median(times),
        "peak_mb": peak_mb,
        "decoder_params_m": summary["decoder/params"] / 1e6,
        "backbone_params_m": summary["backbone/params"] / 1e6,
        "decoder_gflops": summary["decoder/gflops"],
        "backbone_gflops": summary["backbone/gflops"],
    }


def main() -> None:
    args = _parse()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    # the measuring processes get the same arguments, without --decoders and its values
    skip, rest = False, []
    for a in sys.argv[1:]:
        if a == "--decoders":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    passthrough = rest
    h, w = args.size
    print(
        f"backbone {args.backbone}, {h}x{w}, batch {args.batch}, tasks {' '.join(args.tasks)}, {args.device}, "
        f"precision {args.precision}; step = forward + backward + AdamW, median of {args.steps}"
    )
    header = f"{'decoder':<10}{'step (s)':>10}{'peak (MiB)':>12}{'dec params (M)':>16}{'dec GFLOPs':>12}{'backbone GFLOPs':>17}"
    print(header)
    print("-" * len(header))
    for decoder in args.decoders:
        cmd = [sys.executable, __file__, *passthrough, "--one", decoder]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(
                f"{decoder:<10} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{decoder:<10}{r['step_s']:>10.3f}{r['peak_mb']:>12.0f}{r['decoder_params_m']:>16.2f}"
            f"{r['decoder_gflops']:>12.1f}{r['backbone_gflops']:>17.1f}"
        )


if __name__ == "__main__":
    main()
