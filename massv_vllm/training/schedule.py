"""The learning-rate schedule and the sample order shared by every trainer in the repository: the
MASSV phases (``trainer``) and the synthetic world's target and small-LM trainers (benchmarks/world).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def cosine_lr_factor(
    step: int, warmup: int, total: int, min_ratio: float = 0.0, min_progress: float = 0.0
) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up over ``warmup`` steps, then
    cosine decay from 1 to ``min_ratio`` at ``total`` steps. ``min_progress`` (0..1) moves the decay
    ahead of the step count, e.g. to the share of a time budget already spent."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), min_progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """``cosine_lr_factor`` as a function of the step (for ``torch.optim.lr_scheduler.LambdaLR``)."""

    def f(step: int) -> float:
        return cosine_lr_factor(step, warmup, total, min_ratio)

    return f


class SampleStream:
    """Endless sample order: epoch e is a permutation seeded by (seed, e). Position p of the stream
    is sample ``perm(p // n)[p % n]``; a run's progress is the number of positions consumed."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, off = divmod(pos, self.n)
            out.append(self._permutation(epoch)[off])
        return out
