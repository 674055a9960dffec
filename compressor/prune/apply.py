"""Applying a plan: pruning a coupling graph's model in place, and pruned copies of a graph (one deep
copy, not a new trace, except where the graph is too deep to copy)."""

from __future__ import annotations

import copy
import sys
import weakref
from dataclasses import dataclass

from torch import nn

from ..errors import GraphError
from ..attention import drop_heads, patch_attention
from ..graph import CouplingGraph, regroup, trace
from .plan import PruningPlan

def apply_plan(graph: CouplingGraph, plan: PruningPlan) -> None:
    """Remove the plan's channels from ``graph.model`` in place."""
    _REMOVALS.pop(graph.dg, None)  # its model changes: what it maps to no longer holds
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


def pruned_twin(graph: CouplingGraph, plan: PruningPlan) -> CouplingGraph:
    """A copy of ``graph`` pruned by ``plan`` (its groups those of ``graph``, not listed anew; traced
    afresh where the graph is too deep to copy); the original is untouched."""
    try:
        twin = copy_graph(graph)
    except RecursionError:
        return _pruned_graph_by_tracing(graph, plan)
    apply_plan(twin, plan)
    return twin


def pruned_copy(graph: CouplingGraph, plan: PruningPlan) -> nn.Module:
    """A pruned deep copy of ``graph.model`` (see :func:`pruned_graph`); the original is untouched."""
    return pruned_twin(graph, plan).model


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


# -- a probe's pruned copy, without walking the graph ------------------------------------------------------


@dataclass(frozen=True)
class _Removal:
    """What removing one root channel of a group does to one layer (or parameter) of the model."""

    target: str
    """Module name, or the parameter's name (``param``)."""
    param: bool
    fn: object
    """torch-pruning's pruning function (a bound method of its pruner)."""
    dim: int | None
    """The pruner's ``pruning_dim`` for this target."""
    idx: int


_REMOVALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Dependency graph -> group index -> root channel -> the removals it brings, in the unpruned model's
indices (one walk of torch-pruning's graph per group, made once)."""


def _removals(graph: CouplingGraph, g: int) -> dict[int, list[_Removal]] | None:
    """The group's table (see :data:`_REMOVALS`), or None where some channel's root is unknown."""
    per_group = _REMOVALS.setdefault(graph.dg, {})
    if g not in per_group:
        spec = graph.groups[g]
        names = graph.dg._module2name
        params = graph.dg._param_to_name
        by_root: dict[int, list[_Removal]] = {}
        for item in graph.tp_group(spec):
            target = item.dep.target
            if isinstance(target.module, nn.Parameter):
                key, param = params.get(target.module), True
            else:
                key, param = names.get(target.module), False
            if key is None:  # an op node (add, concat, split, reshape): nothing of the model's to cut
                continue
            roots = item.root_idxs or ()
            if len(roots) != len(item.idxs) or any(r is None for r in roots):
                by_root = None  # a channel torch-pruning cannot trace back to the root: walk per probe
                break
            for idx, root in zip(item.idxs, roots):
                by_root.setdefault(int(root), []).append(_Removal(key, param, item.dep.handler, target.pruning_dim, int(idx)))
        per_group[g] = by_root
    return per_group[g]


def probe_copy(graph: CouplingGraph, plan: PruningPlan) -> nn.Module:
    """A copy of ``graph.model`` pruned by ``plan`` as :func:`pruned_copy` prunes it, without copying the
    graph or walking it per probe: each group's walk (made once, on the unpruned graph) says which
    channels of which layers a root channel takes with it, and every layer is cut once, by the union
    of what the plan's groups take from it, in the unpruned model's indices. What torch-pruning does
    step by step (each group's walk on the graph the previous groups left) comes to the same cut; the
    search checks that on the plan it chooses (:func:`pruned_graph` then prunes by the graph). A plan
    with a group some of whose channels torch-pruning cannot trace back to its root is pruned by the
    graph (:func:`pruned_copy`).
    """
    tables = {g: _removals(graph, g) for g in plan.removed}
    if any(table is None for table in tables.values()):
        return pruned_copy(graph, plan)
    cuts: dict[tuple[str, bool, object, int | None], set[int]] = {}
    for g, units in plan.removed.items():
        table = tables[g]
        for channel in graph.groups[g].expand(units):
            for r in table.get(channel, ()):
                cuts.setdefault((r.target, r.param, r.fn, r.dim), set()).add(r.idx)
    dg = graph.dg
    for (target, param, fn, _), idxs in cuts.items():
        if param:
            continue
        module = graph.model.get_submodule(target)
        width = dg.get_out_channels(module) if dg.is_out_channel_pruning_fn(fn) else dg.get_in_channels(module)
        if width is not None and width <= len(idxs):
            raise GraphError(f"torch-pruning refused to prune {target!r}: the plan removes all of its channels")
    model = copy.deepcopy(graph.model)
    for g, units in plan.removed.items():
        drop_heads(model, graph.groups[g].heads_of, len(units))
    for (target, param, fn, dim), idxs in cuts.items():
        pruner = fn.__self__
        pruner.pruning_dim = dim
        if param:
            owner, _, attr = target.rpartition(".")
            parent = model.get_submodule(owner)
            setattr(parent, attr, fn(getattr(parent, attr), sorted(idxs)))
        else:
            fn(model.get_submodule(target), sorted(idxs))
    patch_attention(model)
    return model
