"""Criteria that estimate the loss change of removing a channel from gradients (calibration data)."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ._wrapped import WrappedImportance


class Taylor(WrappedImportance):
    """First-order Taylor: |weight x gradient| summed over each channel's coupled weights.

    Wraps torch-pruning's ``GroupTaylorImportance`` (Molchanov et al. 2019) on the gradients the
    pipeline's calibration batches leave in ``.grad``; averaged over the group, mean-normalised.
    """

    needs_gradients = True

    def build(self) -> tp.importance.Importance:
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")


class Hessian:
    """Optimal brain damage: weight^2 x mean squared per-sample gradient (a diagonal Hessian estimate).

    Wraps torch-pruning's ``GroupHessianImportance``. The pipeline's calibration calls
    ``accumulate_grad`` after every sample's backward pass; tp 1.6's own ``accumulate_grad`` keys its
    sums by parameter but tests membership by name, so it keeps only the last sample: this class
    accumulates instead and shows tp the mean through ``.grad`` for the duration of one call.
    Without any accumulation the squared gradient found in ``.grad`` stands in (a one-sample estimate).
    """

    needs_gradients = True
    needs_per_sample_gradients = True

    def __init__(self) -> None:
        self._imp = tp.importance.GroupHessianImportance(group_reduction="mean", normalizer="mean")
        self._squares: dict[nn.Parameter, torch.Tensor] = {}
        self._samples = 0

    def accumulate_grad(self, model: nn.Module) -> None:
        """Add the squared gradient now in ``.grad`` (one sample's) to the running sums."""
        for p in model.parameters():
            if p.grad is not None:
                square = p.grad.detach().pow(2)
                self._squares[p] = self._squares[p] + square if p in self._squares else square
        self._samples += 1

    def _hessian(self, p: nn.Parameter) -> torch.Tensor | None:
        if p in self._squares and self._squares[p].shape == p.shape:
            return self._squares[p] / self._samples
        return None if p.grad is None else p.grad.detach().pow(2)

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        params = {p for dep, _ in group if isinstance(dep.target.module, nn.Module)
                  for p in dep.target.module.parameters(recurse=False)}
        saved = {p: p.grad for p in params}
        try:
            for p in params:
                p.grad = self._hessian(p)
            return self._imp(group)
        finally:
            for p, grad in saved.items():
                p.grad = grad
