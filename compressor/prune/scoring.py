"""Scoring: every group's units ranked by a criterion, and the measured MACs one unit of each group costs."""

from __future__ import annotations

import math

import torch

from .. import flops
from ..criteria import ChannelCosts, Criterion, needs_channel_costs
from ..errors import GraphError, one_line
from ..graph import CouplingGraph
from .apply import pruned_copy
from .plan import PruningPlan

def score_groups(graph: CouplingGraph, criterion: Criterion, *, costs: list[float] | None = None) -> list[torch.Tensor]:
    """Per-unit scores of every group (higher = keep): the mean of the unit's channel scores, over
    blocks where channels come in blocks and over a head's channels where a unit is a whole head.

    ``costs`` (from :func:`channel_costs`) saves measuring them again for a criterion that needs them.
    """
    if needs_channel_costs(criterion):
        criterion.set_channel_costs(ChannelCosts.of_graph(graph, costs if costs is not None else channel_costs(graph)))
    scores = []
    for spec in graph.groups:
        group = graph.tp_group(spec)
        try:
            with torch.no_grad():
                imp = criterion(group)
        except (IndexError, RuntimeError) as exc:  # the stage boundary: an index torch-pruning mapped wrongly
            raise GraphError(f"scoring the group of {spec.root!r} failed: {one_line(exc, 160)} (torch-pruning maps "
                             f"its channels through {', '.join(spec.layers[1:4]) or spec.root} in a way the criterion "
                             "cannot follow)", hint=f"protect {spec.root} (--protect {spec.root})") from exc
        if imp is None:
            imp = torch.full((spec.size,), float("inf"))  # the criterion abstains: never prune this group
        imp = imp.detach().float().cpu().flatten()
        if imp.numel() != spec.size:
            raise GraphError(
                f"criterion returned {imp.numel()} scores for group {spec.root!r} of {spec.size} channels"
            )
        if spec.unit_channels > 1:
            imp = imp.view(spec.ch_groups, spec.units, spec.unit_width).mean((0, 2))
        # NaN ranks first (no information), +inf never (an abstaining criterion protects the group).
        scores.append(torch.nan_to_num(imp, nan=0.0, posinf=math.inf, neginf=-math.inf))
    return scores


def channel_costs(graph: CouplingGraph) -> list[float]:
    """Per group, in order: the fraction of the model's MACs that removing one unit of it saves.

    Measured, not modelled: each group gets one probe (a pruned copy without its unit 0, counted
    like the search's probes), so residual streams, flattens and heads count whatever they couple.
    One probe per group is fine for now; it is the thing to speed up if it shows. A group of a single unit is never pruned (its
    last unit stays) and costs 0.
    """
    base = flops.measure(graph.model, graph.example_input).macs
    costs = []
    for spec in graph.groups:
        if spec.units < 2:
            costs.append(0.0)
            continue
        pruned = flops.measure(pruned_copy(graph, PruningPlan({spec.index: (0,)})), graph.example_input).macs
        costs.append((base - pruned) / base)
    return costs
