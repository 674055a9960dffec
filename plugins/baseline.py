"""The baseline every criterion has to beat: random scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp


@dataclass(frozen=True)
class RandomOptions:
    """``random``'s options (``--criterion-opt KEY=VALUE``)."""

    seed: int = 0
    """Seed of the scores' generator."""


class RandomScores:
    """Seeded uniform random scores: the baseline every other criterion should beat.

    One generator per instance, so the same groups scored in the same order get the same scores.
    """

    needs_gradients = False
    Options = RandomOptions

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self._generator)
