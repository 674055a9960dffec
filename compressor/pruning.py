"""Prune to a FLOPs target: rank every channel with a criterion, then search the global threshold
on FLOPs measured on pruned copies of the model.

The ranking is global (all groups' units on one scale) with a per-group cap, so no layer is
stripped to a sliver, and optional rounding of kept widths to hardware-friendly multiples. The
search is a bisection over "how many of the lowest-ranked removal steps to take", each probe
pruning a fresh copy and counting its MACs, followed by a short refinement so the achieved ratio
lands within 1% below the target.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import flops
from .criteria import ChannelCosts, Criterion, needs_channel_costs
from .errors import GraphError, TargetUnreachableError, one_line
from .graph import CouplingGraph, GroupSpec, attention_heads, drop_heads, patch_attention, regroup, trace
from .tp_compat import UnmappedReshape

TOLERANCE = 0.01
"""The achieved FLOPs ratio must lie in [target * (1 - TOLERANCE), target]."""
_MAX_REFINE_PROBES = 40

BROKEN_PRUNE: tuple[type[BaseException], ...] = (
    GraphError,  # torch-pruning refused the group (check_pruning_group), or a head count would reach 0
    UnmappedReshape,  # the group's channels cross a reshape torch-pruning cannot map
    RuntimeError,  # the pruned forward: shape mismatches, a width in a view/reshape/split/layer_norm
    IndexError,  # torch-pruning's index mappings, or the forward indexing a channel that is gone
    ValueError,  # torch-pruning's pruners and shape checks
    ArithmeticError,  # torch-pruning's index mappings dividing by a width that became 0
    AssertionError,  # shape asserts in a model's forward (timm, nn.MultiheadAttention)
)
"""What pruning a group that breaks the model raises, in torch-pruning or in the pruned forward (found
on the torchvision matrix and the test models). Anything else (a TypeError, AttributeError or NameError)
is a bug, ours or a plug-in's, and propagates instead of becoming "this group breaks the model"."""


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
class HeadChange:
    """One attention module's heads before and after pruning."""

    module: str
    heads_before: int
    heads_after: int
    head_dim_before: int
    head_dim_after: int


def head_changes(original: nn.Module, pruned: nn.Module) -> list[HeadChange]:
    """Heads and head widths of every attention module of ``original``, before and after."""
    after = attention_heads(pruned)
    return [HeadChange(name, heads, after[name][0], dim, after[name][1])
            for name, (heads, dim) in attention_heads(original).items() if name in after]


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
    round_to: int = 1
    off_multiple: list[str] = field(default_factory=list)
    """Groups whose kept width is not a multiple of ``round_to``: the target could not be met otherwise."""
    unsafe: dict[str, str] = field(default_factory=dict)
    """Groups left unpruned because pruning them broke the model: root -> why."""
    attention_pruning: str = "dims"
    """What an attention group's unit was: ``"dims"`` (head dimensions) or ``"heads"`` (whole heads)."""
    heads: list[HeadChange] = field(default_factory=list)
    """Per attention module, heads and ``head_dim`` before and after."""

    @property
    def unsafe_groups(self) -> list[str]:
        """:attr:`unsafe` as the report writes it ("root: why")."""
        return [f"{root}: {why}" for root, why in self.unsafe.items()]


def score_groups(graph: CouplingGraph, criterion: Criterion, *, costs: list[float] | None = None) -> list[torch.Tensor]:
    """Per-unit scores of every group (higher = keep): the mean of the unit's channel scores, over
    blocks where channels come in blocks and over a head's channels where a unit is a whole head.

    ``costs`` (from :func:`channel_costs`) saves measuring them again for a criterion that needs them.
    """
    if needs_channel_costs(criterion):
        criterion.set_channel_costs(ChannelCosts.of_graph(graph, costs if costs is not None else channel_costs(graph)))
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


Chunk = tuple[int, tuple[int, ...]]
"""A group index and the units removed together as one step of the ranking."""


