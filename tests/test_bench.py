"""`mtl-bench`: each subcommand runs on its tiniest setting and prints / writes the table it promises (no test
asserts a time)."""

from __future__ import annotations


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
