"""`mtl-bench`: each subcommand runs on its tiniest setting and prints / writes the table it promises (no test
asserts a time)."""

from __future__ import annotations


def test_bench_decoders_scaling_tables(tmp_path, capsys):
    """`mtl-bench decoders` with two task sets and two sizes: one row per setting, a failing decoder
    reported in its rows, and both scaling tables under the table."""
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / "decoders.json"
    main(["decoders", "--in-process", "--backbone", "test_resnet", "--decoders", "heads", "taskprompter",
          "--tasks", "1", "2", "--sizes", "32x32", "64x64", "--warmup", "0", "--steps", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "against the number of tasks (32x32)" in printed and "against the resolution (2 tasks)" in printed
    result = json.loads(out.read_text())
    cells = [(r["decoder"], r["tasks"], r["size"]) for r in result["rows"]]
    # the task sets at the first size, then the sizes at the middle task set, without repeats
    assert cells == [(d, t, s) for d in ("heads", "taskprompter") for t, s in
                     (("1", "32x32"), ("2", "32x32"), ("2", "64x64"))]
    for row in result["rows"]:
        assert set(row) == {"decoder", "tasks", "size", "steps", "step_s", "peak_mb", "decoder_params_m",
                            "backbone_params_m", "decoder_gflops", "backbone_gflops", "error"}
        if row["decoder"] == "heads":
            assert row["error"] == "" and row["step_s"] > 0 and row["decoder_gflops"] > 0
        else:  # TaskPrompter runs a ViT's blocks itself: not on a ResNet, and said so
            assert "ViT" in row["error"]
    assert "| taskprompter | fails: ValueError" in printed


def test_bench_decoders_rejects_unknown_task_set():
    import pytest

    from mtl_vision.bench.cli import main

    with pytest.raises(SystemExit, match="--tasks 'semseg,sky'"):
        main(["decoders", "--in-process", "--decoders", "heads", "--tasks", "semseg,sky"])


def test_bench_balancers_table(tmp_path, capsys):
    """`mtl-bench balancers`: ew and a gradient balancer in features mode, every cell a row with its
    ratio to ew, and the README table under it."""
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / "balancers.json"
    main(["balancers", "--in-process", "--balancers", "pcgrad", "--modes", "features", "--tasks-counts", "2",
          "--size", "32x32", "--warmup", "0", "--steps", "1", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["balancer"], r["mode"], r["tasks"]) for r in rows] == [("ew", "", 2), ("pcgrad", "features", 2)]
    assert all(r["error"] == "" and r["step_s"] > 0 for r in rows) and rows[0]["x_ew"] == 1.0
    assert rows[1]["manual_optimization"] is True
    assert "| pcgrad (features) |" in printed and "<= 1.5x at 4 tasks" in printed


def test_bench_boundary_table(tmp_path):
    """`mtl-bench boundary` on one small image: a row per run with its seconds and scores."""
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / "boundary.json"
    main(["boundary", "--images", "2", "--workers", "1", "--size", "48x64", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [(r["implementation"], r["workers"], r["images"]) for r in result["rows"]] == [("ours", 1, 2)]
    assert {"s_per_image", "cpu_s_per_image", "odsF", "oisF", "ap"} <= set(result["rows"][0])
    assert any(n.startswith("numba warm-up") for n in result["notes"])


def test_bench_guard_table(tmp_path):
    """`mtl-bench guard`: the guard's snapshot and check against the forward + backward they guard."""
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / "guard.json"
    main(["guard", "--model", "resnet18", "--size", "32", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["forward+backward", "guard snapshot", "guard check", "guard total"]
    assert all(set(r) == {"part", "ms", "percent_of_step"} for r in rows)


def test_bench_moe_table(tmp_path, capsys):
    """`mtl-bench moe` at its tiniest: a row per expert count (ratio to the fewest) and a step row per
    backbone setting (dense, stacked MoE, per-task MoE; ratio to dense)."""
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / "moe.json"
    main(["moe", "--experts", "4", "2", "--tokens", "32", "--dim", "8", "--hidden", "16", "--backbone", "test_vit",
          "--size", "32x32", "--batch", "1", "--tasks", "semseg", "depth", "--moe-layers", "1", "--warmup", "0",
          "--steps", "1", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert all(set(r) == {"rows", "setting", "ms", "ratio", "dropped_share"} for r in rows)
    assert [r["rows"] for r in rows] == ["layer", "layer", "step", "step", "step"]
    assert [r["setting"] for r in rows[:2]] == ["4 experts top-2", "2 experts top-2"]
    assert [r["setting"].split(", ")[-1] for r in rows[2:]] == ["dense", "moe [1] stacked", "moe [1] per_task"]
    assert rows[1]["ratio"] == 1.0 and rows[2]["ratio"] == 1.0 and all(r["ms"] > 0 for r in rows)
    assert result["settings"]["backbone"] == "test_vit" and "| step  | test_vit + heads, dense" in printed


STEP_TINY = ["backbone=test_resnet", "decoder.channels=16", "data.batch_size=2", "data.num_workers=0",
             "data.dataset.height=32", "data.dataset.width=32", "data.dataset.num_samples={train:8,val:2}",
             "data.tasks=[semseg,depth]"]


def _bench_step(tmp_path, name: str, *extra: str) -> dict:
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / f"{name}.json"
    main(["step", *STEP_TINY, *extra, "--steps", "3", "--warmup", "1", "--block", "2", "--batches", "2",
          "--threads", "1", "--json", str(out)])
    return json.loads(out.read_text())


def test_bench_step_weighting(tmp_path, capsys):
    """`mtl-bench step` on a loss weighting: both loops time every step they were asked for, the plain
    loop is the ratio's unit, and each phase of a real step took time in both."""
    from mtl_vision.bench.step import PHASES

    result = _bench_step(tmp_path, "ew", "trainer.log_every_n_steps=2")
    printed = capsys.readouterr().out
    trainer, plain = result["rows"]
    assert (trainer["loop"], plain["loop"]) == ("trainer", "plain")
    assert trainer["steps"] == plain["steps"] == 3 and plain["ratio"] == 1.0
    assert trainer["ratio"] == trainer["median_s"] / plain["median_s"]
    for row in (trainer, plain):
        assert row["median_s"] > 0 and row["images_per_s"] == 2 / row["median_s"]
        assert {f"{p}_ms" for p in PHASES} <= set(row)
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["optimizer_ms"] > 0
    # only the Trainer logs; the plain loop's data come straight from memory
    assert trainer["logging_ms"] > 0 and plain["logging_ms"] == 0 and plain["data_ms"] == 0
    assert result["settings"]["batch_size"] == 2 and result["settings"]["log_every_n_steps"] == 2
    assert "framework overhead: Trainer / plain =" in printed


def test_bench_step_gradient_balancer(tmp_path):
    """A gradient balancer (manual optimisation): the aggregation is timed as the balancer in both
    loops, and the plain loop drives the module's own task-gradient step."""
    result = _bench_step(tmp_path, "pcgrad", "balancer=pcgrad")
    assert result["settings"]["balancer"] == "GradientBalancer"
    for row in result["rows"]:
        assert row["steps"] == 3 and row["balancer_ms"] > 0 and row["backward_ms"] > 0


def test_bench_step_refuses_what_it_cannot_compare():
    import pytest

    from mtl_vision.bench.cli import main

    with pytest.raises(SystemExit, match="--clock thread: needs --device cpu and --threads 1"):
        main(["step", *STEP_TINY, "--clock", "thread", "--threads", "2"])
    with pytest.raises(SystemExit, match=r"trainer.precision='bf16-true', expected one of"):
        main(["step", *STEP_TINY, "trainer.precision=bf16-true"])


def test_bench_data_rows_per_dataset(tmp_path, capsys):
    """`mtl-bench data` on tiny fixtures: a row per dataset with samples/s and the decode / transform
    split, the resumable order's overhead in a note, and the same in JSON."""
    import json

    from mtl_vision.bench.cli import main

    out = tmp_path / "data.json"
    main(["data", "--dataset", "nyud", "pascal_context", "synthetic", "--num", "2", "--repeats", "1",
          "--fixture-n", "1", "--size", "24", "32", "--crop", "16", "24", "--sampling", "50", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["dataset"] for r in result["rows"]] == ["nyud", "pascal_context", "synthetic"]
    for row in result["rows"]:
        assert set(row) == {"dataset", "tasks", "source", "crop", "samples/s", "samples/cpu-s", "ms/sample",
                            "decode ms", "transform ms"}
        assert row["samples/s"] > 0 and row["decode ms"] > 0 and row["source"] == "24x32"
    assert [r["crop"] for r in result["rows"]] == ["16x24", "16x24", "-"]
    assert result["settings"]["threads"] == 1 and result["settings"]["num"] == 2
    assert any(n.startswith("resumable order (EpochSampler + SeededSamples) over 50") for n in result["notes"])
    assert "| pascal_context |" in printed


def test_bench_data_refuses_root_with_several_datasets(tmp_path):
    import pytest

    from mtl_vision.bench.cli import main

    with pytest.raises(SystemExit, match="--root .*exactly one --dataset"):
        main(["data", "--dataset", "nyud", "pascal_context", "--root", str(tmp_path)])


def test_bench_gpu_script_says_it_needs_a_gpu(tmp_path):
    """`scripts/bench_gpu.py` without a CUDA device: a clear message, status 2, nothing written."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the script would run the benchmark")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2
    assert "no CUDA device is visible" in done.stderr
    assert not (tmp_path / "out").exists()
