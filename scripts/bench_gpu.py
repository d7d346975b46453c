"""The GPU benchmark: `mtl-bench step` for the default config and for InvPT on NYUD at batch 2, in
32-true and bf16-mixed, and bf16-mixed with channels_last and torch.compile, on one CUDA device.

    python scripts/bench_gpu.py --out bench_gpu            # about 6-8 minutes on one H100/H200
    python scripts/bench_gpu.py --out bench_gpu --table    # print the README table of a finished run

Each setting runs in its own process (`mtl-bench step ... --device cuda --json <out>/<name>.json`,
killed after `--timeout` seconds); `<out>/summary.json` collects them and the Markdown table printed
at the end is the one README's "Speed" section shows. InvPT runs on a NYUD-layout fixture written at
the real image size (480x640, 448x576 crops) with `backbone.pretrained=false`, so nothing is
downloaded. Without a CUDA device the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "default": [],
    "invpt_nyud": ["experiment=invpt_nyud", "data.batch_size=2", "backbone.pretrained=false", "data.num_workers=0"],
}
SETTINGS = {
    "32-true": ["--precision", "32-true"],
    "bf16-mixed": ["--precision", "bf16-mixed"],
    "bf16-mixed+channels_last+compile": ["--precision", "bf16-mixed", "channels_last=true", "compile=true"],
}


def _table(rows: list[dict]) -> str:
    lines = [
        "| config | precision / switches | Trainer s/step | plain s/step | Trainer / plain | images/s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | {row['setting']} | {row['error']} | | | | |")
            continue
        lines.append(
            f"| {row['config']} | {row['setting']} | {row['trainer_s']:.4f} | {row['plain_s']:.4f} | "
            f"{row['ratio']:.3f} | {row['images_per_s']:.1f} | {row['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def _summarise(config: str, setting: str, path: Path) -> dict:
    result = json.loads(path.read_text())
    trainer, plain = result["rows"]
    return {
        "config": config,
        "setting": setting,
        "trainer_s": trainer["median_s"],
        "plain_s": plain["median_s"],
        "ratio": trainer["ratio"],
        "images_per_s": trainer["images_per_s"],
        "peak_gib": max(trainer["peak_mem_mb"], plain["peak_mem_mb"]) / 1024,
        "environment": result.get("environment", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_gpu"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=150, help="seconds per setting")
    parser.add_argument("--table", action="store_true", help="only print the table of <out>/summary.json")
    args = parser.parse_args()
    summary = args.out / "summary.json"
    if args.table:
        print(_table(json.loads(summary.read_text())["rows"]))
        return
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is visible (torch.cuda.is_available() is False); nothing was run",
              file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    nyud = args.out / "NYUD_MT"
    if not nyud.exists():
        from mtl_vision.data.nyud_fixture import write_nyud_fixture

        write_nyud_fixture(nyud, layout="nyud_mt", n=8)
    rows = []
    for config, overrides in CONFIGS.items():
        extra = [f"data.root={nyud}"] if config != "default" else []
        for setting, flags in SETTINGS.items():
            name = f"{config}__{setting.replace('+', '_')}"
            path = args.out / f"{name}.json"
            command = [sys.executable, "-m", "mtl_vision.bench.cli", "step", *overrides, *extra, *flags,
                       "--device", "cuda", "--steps", str(args.steps), "--json", str(path)]
            start = time.perf_counter()
            print(f"== {name}: {' '.join(command[3:])}", flush=True)
            try:
                done = subprocess.run(command, check=False, timeout=args.timeout, capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                rows.append({"config": config, "setting": setting, "error": f"timeout after {args.timeout} s"})
                continue
            if done.returncode != 0 or not path.exists():
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                rows.append({"config": config, "setting": setting, "error": f"failed: {last[:120]}"})
                continue
            rows.append(_summarise(config, setting, path))
            print(f"   {time.perf_counter() - start:.0f} s, ratio {rows[-1]['ratio']:.3f}", flush=True)
    tmp = summary.with_name(summary.name + ".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    tmp.replace(summary)
    print(_table(rows))


if __name__ == "__main__":
    main()
