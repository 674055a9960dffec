"""FLOPs and parameter counts, measured by running the model.

"FLOPs" throughout the tool means multiply-accumulates (MACs) as torch-pruning's
``count_ops_and_params`` counts them on one example input of batch size 1. Convolutions and linear
layers dominate the count; it also adds one per activation output and two per batch-norm output,
so a ratio is what it would be on a profiler that counts those too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class Cost:
    """MACs (counted on one example) and parameter count of a model."""

    macs: int
    params: int


@torch.no_grad()
def measure(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """Count the MACs and parameters of ``model`` on ``example_input`` (batch 1)."""
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    finally:
        model.train(was_training)
    return Cost(macs=int(macs), params=int(params))


@torch.no_grad()
def per_module(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], int]:
    """MACs of every named module of ``model`` on ``example_input`` (a parent counts its children; ``""``
    is the whole model, :func:`measure`'s count), and the parameters :func:`measure` counts: one forward."""
    was_training = model.training
    model.eval()
    try:
        _, params, layer_macs, _ = tp.utils.count_ops_and_params(model, example_input[:1], layer_wise=True)
    finally:
        model.train(was_training)
    return {name: int(layer_macs.get(module, 0)) for name, module in model.named_modules()}, int(params)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
