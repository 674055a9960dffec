"""Criteria for the tests, reached as ``helpers_criteria:Name`` (a ``package.module:Class`` path)."""

from __future__ import annotations

import torch


class ReverseIndex:
    """Scores channels by reversed index: the last channel of every group is pruned first."""

    needs_gradients = False

    def __call__(self, group) -> torch.Tensor:
        n = len(group[0].idxs)
        return torch.arange(n, 0, -1, dtype=torch.float32)


class NeedsGradients(ReverseIndex):
    """Declares that it needs gradients."""

    needs_gradients = True


class LargestFirst:
    """Group L2 turned upside down: the channels with the largest weights are pruned first."""

    needs_gradients = False

    def __init__(self) -> None:
        from compressor.criteria import get_criterion

        self._l2 = get_criterion("l2")

    def __call__(self, group) -> torch.Tensor:
        return 1.0 / (self._l2(group) + 1e-6)


NOT_A_CLASS = 42
