"""FLOPs and parameter counts, measured by running the model.

"FLOPs" throughout the tool means multiply-accumulates (MACs) as torch-pruning's
``count_ops_and_params`` counts them on one example input of batch size 1. Convolutions and linear
layers dominate the count; it also adds one per activation output and two per batch-norm output,
so a ratio is what it would be on a profiler that counts those too.
"""

from __future__ import annotations

import copy
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
    """Count the MACs and parameters of ``model`` on ``example_input`` (batch 1).

    The count needs shapes only, so it runs on a weightless copy on the ``meta`` device (:func:`_on_meta`):
    a ResNet-50 at 224 px is counted in a fifth of the time, which the search's probes add up. A model
    whose forward needs real values (``.item()``, a plain tensor attribute) is counted as it is.
    """
    was_training = model.training
    model.eval()
    try:
        try:
            macs, params = tp.utils.count_ops_and_params(_on_meta(model), example_input[:1].to("meta"))
        except Exception:  # the forward needs real values: count on the model itself
            macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    finally:
        model.train(was_training)
    return Cost(macs=int(macs), params=int(params))


def _on_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the ``meta`` device (shapes, no data):
    the copy's memo maps each tensor to its meta twin, so no weight is copied."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
