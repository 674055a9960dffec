"""Pre-flight inspection: what the pruner sees in a model before any work is done."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import flops, pruning
from .errors import TargetUnreachableError
from .graph import trace


@dataclass(frozen=True)
class GroupInfo:
    root: str
    channels: int
    units: int
    layers: int


@dataclass(frozen=True)
class Inspection:
    """The coupling graph summarised for people: groups, protection, and how far pruning can go."""

    macs: int
    params: int
    groups: list[GroupInfo]
    protected: dict[str, str]
    attention: list[str]
    frozen: list[str]
    """Parameters with ``requires_grad=False``: pruned like the rest, but not fine-tuned."""
    unwrapped: list[str] = field(default_factory=list)
    """Parameters held directly by a module torch-pruning has no pruner for (class tokens, position embeddings)."""
    min_reachable_ratio: float | None = None


def inspect_model(model: nn.Module, example_input: torch.Tensor, *, max_prune_fraction: float = 0.75) -> Inspection:
    """Trace ``model`` and report its groups and the smallest FLOPs ratio the search can reach."""
    graph = trace(model, example_input)
    cost = flops.measure(model, example_input)
    names = {p: n for n, p in model.named_parameters()}
    unwrapped = sorted(names[u.parameters] for u in graph.dg.unwrapped_parameters if u.parameters in names)
    floor = None
    if graph.groups:
        scores = [torch.ones(spec.units) for spec in graph.groups]  # the floor depends on the caps, not the scores
        try:
            floor = pruning.floor_ratio(graph, scores, max_prune_fraction=max_prune_fraction)
        except TargetUnreachableError:
            floor = None
    return Inspection(
        macs=cost.macs, params=cost.params,
        groups=[GroupInfo(s.root, s.size, s.units, len(s.layers)) for s in graph.groups],
        protected=dict(graph.protected), attention=list(graph.attention),
        frozen=sorted(n for n, p in model.named_parameters() if not p.requires_grad),
        unwrapped=unwrapped, min_reachable_ratio=floor,
    )
