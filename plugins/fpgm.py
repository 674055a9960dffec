"""FPGM: prune the filters closest to the geometric median of their layer (He et al. 2019)."""

from __future__ import annotations

import torch
import torch_pruning as tp


class GeometricMedian:
    """FPGM: distance to the other channels' weights (geometric median); the most replaceable go first.

    Wraps torch-pruning's ``FPGMImportance``: distances are computed per coupled layer, averaged over
    the group and normalised by their mean. Norm layers are not used.
    """

    needs_gradients = False

    def __init__(self) -> None:
        self._imp = tp.importance.FPGMImportance(p=2, group_reduction="mean", normalizer="mean")

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        return self._imp(group)
