"""Calibration: feed a criterion what it declares it needs (gradients, activation statistics),
computed on a few batches of the fine-tuning data with the original model in eval mode."""

from __future__ import annotations

import torch
from torch import nn

from . import criteria
from .data import LoadedData


def calibrate(model: nn.Module, data: LoadedData, *, batches: int, batch_size: int,
              criterion: criteria.Criterion | None = None) -> None:
    """Populate ``.grad`` with the summed gradients of ``batches`` batches (for gradient-based criteria).

    A ``criterion`` that declares ``needs_per_sample_gradients`` gets one backward pass per sample
    instead, each followed by ``criterion.accumulate_grad(model)`` (torch-pruning's protocol).
    """
    per_sample = criteria.needs_per_sample_gradients(criterion)
    device = next(model.parameters()).device  # schedules calibrate the model they are training, maybe on a GPU
    model.zero_grad(set_to_none=True)
    model.eval()  # gradients of the deployed function: BN statistics stay as trained
    for xb, yb in data.batches("train", batch_size=batch_size, limit=batches):
        xb, yb = xb.to(device), yb.to(device)
        if not per_sample:
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            continue
        for x1, y1 in zip(xb.split(1), yb.split(1)):  # batch 1: cheaper than retaining the batch's graph
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x1), y1).backward()
            criterion.accumulate_grad(model)


@torch.no_grad()
def activation_stats(model: nn.Module, data: LoadedData, *, batches: int, batch_size: int) -> dict[nn.Module, torch.Tensor]:
    """Mean absolute input activation per channel of every convolution and linear layer."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple, _output: object) -> None:
        x = inputs[0].detach().abs()
        if isinstance(module, nn.Linear):
            x = x.reshape(-1, x.shape[-1])
            value, n = x.sum(0), x.shape[0]
        else:  # channels on dim 1
            value, n = x.transpose(0, 1).reshape(x.shape[1], -1).sum(1), x.numel() // x.shape[1]
        sums[module] = sums.get(module, 0) + value
        counts[module] = counts.get(module, 0) + n

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    device = next(model.parameters()).device
    try:
        model.eval()
        for xb, _ in data.batches("train", batch_size=batch_size, limit=batches):
            model(xb.to(device))
    finally:
        for h in handles:
            h.remove()
    return {m: sums[m] / counts[m] for m in sums}


def prepare_criterion(criterion: criteria.Criterion, model: nn.Module, data: LoadedData, *, batches: int,
                      batch_size: int) -> None:
    """Feed ``criterion`` what it declares it needs: gradients and/or activation statistics."""
    if criteria.needs_gradients(criterion):
        calibrate(model, data, batches=batches, batch_size=batch_size, criterion=criterion)
    if criteria.needs_activations(criterion):
        criterion.set_activations(activation_stats(model, data, batches=batches, batch_size=batch_size))
