"""Activation-based criteria: what the data says a channel carries, not what its weights are."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ._slices import slices, to_root


class MeanActivation:
    """Mean |activation| of each channel on the calibration data, where its consumers read it.

    A channel that reaches its consumers near zero (dead ReLUs, tiny batch-norm scales) can go.
    Scores average over the group's consuming layers (a depthwise conv counts as one) and are
    divided by their mean so groups rank on one scale; a group with no observed consumer abstains.
    """

    needs_gradients = False
    needs_activations = True

    def __init__(self) -> None:
        self._stats: dict[nn.Module, torch.Tensor] | None = None

    def set_activations(self, stats: dict[nn.Module, torch.Tensor]) -> None:
        self._stats = stats

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        if self._stats is None:
            raise RuntimeError("MeanActivation needs set_activations(stats) before scoring; the pipeline does this")
        n = len(group[0].idxs)
        total, seen = torch.zeros(n), torch.zeros(n)
        for s in slices(group):
            if s.kind not in ("consumer", "depthwise") or s.module not in self._stats:
                continue
            values = self._stats[s.module].float().cpu()[s.idxs]
            total += to_root(values, s, n)
            seen += to_root(torch.ones_like(values), s, n)
        if not seen.any():
            return None
        scores = total / seen.clamp(min=1)
        return scores / scores.mean().clamp(min=1e-12)
