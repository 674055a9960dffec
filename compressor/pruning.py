"""Prune to a FLOPs target: rank every channel with a criterion, then search the global threshold
on FLOPs measured on pruned copies of the model.

The ranking is global (all groups' units on one scale) with a per-group cap, so no layer is
stripped to a sliver. The search is a bisection over "how many of the lowest-ranked units to
remove", each probe pruning a fresh copy and counting its MACs, followed by a short refinement
so the achieved ratio lands within 1% below the target.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import flops
from .criteria import Criterion
from .errors import GraphError, TargetUnreachableError
from .graph import CouplingGraph, GroupSpec, patch_attention, trace

TOLERANCE = 0.01
"""The achieved FLOPs ratio must lie in [target * (1 - TOLERANCE), target]."""
_MAX_REFINE_PROBES = 24


@dataclass(frozen=True)
class PruningPlan:
    """Which units of which group to remove (group index -> sorted unit indices)."""

    removed: dict[int, tuple[int, ...]]

    @classmethod
    def from_units(cls, units: list[tuple[int, int]]) -> PruningPlan:
        removed: dict[int, list[int]] = {}
        for g, u in units:
            removed.setdefault(g, []).append(u)
        return cls({g: tuple(sorted(us)) for g, us in removed.items()})


@dataclass(frozen=True)
class LayerChange:
    group: str
    """The group's root module."""
    before: int
    after: int


@dataclass(frozen=True)
class PruneResult:
    """What the search found and what it cost."""

    original: flops.Cost
    pruned: flops.Cost
    target_ratio: float
    achieved_ratio: float
    min_reachable_ratio: float
    probes: int
    seconds: float
    plan: PruningPlan
    layers: list[LayerChange] = field(default_factory=list)


def score_groups(graph: CouplingGraph, criterion: Criterion) -> list[torch.Tensor]:
    """Per-unit scores of every group (higher = keep), blocks averaged where channels come in blocks."""
    scores = []
    for spec in graph.groups:
        with torch.no_grad():
            imp = criterion(graph.tp_group(spec))
        if imp is None:
            imp = torch.full((spec.size,), float("inf"))  # the criterion abstains: never prune this group
        imp = imp.detach().float().cpu().flatten()
        if imp.numel() != spec.size:
            raise GraphError(
                f"criterion returned {imp.numel()} scores for group {spec.root!r} of {spec.size} channels"
            )
        if spec.ch_groups > 1:
            imp = imp.view(spec.ch_groups, -1).mean(0)
        scores.append(torch.nan_to_num(imp, nan=0.0))
    return scores


def apply_plan(graph: CouplingGraph, plan: PruningPlan) -> None:
    """Remove the plan's channels from ``graph.model`` in place."""
    for g, units in plan.removed.items():
        spec = graph.groups[g]
        if not units:
            continue
        group = graph.tp_group(spec, spec.expand(units))
        if not graph.dg.check_pruning_group(group):
            raise GraphError(f"torch-pruning refused to prune group {spec.root!r} ({len(units)} units)")
        group.prune()
    patch_attention(graph.model)


def pruned_copy(graph: CouplingGraph, plan: PruningPlan) -> nn.Module:
    """A pruned deep copy of ``graph.model``; the original is untouched."""
    model = copy.deepcopy(graph.model)
    copy_graph = trace(model, graph.example_input, protect=tuple(graph.protected))
    if [(s.root, s.handler, s.size) for s in copy_graph.groups] != [(s.root, s.handler, s.size) for s in graph.groups]:
        raise GraphError("tracing a copy of the model gave different groups; the model's forward is not deterministic")
    apply_plan(copy_graph, plan)
    return model


def _eligible_units(groups: list[GroupSpec], scores: list[torch.Tensor], max_fraction: float) -> list[tuple[int, int]]:
    """Units in the order they are removed: ascending score, at most ``max_fraction`` of a group and
    never its last unit."""
    candidates: list[tuple[float, int, int]] = []
    for spec, s in zip(groups, scores):
        cap = min(int(math.floor(spec.units * max_fraction)), spec.units - 1)
        order = torch.argsort(s, stable=True)[:cap]
        candidates += [(float(s[u]), spec.index, int(u)) for u in order if math.isfinite(float(s[u]))]
    candidates.sort(key=lambda t: t[0])
    return [(g, u) for _, g, u in candidates]


def search(
    graph: CouplingGraph,
    scores: list[torch.Tensor],
    *,
    target_ratio: float,
    max_prune_fraction: float,
    on_probe: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, PruneResult]:
    """Prune a copy of ``graph.model`` to ``target_ratio`` of its MACs; return it with the result."""
    start = time.perf_counter()
    original = flops.measure(graph.model, graph.example_input)
    order = _eligible_units(graph.groups, scores, max_prune_fraction)
    probes = 0
    cache: dict[tuple, tuple[nn.Module, flops.Cost]] = {}

    def probe(units: list[tuple[int, int]]) -> tuple[nn.Module, float]:
        nonlocal probes
        key = tuple(sorted(units))
        if key not in cache:
            probes += 1
            model = pruned_copy(graph, PruningPlan.from_units(units))
            cache.clear()  # keep one pruned copy in memory at a time
            cache[key] = (model, flops.measure(model, graph.example_input))
        model, cost = cache[key]
        ratio = cost.macs / original.macs
        if on_probe:
            on_probe(probes, ratio)
        return model, ratio

    if not order:
        raise TargetUnreachableError("nothing in the model can be pruned (every group is protected or capped)")
    _, floor_ratio = probe(order)
    if floor_ratio > target_ratio:
        raise TargetUnreachableError(
            f"--target-flops {target_ratio:g} is unreachable: the smallest reachable ratio is {floor_ratio:.3f} "
            f"(at most {max_prune_fraction:.0%} of each group's channels can be removed)",
            hint=f"ask for {math.ceil(floor_ratio * 1000) / 1000:g} or more, or raise --max-prune-per-group",
        )

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
        # The last unit was a big one. Keep it, and remove the next-ranked smaller units instead.
        base = order[:lo]
        for extra in order[hi : hi + _MAX_REFINE_PROBES]:
            m, r = probe(base + [extra])
            if r <= target_ratio:
                if r >= lower:
                    chosen, model, ratio = base + [extra], m, r
                    break
            else:
                base = base + [extra]
        else:
            model, ratio = probe(chosen)

    plan = PruningPlan.from_units(chosen)
    pruned_cost = flops.measure(model, graph.example_input)
    layers = [
        LayerChange(spec.root, spec.size, spec.size - len(plan.removed.get(spec.index, ())) * spec.ch_groups)
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
    )
    return model, result
