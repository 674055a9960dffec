"""The search: the global threshold over the ranked removal steps that lands the measured FLOPs ratio
within :data:`TOLERANCE` below the target, each probe pruning a copy of the graph and counting its MACs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import flops
from ..errors import GraphError, TargetUnreachableError, one_line
from ..graph import CouplingGraph, regroup
from .apply import probe_copy, pruned_graph, pruned_twin
from .plan import Chunk, LayerChange, PruneResult, _chunks, _plan, head_changes, min_units, unit_round_to
from .screen import BROKEN_PRUNE, Floor, held_back, screen_groups, unreachable

TOLERANCE = 0.01
"""The achieved FLOPs ratio must lie in [target * (1 - TOLERANCE), target]."""
_MAX_REFINE_PROBES = 40


def _fill(base, scores, groups, probe, *, lower, target, max_fraction, original_units):
    """Meet a target that falls between two steps of the ranking with single units, off the rounding
    multiple: bisect over one group's next-ranked units; where one group cannot remove enough on its
    own (groups near their cap, after earlier prunes), take it to its cap and go on with the next.
    Returns (plan chunks, model, ratio, groups given an off-multiple width) or None."""
    removed: dict[int, set[int]] = {}
    for g, units in base:
        removed.setdefault(g, set()).update(units)
    touched: list[int] = []
    for spec in sorted(groups, key=lambda s: -s.units):
        s = scores[spec.index]
        taken = removed.get(spec.index, set())
        room = spec.units - min_units(spec, max_fraction=max_fraction, round_to=1,
                                      original_units=original_units.get(spec.root)) - len(taken)
        free = [int(u) for u in torch.argsort(s, stable=True) if int(u) not in taken and math.isfinite(float(s[u]))]
        free = free[: max(room, 0)]
        if not free:
            continue
        model, r = probe(base + [(spec.index, tuple(free))])
        if r > target:
            base, touched = base + [(spec.index, tuple(free))], touched + [spec.index]
            continue
        lo, hi = 0, len(free)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(base + [(spec.index, tuple(free[:mid]))])[1] <= target:
                hi = mid
            else:
                lo = mid
        step = base + [(spec.index, tuple(free[:hi]))]
        model, r = probe(step)
        if lower <= r <= target:
            return step, model, r, touched + [spec.index]
    return None


def search(
    graph: CouplingGraph,
    scores: list[torch.Tensor],
    *,
    target_ratio: float,
    max_prune_fraction: float,
    round_to: int = 1,
    on_probe: Callable[[int, float], None] | None = None,
    original_units: dict[str, int] | None = None,
    with_graph: bool = False,
    known_floor: Floor | None = None,
) -> tuple[Any, PruneResult]:
    """Prune a copy of ``graph.model`` to ``target_ratio`` of its MACs; return it with the result.

    ``original_units`` (group root -> units before any pruning) makes the per-group cap count from
    the original widths when ``graph.model`` has been pruned before. ``with_graph``: return the pruned
    copy's :class:`CouplingGraph` (its groups listed anew, not traced) instead of the bare model.
    ``known_floor``: :func:`floor` of this graph at this cap and rounding, where the run computed it
    already (the search then skips its own first probe).
    """
    start = time.perf_counter()
    original = flops.measure(graph.model, graph.example_input)
    order = _chunks(graph.groups, scores, max_fraction=max_prune_fraction, round_to=round_to,
                    original_units=original_units)
    probes = 0
    off_multiple: list[str] = []
    cache: dict[tuple, tuple[nn.Module, flops.Cost, CouplingGraph | None]] = {}

    closest: list = [None, -1.0]  # the plan closest below the target seen so far, and its ratio

    tried: list = [[]]  # the chunks of the latest probe
    fast = [True]
    """Probes prune a bare copy of the model (:func:`probe_copy`); off once that differs from the graph's prune."""

    def probe(chunks: list[Chunk]) -> tuple[nn.Module, float]:
        nonlocal probes
        tried[0] = list(chunks)
        key = tuple(sorted(chunks))
        if key not in cache:
            probes += 1
            twin = None if fast[0] else pruned_twin(graph, _plan(chunks))
            model = probe_copy(graph, _plan(chunks)) if twin is None else twin.model
            cache.clear()  # keep one pruned copy in memory at a time
            cache[key] = (model, flops.measure(model, graph.example_input), twin)
        model, cost, _ = cache[key]
        ratio = cost.macs / original.macs
        if ratio <= target_ratio and ratio > closest[1]:
            closest[:] = [list(chunks), ratio]
        if on_probe:
            on_probe(probes, ratio)
        return model, ratio

    if not order:
        raise TargetUnreachableError("nothing in the model can be pruned (every group is protected or capped)")
    unsafe: dict[int, str] = {}
    if known_floor is not None and (known_floor.round_to, known_floor.max_prune_fraction) == (round_to, max_prune_fraction):
        unsafe = dict(known_floor.unsafe)
        order = [c for c in order if c[0] not in unsafe]
        floor_ratio = known_floor.ratio
        if not order:
            raise TargetUnreachableError("nothing in the model can be pruned without breaking it")
    else:
        try:
            _, floor_ratio = probe(order)  # counting the MACs runs the forward
        except BROKEN_PRUNE:  # some group breaks the model: find it and go on without it
            unsafe = screen_groups(graph, order)
            order = [c for c in order if c[0] not in unsafe]
            if not order:
                raise TargetUnreachableError("nothing in the model can be pruned without breaking it: "
                                             + "; ".join(f"{graph.groups[g].root}: {why}" for g, why in unsafe.items())) from None
            _, floor_ratio = probe(order)
    if floor_ratio > target_ratio:
        raise unreachable(target_ratio, floor_ratio, max_prune_fraction=max_prune_fraction,
                          held=held_back(graph, {graph.groups[g].root: why for g, why in unsafe.items()}))

    def settle(order: list[Chunk]) -> tuple[list[Chunk], nn.Module, float, list[str]]:
        off_multiple: list[str] = []
        lo, hi = 0, len(order)  # ratio(lo) > target >= ratio(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            _, r = probe(order[:mid])
            if r <= target_ratio:
                hi = mid
            else:
                lo = mid
        chosen = order[:hi]
        model, ratio = probe(chosen)
        lower = target_ratio * (1 - TOLERANCE)
        if ratio < lower:
            # The last step was a big one. Keep it, and take later, smaller steps instead; a group whose
            # step was skipped takes no later steps (they would keep a worse channel than they remove).
            base, skipped = order[:lo], set()
            for extra in order[hi : hi + _MAX_REFINE_PROBES]:
                if extra[0] in skipped:
                    continue
                m, r = probe(base + [extra])
                if lower <= r <= target_ratio:
                    chosen, model, ratio = base + [extra], m, r
                    break
                if r > target_ratio:
                    base = base + [extra]
                else:
                    skipped.add(extra[0])
            else:
                found = _fill(base, scores, graph.groups, probe, lower=lower, target=target_ratio,
                              max_fraction=max_prune_fraction, original_units=original_units or {})
                if found is not None:
                    chosen, model, ratio, touched = found
                    off_multiple = [graph.groups[g].root for g in touched
                                    if unit_round_to(graph.groups[g], round_to) > 1]
                else:
                    # No plan lands in the window (single units of the groups left are too coarse, as after
                    # earlier prunes): the closest one below the target that any probe found.
                    chosen = closest[0] if closest[0] is not None else chosen
                    model, ratio = probe(chosen)

        return chosen, model, ratio, off_multiple

    for attempt in range(len(graph.groups) + 1):
        try:
            if attempt:  # groups were left out: the floor without them
                _, floor_ratio = probe(order)
                if floor_ratio > target_ratio:
                    raise unreachable(target_ratio, floor_ratio, max_prune_fraction=max_prune_fraction,
                                      held=held_back(graph, {graph.groups[g].root: why for g, why in unsafe.items()}))
            chosen, model, ratio, off_multiple = settle(order)
            if fast[0]:
                # The plan chosen, pruned by the graph as the run will prune it: the same MACs, or the
                # search runs again on probes pruned that way.
                tried[0] = list(chosen)
                twin = pruned_twin(graph, _plan(chosen))
                cost = flops.measure(twin.model, graph.example_input)
                if cost.macs != cache[tuple(sorted(chosen))][1].macs:
                    fast[0] = False
                    cache.clear()
                    closest[:] = [None, -1.0]
                    chosen, model, ratio, off_multiple = settle(order)
                else:
                    model = twin.model
                    cache.clear()
                    cache[tuple(sorted(chosen))] = (model, cost, twin)
            break
        except BROKEN_PRUNE as exc:
            # A combination of widths the first probe did not try breaks the model (a head count or a
            # reshape's constant that only some widths fit): find the groups of the failing plan that
            # break it, leave them unpruned, and search again.
            found = screen_groups(graph, tried[0])
            if not found:  # the same plan does not fail twice: the model's forward is not deterministic
                raise GraphError(f"pruning broke the model once and not again ({one_line(exc, 160)})",
                                 hint="make the model's forward deterministic in eval mode") from exc
            unsafe.update(found)
            order = [c for c in order if c[0] not in unsafe]
            if not order:
                raise TargetUnreachableError("nothing in the model can be pruned without breaking it: "
                                             + "; ".join(f"{graph.groups[g].root}: {why}" for g, why in unsafe.items())) from None
    else:
        raise GraphError("pruning keeps breaking the model: " + ", ".join(graph.groups[g].root for g in unsafe),
                         hint="protect the layers named (--protect)")

    plan = _plan(chosen)
    pruned_cost = flops.measure(model, graph.example_input)
    layers = [
        LayerChange(spec.root, spec.size, spec.size - len(plan.removed.get(spec.index, ())) * spec.unit_channels)
        for spec in graph.groups
    ]
    result = PruneResult(
        original=original,
        pruned=pruned_cost,
        target_ratio=target_ratio,
        achieved_ratio=pruned_cost.macs / original.macs,
        min_reachable_ratio=floor_ratio,
        probes=probes,
        seconds=time.perf_counter() - start,
        plan=plan,
        layers=layers,
        round_to=round_to,
        off_multiple=off_multiple,
        unsafe={graph.groups[g].root: why for g, why in unsafe.items()},
        attention_pruning=graph.attention_pruning,
        heads=head_changes(graph.model, model),
    )
    if with_graph:
        cached = cache.get(tuple(sorted(chosen)))
        twin = cached[2] if cached is not None and cached[0] is model else pruned_graph(graph, plan)
        return regroup(twin), result
    return model, result
