"""The baseline every criterion has to beat: random scores."""

from __future__ import annotations

import torch
import torch_pruning as tp


class RandomScores:
    """Seeded uniform random scores: the baseline every other criterion should beat.

    One generator per instance, so the same groups scored in the same order get the same scores.
    """

    needs_gradients = False

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self._generator)
