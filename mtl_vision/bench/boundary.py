"""Seconds per 480x640 image of `mtl_vision.metrics.boundary.ods_f`, and agreement with pyEdgeEval.

Synthetic NYUD-sized data: label-map boundaries as GT; as the prediction, the GT shifted by one
pixel and partly faded out, plus weaker false edges, blurred, plus smooth and pixel noise. Rows: our
seconds per image (wall and CPU) on 1 and on `--workers` processes with the scores, and, when
pyEdgeEval is installed and `--ref-images` > 0, its seconds per image and scores next to ours on the
first `--ref-images` images. Notes: the numba warm-up time (the compile on the first call, or loading
the cache), the estimated time of NYUD's validation split, and how pyEdgeEval's raw counts compare
with ours.

    mtl-bench boundary --images 8 --workers 2
    mtl-bench boundary --images 654 --workers 2 --json boundary.json
    mtl-bench boundary --images 2 --ref-images 3   # pyEdgeEval takes ~100 s per image
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from mtl_vision.bench.report import Result

__all__ = ["add_arguments", "reference", "run", "synthetic"]

NYUD_VAL_IMAGES = 654


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=4, help="images scored by ours")
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--ref-images", type=int, default=0, help="images also run through pyEdgeEval (~100 s each)")
    parser.add_argument("--size", default="480x640", help="HxW of the synthetic images")
    parser.add_argument("--max-dist", type=float, default=0.011, help="match tolerance, of the image diagonal")
    parser.add_argument("--thresholds", type=int, default=99)
    parser.add_argument("--seed", type=int, default=0)


def synthetic(rng, h: int, w: int):
    """(prediction (H,W) float in [0,1], GT boundaries (H,W) uint8) of one synthetic scene."""
    import numpy as np
    from scipy.ndimage import gaussian_filter, zoom

    from mtl_vision.data.pascal_context import label_boundaries

    def label_map(cell: int) -> np.ndarray:
        return np.argmax(
            np.stack([zoom(rng.random((h // cell + 1, w // cell + 1)), cell, order=1)[:h, :w] for _ in range(4)]), 0
        )

    def smooth(cell: int) -> np.ndarray:
        return zoom(rng.random((h // cell + 1, w // cell + 1)), cell, order=1)[:h, :w]

    gt = label_boundaries(label_map(48)).astype(np.uint8)
    false_edges = label_boundaries(label_map(32)).astype(float)  # texture edges absent from the GT
    edges = np.roll(gt, 1, axis=1) * np.clip(1.6 * smooth(64) - 0.2, 0, 1) + 0.5 * false_edges * smooth(64)
    p = 2 * gaussian_filter(edges, 1.5) + 0.5 * gaussian_filter(rng.random((h, w)), 2) + 0.15 * rng.random((h, w))
    return np.clip(p / p.max(), 0, 1), gt


def reference(probs, gts, max_dist: float, num_thresholds: int):
    """pyEdgeEval's per-image counts (N, T, 4), its odsF / oisF / AP (percent) and seconds per image."""
    import numpy as np
    from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
    from pyEdgeEval.common.metrics import compute_rec_prec_f1, interpolated_max_scores
    from pyEdgeEval.common.utils import check_thresholds

    thr = check_thresholds(num_thresholds)
    t = time.perf_counter()
    counts = np.stack([np.stack(evaluate_boundaries_threshold(thr, p, g, max_dist=max_dist), axis=1)
                       for p, g in zip(probs, gts, strict=True)])
    seconds = (time.perf_counter() - t) / len(probs)
    rec, prec, _ = compute_rec_prec_f1(*counts.sum(0).T)
    ods = float(interpolated_max_scores(thr, rec, prec)[3])
    best = np.sum([c[np.argmax(compute_rec_prec_f1(*c.T)[2])] for c in counts], axis=0)
    ois = float(compute_rec_prec_f1(*best)[2])
    ap = sum(float(np.max(prec[rec >= level], initial=0)) for level in np.arange(0, 1, 0.01)) / 101  # as pyEdgeEval
    return counts, {"odsF": 100 * ods, "oisF": 100 * ois, "ap": 100 * ap}, seconds


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _row(name: str, workers: int, images: int, wall: float, cpu: float, scores: dict[str, float]) -> dict[str, Any]:
    return {"implementation": name, "workers": workers, "images": images, "s_per_image": wall,
            "cpu_s_per_image": cpu, "odsF": scores["odsF"], "oisF": scores["oisF"], "ap": scores["ap"]}


