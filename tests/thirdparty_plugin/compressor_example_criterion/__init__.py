"""An example third-party criterion for compressor, registered through the ``compressor.criteria`` entry points."""

from __future__ import annotations

import torch
import torch_pruning as tp

__all__ = ["ExampleL1Norm"]


class ExampleL1Norm:
    """Example plug-in: L1 norm of each channel's weights in the group's root layer only (Li et al. 2017)."""

    needs_gradients = False

    def __init__(self) -> None:
        # "first": the root layer's slice alone; "mean": groups of different sizes share one global scale.
        self._imp = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer="mean")

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        return self._imp(group)
