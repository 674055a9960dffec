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


NOT_A_CLASS = 42
