"""Aligned-MTL: Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023.

As SamsungLabs/MTL computes it (code/optim/aligned/solver.py `ProcrustesSolver.apply` and
code/optim/aligned/balancer.py `AlignedMTLBalancer.step`, commit 3f577f1): from the float32
Gramian G = J J^T, the eigen-decomposition G = V diag(s) V^T; eigenvalues above
max(s) * T * eps(float32) count (their tolerance uses torch's default float32 epsilon whatever the
dtype); the balance matrix W = V_r diag(sqrt(scale) / sqrt(s_r)) V_r^T over the r kept directions
with scale = s_min (`min`, their default), median(s) (`median`) or mean(s) (`rmse`); the update is
the SUM of the aligned task gradients, J^T W 1, i.e. task weights W 1 (not torchjd's mean).
The task heads keep their plain gradient (their `scale_decoder_grad=False` default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTLWeighting(ReferenceWeighting):
    """Args:
    scale_mode: "min" (the authors' default), "median" or "rmse" (the eigenvalue that sets the
        scale of the aligned gradients).
    """

    def __init__(self, scale_mode: str = "min") -> None:
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"balancer.aggregator.scale_mode must be one of {list(SCALE_MODES)}, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g = as_float32(gramian)
        values, vectors = torch.linalg.eigh(g, UPLO="U")  # ascending, as torch.symeig (upper=True)
        tol = values.max() * max(g.shape[-2:]) * torch.finfo(torch.float32).eps
        rank = int((values > tol).sum())
        if rank == 0:  # all gradients zero: the authors' code fails here; nothing to move
            zeros = torch.zeros(len(g), dtype=g.dtype, device=g.device)
            return zeros, torch.ones_like(zeros)
        order = torch.argsort(values, descending=True)
        values, vectors = values[order][:rank], vectors[:, order][:, :rank]
        if self.scale_mode == "min":
            scale = values[-1].sqrt()
        elif self.scale_mode == "median":
            scale = torch.median(values).sqrt()
        else:
            scale = values.mean().sqrt()
        balance = (vectors * scale / values.sqrt().view(1, -1)) @ vectors.T
        weights = balance.sum(-1)
        return weights, torch.ones_like(weights)


def aligned_mtl(scale_mode: str = "min") -> ReferenceAggregator:
    """The authors' Aligned-MTL as a torchjd aggregator (see the module docstring)."""
    return ReferenceAggregator(AlignedMTLWeighting(scale_mode=scale_mode))
