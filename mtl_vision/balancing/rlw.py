"""Random loss weighting: Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting:
A Litmus Test for Multi-Task Learning", TMLR 2022.

Every step draws `w = softmax(z)`, `z ~ N(0, I_T)`, as the authors' LibMTL/weighting/RLW.py (commit
4336804847eaa5e0b924b743d76beec7ac3fdc97). The draw comes from a generator seeded by (seed, step)
rather than torch's global one, so it is the same on every process and reproducible from a checkpoint.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl_vision.balancing.base import Balancer
from mtl_vision.balancing.distributed import seeded_generator


class RandomLossWeighting(Balancer):
    """Args:
        tasks: task names.
        seed: seed of the weight draws; the run's seed in the config.

    The `step` buffer counts optimiser steps (advanced in `after_step`); all micro-batches of one
    step share the same weights.
    """

    def __init__(self, *, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks=tasks)
        try:
            self.seed = operator.index(seed)
        except TypeError:
            raise ValueError(f"balancer.seed must be an integer, got {seed!r}") from None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        generator = seeded_generator(self.seed, int(self.step))
        z = torch.randn(len(self.tasks), generator=generator)
        device = next(iter(losses.values())).device
        weights = torch.softmax(z, dim=0).to(device)
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        self.step += 1