def unit_round_to(spec: GroupSpec, round_to: int) -> int:
    """The multiple a group's kept units are rounded to: ``round_to``, except for whole heads.

    A head is already a block of ``head_dim`` channels, so its group's width stays a multiple of
    ``head_dim`` whatever the head count; rounding the head count would only coarsen the search.
    """
    return 1 if spec.heads_of else round_to


def min_units(spec: GroupSpec, *, max_fraction: float, round_to: int, original_units: int | None = None) -> int:
    """The fewest units the cap lets ``spec`` keep (at least one, so an attention module keeps a head),
    rounded up to a multiple of ``round_to`` where it can be; ``original_units`` makes the cap count
    from the width before earlier prunes (gradual schedules)."""
    n = original_units or spec.units
    keep = max(1, math.ceil(n * (1 - max_fraction)))
    round_to = unit_round_to(spec, round_to)
    if round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return keep


def _chunks(groups: list[GroupSpec], scores: list[torch.Tensor], *, max_fraction: float, round_to: int,
            original_units: dict[str, int] | None = None) -> list[Chunk]:
    """Removal steps in the order they are taken, ascending score.

    Within a group units go lowest score first. With ``round_to`` > 1 they go in chunks, so every
    kept width (units per block) is a multiple of ``round_to``; a chunk ranks by its best unit, so it
    is removed only when all of its units fall below the threshold. At most ``max_fraction`` of a
    group is removed and never its last chunk.
    """
    ranked: list[tuple[float, int, tuple[int, ...]]] = []
    for spec, s in zip(groups, scores):
        order = [int(u) for u in torch.argsort(s, stable=True) if math.isfinite(float(s[u]))]
        n = spec.units
        min_keep = min_units(spec, max_fraction=max_fraction, round_to=round_to,
                             original_units=(original_units or {}).get(spec.root))
        r = unit_round_to(spec, round_to)
        if r > 1:
            widths = list(range(n - n % r if n % r else n - r, min_keep - 1, -r))
        else:
            widths = list(range(n - 1, min_keep - 1, -1))
        removed = 0
        for width in widths:
            chunk = order[removed : n - width]
            if len(chunk) != n - width - removed:  # the criterion abstained on some units
                break
            ranked.append((max(float(s[u]) for u in chunk), spec.index, tuple(chunk)))
            removed = n - width
    ranked.sort(key=lambda t: t[0])
    return [(g, units) for _, g, units in ranked]


def _plan(chunks: list[Chunk]) -> PruningPlan:
    return PruningPlan.from_units([(g, u) for g, units in chunks for u in units])


def _breaks(graph: CouplingGraph, chunks: list[Chunk]) -> str | None:
    """Why pruning ``chunks`` from a copy breaks the model (pruning or the forward fails), or None."""
    try:
        model = pruned_copy(graph, _plan(chunks))
        with torch.no_grad():
            model(graph.example_input)
    except BROKEN_PRUNE as exc:
        return one_line(exc, 160)
    return None


def screen_groups(graph: CouplingGraph, order: list[Chunk]) -> dict[int, str]:
    """The groups whose pruning breaks the model (index or shape errors torch-pruning does not
    foresee: head counts, shape constants in a reshape), group index -> why.

    Called once every group pruned to its cap failed: each group is tried alone, one probe each.
    """
    unsafe = {}
    for g in sorted({g for g, _ in order}):
        why = _breaks(graph, [c for c in order if c[0] == g])
        if why is not None:
            unsafe[g] = why
    rest = [c for c in order if c[0] not in unsafe]
    why = _breaks(graph, rest)
    if why is not None:
        raise GraphError(f"pruning breaks the model although each group alone does not ({why})",
                         hint="protect the layers involved (they interact through a shape the pruner cannot see)")
    return unsafe


