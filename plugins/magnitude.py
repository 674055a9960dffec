"""Magnitude criteria over whole coupled groups."""

from __future__ import annotations

import torch
import torch_pruning as tp


class GroupL2:
    """Group L2 magnitude: each channel's squared weights summed over every coupled layer.

    Wraps torch-pruning's ``GroupMagnitudeImportance(p=2)``: per-layer scores are averaged over the
    group and normalised by their mean, so groups of different sizes rank on one global scale.
    """

    needs_gradients = False

    def __init__(self) -> None:
        self._imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        return self._imp(group)
