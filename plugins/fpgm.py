"""FPGM: prune the filters closest to the geometric median of their layer (He et al. 2019)."""

from __future__ import annotations

import torch_pruning as tp

from ._wrapped import WrappedImportance


class GeometricMedian(WrappedImportance):
    """FPGM: distance to the other channels' weights (geometric median); the most replaceable go first.

    Wraps torch-pruning's ``FPGMImportance``: distances are computed per coupled layer, averaged over
    the group and normalised by their mean. Norm layers are not used.
    """

    def build(self) -> tp.importance.Importance:
        return tp.importance.FPGMImportance(p=2, group_reduction="mean", normalizer="mean")
