"""Dense multi-task metrics: torchmetrics classes (split-level, DDP-summable) and functional twins."""

from mtl_vision.metrics import functional
from mtl_vision.metrics.depth import DepthMetrics
from mtl_vision.metrics.edge import EdgeApproxMetrics, EdgeMetrics
from mtl_vision.metrics.normals import NormalMetrics
from mtl_vision.metrics.saliency import SaliencyMetrics
from mtl_vision.metrics.segmentation import SegmentationMetrics

__all__ = [
    "DepthMetrics",
    "EdgeApproxMetrics",
    "EdgeMetrics",
    "NormalMetrics",
    "SaliencyMetrics",
    "SegmentationMetrics",
    "functional",
]
