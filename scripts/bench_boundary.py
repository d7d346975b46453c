"""Seconds per 480x640 image of `mtl_vision.metrics.boundary.ods_f`, and agreement with pyEdgeEval.

    python scripts/bench_boundary.py --images 8 --workers 2 --ref-images 3

Synthetic NYUD-sized data: label-map boundaries as GT; as the prediction, the GT shifted by one
pixel and partly faded out, plus weaker false edges, blurred, plus smooth and pixel noise. Prints the numba warm-up time (the
compile on the first call, or loading the cache), our seconds per image on 1 and on ``--workers``
processes, and, when pyEdgeEval is installed, its seconds per image, its odsF / oisF / AP next to
ours on the first ``--ref-images`` images and how its raw counts compare with ours.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from mtl_vision.data.pascal_context import label_boundaries
from mtl_vision.metrics.boundary import _boundary_compute, _boundary_update, boundary_counts, ods_f

NYUD_VAL_IMAGES = 654


def synthetic(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
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


def reference(
    probs: np.ndarray, gts: np.ndarray, max_dist: float, num_thresholds: int
) -> tuple[np.ndarray, dict, float]:
    """pyEdgeEval's per-image counts (N, T, 4), its odsF / oisF / AP (percent) and seconds per image."""
    from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
    from pyEdgeEval.common.metrics import compute_rec_prec_f1, interpolated_max_scores
    from pyEdgeEval.common.utils import check_thresholds

    thr = check_thresholds(num_thresholds)
    t = time.perf_counter()
    counts = np.stack(
        [np.stack(evaluate_boundaries_threshold(thr, p, g, max_dist=max_dist), axis=1) for p, g in zip(probs, gts)]
    )
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


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ref-images", type=int, default=0, help="images also run through pyEdgeEval (~100 s each)")
    ap.add_argument("--max-dist", type=float, default=0.011)
    ap.add_argument("--thresholds", type=int, default=99)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    data = [synthetic(rng, 480, 640) for _ in range(max(args.images, args.ref_images))]
    probs, gts = np.stack([d[0] for d in data]), np.stack([d[1] for d in data])
    print(f"{len(data)} images 480x640, GT edge pixels per image: {gts.sum((1, 2)).mean():.0f}")

    t = time.perf_counter()
    boundary_counts(probs[0, :32, :32], gts[0, :32, :32], args.max_dist, args.thresholds)
    print(f"numba warm-up (compile, or load from the cache): {time.perf_counter() - t:.2f} s")

    # Wall seconds, and CPU seconds (this process plus finished workers), which other load on the
    # machine inflates less.
    n = args.images
    t, cpu = time.perf_counter(), _cpu_seconds()
    counts = np.stack([boundary_counts(p, g, args.max_dist, args.thresholds) for p, g in zip(probs[:n], gts[:n])])
    one, one_cpu = (time.perf_counter() - t) / n, (_cpu_seconds() - cpu) / n
    print(
        f"ours, 1 worker:  {one:.3f} s/image (CPU {one_cpu:.3f} s)  {_fmt(_boundary_compute(*_boundary_update(counts)))}"
    )
    many = one
    if args.workers > 1:
        t, cpu = time.perf_counter(), _cpu_seconds()
        out = ods_f(probs[:n], gts[:n], args.max_dist, args.thresholds, workers=args.workers)
        many, many_cpu = (time.perf_counter() - t) / n, (_cpu_seconds() - cpu) / n
        print(f"ours, {args.workers} workers: {many:.3f} s/image (CPU {many_cpu:.3f} s, all processes)  {_fmt(out)}")
    minutes = many * NYUD_VAL_IMAGES / 60
    print(f"estimated NYUD val ({NYUD_VAL_IMAGES} images) on {args.workers} worker(s): {minutes:.1f} min (wall)")
    print(f"load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    k = args.ref_images
    if k == 0:
        return
    try:
        ref_counts, ref, seconds = reference(probs[:k], gts[:k], args.max_dist, args.thresholds)
    except ImportError as err:
        print(f"pyEdgeEval not available ({err})")
        return
    ours_k = np.stack([boundary_counts(p, g, args.max_dist, args.thresholds) for p, g in zip(probs[:k], gts[:k])])
    print(f"pyEdgeEval:      {seconds:.2f} s/image  {_fmt(ref)}  (first {k} images)")
    print(
        f"ours:                           {_fmt(ods_f(probs[:k], gts[:k], args.max_dist, args.thresholds))}  (same {k} images)"
    )
    same_sums = np.array_equal(ours_k[..., [1, 3]], ref_counts[..., [1, 3]])
    deficit = ours_k[..., 0] - ref_counts[..., 0]
    print(
        f"raw counts: sumR and sumP identical: {same_sums}; cntR/cntP identical: {np.array_equal(ours_k, ref_counts)}"
    )
    print(
        f"  matches (ours - pyEdgeEval) per image and threshold: min {deficit.min():.0f}, max {deficit.max():.0f}, "
        f"total {deficit.sum():.0f} of {ours_k[..., 0].sum():.0f} ({100 * deficit.sum() / ours_k[..., 0].sum():.3f} %); "
        f"(image, threshold) pairs that differ: {(deficit != 0).sum()} of {deficit.size}"
    )


if __name__ == "__main__":
    main()
