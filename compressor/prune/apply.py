"""Applying a plan: pruning a coupling graph's model in place, and pruned copies of a graph (one deep
copy, not a new trace, except where the graph is too deep to copy)."""

from __future__ import annotations

import copy
import sys

from torch import nn

from ..errors import GraphError
from ..attention import drop_heads, patch_attention
from ..graph import CouplingGraph, regroup, trace
from .plan import PruningPlan

def apply_plan(graph: CouplingGraph, plan: PruningPlan) -> None:
    """Remove the plan's channels from ``graph.model`` in place."""
    for g, units in plan.removed.items():
        spec = graph.groups[g]
        if not units:
            continue
        group = graph.tp_group(spec, spec.expand(units))
        drop_heads(graph.model, spec.heads_of, len(units))
        if not graph.dg.check_pruning_group(group):
            raise GraphError(f"torch-pruning refused to prune group {spec.root!r} ({len(units)} units)")
        group.prune()
    patch_attention(graph.model)


def copy_graph(graph: CouplingGraph) -> CouplingGraph:
    """A deep copy of ``graph`` with its model: one ``copy.deepcopy``, so the copied graph points at
    the copied modules and can prune them without tracing the copy.

    What torch-pruning needs to stay one object (its pruner instances, the trace's autograd nodes) is
    shared, not copied (:meth:`compressor.tp_compat.Graph.copy_memo`). Raises
    ``RecursionError`` where the graph is too deep to copy.
    """
    memo = graph.dg.copy_memo()
    # deepcopy follows the graph's node links depth-first: a deep graph needs a deep stack.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * len(graph.dg.module2node) + 1000))
    try:
        return copy.deepcopy(graph, memo)
    finally:
        sys.setrecursionlimit(limit)


def pruned_graph(graph: CouplingGraph, plan: PruningPlan) -> CouplingGraph:
    """A copy of ``graph`` (:func:`copy_graph`) pruned by ``plan``, its groups listed anew; the original
    is untouched. Tracing is most of a probe's time on large graphs (a Swin's thousands of reshapes),
    so the copy is not traced again (except where it is too deep to copy: :func:`pruned_copy_by_tracing`)."""
    try:
        twin = copy_graph(graph)
    except RecursionError:
        return _pruned_graph_by_tracing(graph, plan)
    apply_plan(twin, plan)
    return regroup(twin)


def pruned_copy(graph: CouplingGraph, plan: PruningPlan) -> nn.Module:
    """A pruned deep copy of ``graph.model`` (see :func:`pruned_graph`); the original is untouched."""
    try:
        twin = copy_graph(graph)
    except RecursionError:
        return pruned_copy_by_tracing(graph, plan)
    apply_plan(twin, plan)
    return twin.model


def pruned_copy_by_tracing(graph: CouplingGraph, plan: PruningPlan) -> nn.Module:
    """:func:`pruned_copy` by tracing the copy and pruning it as the physical prune does (slower)."""
    return _pruned_graph_by_tracing(graph, plan).model


def _pruned_graph_by_tracing(graph: CouplingGraph, plan: PruningPlan) -> CouplingGraph:
    model = copy.deepcopy(graph.model)
    traced = trace(model, graph.example_input, protect=tuple(graph.protected),
                   attention_pruning=graph.attention_pruning)
    if [(s.root, s.handler, s.size) for s in traced.groups] != [(s.root, s.handler, s.size) for s in graph.groups]:
        raise GraphError("tracing a copy of the model gave different groups; the model's forward is not deterministic")
    apply_plan(traced, plan)
    return regroup(traced)
