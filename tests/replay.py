"""What the transform tests against the authors' pipelines share (tests/test_atrc_transforms.py,
tests/test_mtinet_transforms.py): their recorded random draws replayed into our transforms, their
stored samples in our loaders' format, and the per-step comparison of image planes."""

from __future__ import annotations

import numpy as np
import torch


class Replay:
    """`TorchDraws` that returns their recorded draws, checking each call's kind and arguments.

    `randint_excludes_hi`: their `randint(lo, hi)` excludes hi (numpy's) while ours includes it,
    so our (lo, hi) is their (lo, hi + 1); False for Python's `random.randint`, which includes it.
    """

    def __init__(self, draws: list, *, randint_excludes_hi: bool = False) -> None:
        self.draws, self.used = list(draws), 0
        self._hi = 1 if randint_excludes_hi else 0

    def _next(self, name: str, args: tuple) -> float:
        assert self.used < len(self.draws), f"drew more than their code ({len(self.draws)} draws)"
        step, their_name, their_args, value = self.draws[self.used]
        assert (name, tuple(args)) == (their_name, tuple(their_args)), f"draw {self.used} of step {step}"
        self.used += 1
        return value

    def random(self) -> float:
        return self._next("random", ())

    def uniform(self, lo: float, hi: float) -> float:
        return self._next("uniform", (lo, hi))

    def randint(self, lo: int, hi: int) -> int:
        return self._next("randint", (lo, hi + self._hi))

    def done(self) -> bool:
        return self.used == len(self.draws)


def draws_of(case: dict, step: str) -> list:
    """The recorded draws of one step of a fixture case."""
    return [d for d in case["draws"] if d[0] == step]


def sample_of(stored: dict) -> dict:
    """A fixture input as our loaders return it (image in [0, 1], class maps int64, the rest float)."""
    out = {}
    for key, x in stored.items():
        if key == "image":
            out[key] = x.float().div_(255.0)
        elif key in ("semseg", "human_parts"):
            out[key] = x.to(torch.int64)
        else:
            out[key] = x.float()
    return out


def assert_planes_equal(ours: dict, theirs: dict, *, check_dtype: bool = False) -> None:
    """Every plane of one step equal to theirs (and of the same dtype with `check_dtype`)."""
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if check_dtype:
            assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def assert_seeded_by_torch_alone(transform, sample: dict) -> None:
    """The same torch seed gives the same sample, another seed another one, and Python's and
    numpy's global generators are left untouched (so `SeededSamples` makes the draws exact on resume)."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(transform(sample))
    assert random.getstate() == py_state and np.random.get_state()[1].tolist() == np_state[1].tolist()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0]), "another seed, another sample"
