"""Magnitude criteria over whole coupled groups, wrapping torch-pruning's importances.

Each scores a channel from the weights it owns in every coupled layer (output rows, input columns,
norm scales), averages over the layers and divides by the group's mean, so that groups of
different sizes rank on one global scale.
"""

from __future__ import annotations

import torch_pruning as tp

from ._wrapped import WrappedImportance


class GroupL2(WrappedImportance):
    """Group L2 magnitude: each channel's squared weights summed over every coupled layer.

    Wraps torch-pruning's ``GroupMagnitudeImportance(p=2)``: per-layer scores are averaged over the
    group and normalised by their mean, so groups of different sizes rank on one global scale.
    """

    def build(self) -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")


class GroupL1(WrappedImportance):
    """Group L1 magnitude: each channel's absolute weights summed over every coupled layer.

    Wraps torch-pruning's ``GroupMagnitudeImportance(p=1)``, averaged and mean-normalised like ``l2``.
    """

    def build(self) -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")


class BNScale(WrappedImportance):
    """Network slimming: |gamma| of the group's batch norms; abstains where a group has none.

    Wraps torch-pruning's ``BNScaleImportance`` (Liu et al. 2017), averaged over the group's batch
    norms and mean-normalised. A group without a batch norm is never pruned, so on a model without
    any (a transformer) nothing can be pruned and the search says so.
    """

    def build(self) -> tp.importance.Importance:
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer="mean")


class LAMP(WrappedImportance):
    """LAMP: group L2 magnitude divided by the sum of the scores not below it.

    Wraps torch-pruning's ``LAMPImportance``: within a group the top channel scores 1 and the others
    their share of what would remain, a layer-adaptive scale for the global ranking (Lee et al. 2021).
    """

    def build(self) -> tp.importance.Importance:
        return tp.importance.LAMPImportance(p=2, group_reduction="mean", normalizer="lamp")