def run(args: argparse.Namespace) -> Result:
    import numpy as np

    from mtl_vision.bench.decoders import parse_size
    from mtl_vision.metrics.boundary import _boundary_compute, _boundary_update, boundary_counts, ods_f

    h, w = parse_size(args.size)
    n, k = args.images, args.ref_images
    if n < 1 or k < 0 or args.workers < 1:
        raise SystemExit(f"--images >= 1, --ref-images >= 0, --workers >= 1 expected, got {n}, {k}, {args.workers}")
    rng = np.random.default_rng(args.seed)
    data = [synthetic(rng, h, w) for _ in range(max(n, k))]
    probs, gts = np.stack([d[0] for d in data]), np.stack([d[1] for d in data])
    notes = [f"{len(data)} synthetic images {h}x{w}, GT edge pixels per image: {gts.sum((1, 2)).mean():.0f}"]

    t = time.perf_counter()
    boundary_counts(probs[0, :32, :32], gts[0, :32, :32], args.max_dist, args.thresholds)
    notes.append(f"numba warm-up (compile, or load from the cache): {time.perf_counter() - t:.2f} s")

    # wall seconds, and CPU seconds (this process plus finished workers), which other load on the
    # machine inflates less
    t, cpu = time.perf_counter(), _cpu_seconds()
    counts = np.stack([boundary_counts(p, g, args.max_dist, args.thresholds) for p, g in zip(probs[:n], gts[:n])])
    one, one_cpu = (time.perf_counter() - t) / n, (_cpu_seconds() - cpu) / n
    rows = [_row("ours", 1, n, one, one_cpu, _boundary_compute(*_boundary_update(counts)))]
    many = one
    if args.workers > 1:
        t, cpu = time.perf_counter(), _cpu_seconds()
        out = ods_f(probs[:n], gts[:n], args.max_dist, args.thresholds, workers=args.workers)
        many, many_cpu = (time.perf_counter() - t) / n, (_cpu_seconds() - cpu) / n
        rows.append(_row("ours", args.workers, n, many, many_cpu, out))
    notes.append(f"estimated NYUD val ({NYUD_VAL_IMAGES} images) on {args.workers} worker(s): "
                 f"{many * NYUD_VAL_IMAGES / 60:.1f} min (wall); CPU s/image counts all processes")
    notes.append(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    if k > 0:
        try:
            ref_counts, ref, seconds = reference(probs[:k], gts[:k], args.max_dist, args.thresholds)
        except ImportError as err:
            notes.append(f"pyEdgeEval not available ({err})")
        else:
            ours_k = np.stack([boundary_counts(p, g, args.max_dist, args.thresholds)
                               for p, g in zip(probs[:k], gts[:k])])
            rows.append(_row("pyEdgeEval", 1, k, seconds, float("nan"), ref))
            rows.append(_row("ours (same images)", 1, k, float("nan"), float("nan"),
                             ods_f(probs[:k], gts[:k], args.max_dist, args.thresholds)))
            deficit = ours_k[..., 0] - ref_counts[..., 0]
            same_sums = np.array_equal(ours_k[..., [1, 3]], ref_counts[..., [1, 3]])
            notes.append(f"raw counts: sumR and sumP identical: {same_sums}; "
                         f"cntR/cntP identical: {np.array_equal(ours_k, ref_counts)}")
            notes.append(
                f"matches (ours - pyEdgeEval) per image and threshold: min {deficit.min():.0f}, "
                f"max {deficit.max():.0f}, "
                f"total {deficit.sum():.0f} of {ours_k[..., 0].sum():.0f} "
                f"({100 * deficit.sum() / ours_k[..., 0].sum():.3f} %); "
                f"(image, threshold) pairs that differ: {(deficit != 0).sum()} of {deficit.size}"
            )
    # the table rounds scores over 10 to one decimal; the differences to pyEdgeEval need three
    notes += [f"{r['implementation']}, {r['workers']} worker(s), {r['images']} images: "
              + "  ".join(f"{k}={r[k]:.3f}" for k in ("odsF", "oisF", "ap")) for r in rows]
    settings = {"size": f"{h}x{w}", "max_dist": args.max_dist, "thresholds": args.thresholds, "seed": args.seed}
    return Result(title="Boundary benchmark (BSDS odsF / oisF / AP): seconds per image", rows=rows,
                  settings=settings, notes=notes)