def unsafe_groups(graph: CouplingGraph, *, max_prune_fraction: float, round_to: int = 1) -> dict[int, str]:
    """The groups the search would find breaking the model and leave unpruned, group index -> why.

    The search's own test: every group pruned to its cap, and only if that fails, ``screen_groups``.
    One probe for a model that is fine.
    """
    order = _chunks(graph.groups, [torch.ones(s.units) for s in graph.groups], max_fraction=max_prune_fraction,
                    round_to=round_to)
    if not order or _breaks(graph, order) is None:
        return {}
    return screen_groups(graph, order)


@dataclass(frozen=True)
class Floor:
    """The smallest MACs ratio the search can reach at a rounding and cap, and the groups left out for it."""

    ratio: float
    unsafe: dict[int, str]
    """Group index -> why pruning it breaks the model (the search leaves those unpruned)."""
    round_to: int
    max_prune_fraction: float

    def unsafe_by_root(self, graph: CouplingGraph) -> dict[str, str]:
        return {graph.groups[g].root: why for g, why in self.unsafe.items()}


def unreachable(target: float, floor: float, *, max_prune_fraction: float) -> TargetUnreachableError:
    """The error of a FLOPs target below the smallest reachable ratio (the one builder of it)."""
    return TargetUnreachableError(
        f"--target-flops {target:g} is unreachable: the smallest reachable ratio is {floor:.3f} "
        f"(at most {max_prune_fraction:.0%} of each group's channels can be removed)",
        hint=f"ask for {math.ceil(floor * 1000) / 1000:g} or more, or raise --max-prune-per-group")


def floor(graph: CouplingGraph, *, max_prune_fraction: float, round_to: int = 1,
          scores: list[torch.Tensor] | None = None) -> Floor:
    """Every group pruned to its cap, except the groups whose pruning breaks the model (found by
    :func:`screen_groups`): the smallest ratio, and those groups. The ratio depends on the caps, not
    on the scores (``scores`` only choose which channels the probe removes)."""
    scores = scores if scores is not None else [torch.ones(spec.units) for spec in graph.groups]
    order = _chunks(graph.groups, scores, max_fraction=max_prune_fraction, round_to=round_to)
    if not order:
        raise TargetUnreachableError("nothing in the model can be pruned (every group is protected or capped)")
    unsafe: dict[int, str] = {}
    try:
        pruned = pruned_copy(graph, _plan(order))
        macs = flops.measure(pruned, graph.example_input).macs
    except BROKEN_PRUNE:  # as in the search: find the groups that break the model and go on without them
        unsafe = screen_groups(graph, order)
        order = [c for c in order if c[0] not in unsafe]
        if not order:
            raise TargetUnreachableError("nothing in the model can be pruned without breaking it: "
                                         + "; ".join(f"{graph.groups[g].root}: {why}" for g, why in unsafe.items())) from None
        macs = flops.measure(pruned_copy(graph, _plan(order)), graph.example_input).macs
    return Floor(ratio=macs / flops.measure(graph.model, graph.example_input).macs, unsafe=unsafe, round_to=round_to,
                 max_prune_fraction=max_prune_fraction)


def floor_ratio(graph: CouplingGraph, scores: list[torch.Tensor], *, max_prune_fraction: float,
                round_to: int = 1) -> float:
    """The smallest MACs ratio the search can reach (:func:`floor`)."""
    return floor(graph, max_prune_fraction=max_prune_fraction, round_to=round_to, scores=scores).ratio


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

    def probe(chunks: list[Chunk]) -> tuple[nn.Module, float]:
        nonlocal probes
        key = tuple(sorted(chunks))
        if key not in cache:
            probes += 1
            try:
                twin = copy_graph(graph)
                apply_plan(twin, _plan(chunks))
            except RecursionError:
                twin = _pruned_graph_by_tracing(graph, _plan(chunks))
            cache.clear()  # keep one pruned copy in memory at a time
            cache[key] = (twin.model, flops.measure(twin.model, graph.example_input), twin)
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
        raise unreachable(target_ratio, floor_ratio, max_prune_fraction=max_prune_fraction)

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
