"""The safety net and the floor: which groups break the model when pruned (torch-pruning cannot foresee
every shape a forward depends on), and the smallest FLOPs ratio the search can reach without them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import flops
from ..config import DEFAULT_CAP
from ..errors import GraphError, TargetUnreachableError, one_line
from ..graph import CouplingGraph
from ..tp_compat import UnmappedReshape
from .apply import probe_copy, pruned_copy
from .plan import Chunk, _chunks, _plan

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


def _breaks(graph: CouplingGraph, chunks: list[Chunk]) -> str | None:
    """Why pruning ``chunks`` from a copy breaks the model (pruning or the forward fails), or None."""
    try:
        model = probe_copy(graph, _plan(chunks))
        with torch.no_grad():
            model(graph.example_input)
    except BROKEN_PRUNE as exc:
        return one_line(exc, 160)
    return None


def screen_groups(graph: CouplingGraph, order: list[Chunk]) -> dict[int, str]:
    """The groups whose pruning breaks the model (index or shape errors torch-pruning does not
    foresee: head counts, shape constants in a reshape), group index -> why.

    Called once every group pruned to its cap failed: each group is tried alone, one probe each; where
    the rest still breaks the model together, a bisection over them finds the group that completes the
    break, which is left out too (named with the groups it breaks the model with), until the rest is fine.
    """
    unsafe = {}
    for g in sorted({g for g, _ in order}):
        why = _breaks(graph, [c for c in order if c[0] == g])
        if why is not None:
            unsafe[g] = why
    safe = sorted({g for g, _ in order} - set(unsafe))
    for _ in range(len(safe)):
        rest = [c for c in order if c[0] in safe]
        why = _breaks(graph, rest)
        if why is None:
            return unsafe
        # The smallest prefix of the groups that breaks the model: its last group breaks it together
        # with the ones before it; leave that one unpruned and look again.
        lo, hi = 1, len(safe)  # safe[:lo] alone is fine (each group is), safe[:hi] breaks
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _breaks(graph, [c for c in order if c[0] in safe[:mid]]) is None:
                lo = mid
            else:
                hi = mid
        culprit = safe[hi - 1]
        partners = ", ".join(graph.groups[g].root for g in safe[: hi - 1][-3:])
        unsafe[culprit] = f"breaks the model when pruned together with {partners} ({why})"
        safe.remove(culprit)
    if safe and _breaks(graph, [c for c in order if c[0] in safe]) is not None:
        raise GraphError("pruning breaks the model although each group alone does not: "
                         + ", ".join(graph.groups[g].root for g in safe),
                         hint="protect the layers named (--protect): they interact through a shape the pruner "
                              "cannot see")
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


def held_back(graph: CouplingGraph, unsafe_by_root: dict[str, str]) -> dict[str, str]:
    """The layers a floor leaves unpruned and why: the protected ones (but the classifier, which no
    one can prune) and the groups whose pruning breaks the model."""
    held = {name: why for name, why in graph.protected.items() if not why.startswith("classifier")}
    return held | unsafe_by_root


def unreachable(target: float, floor: float, *, max_prune_fraction: float,
                held: dict[str, str] | None = None) -> TargetUnreachableError:
    """The error of a FLOPs target below the smallest reachable ratio (the one builder of it), naming
    up to three of the ``held`` layers (name -> why it stays unpruned) that keep the floor up."""
    named = ""
    if held:
        shown = [f"{name} ({why})" for name, why in list(held.items())[:3]]
        more = f"; and {len(held) - 3} more" if len(held) > 3 else ""
        named = f"; left unpruned: {'; '.join(shown)}{more}"
    return TargetUnreachableError(
        f"--target-flops {target:g} is unreachable: the smallest reachable ratio is {floor:.3f} "
        f"(at most {max_prune_fraction:.0%} of each group's channels can be removed){named}",
        hint=f"ask for {math.ceil(floor * 1000) / 1000:g} or more, or raise --max-prune-per-group"
             + (", or protect fewer layers" if held else ""))


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


AUTO_CAPS = (DEFAULT_CAP, 0.8, 0.85, 0.9)
"""Without ``--max-prune-per-group`` the cap is :data:`DEFAULT_CAP`, raised along these steps only as far
as the FLOPs target needs (a model with groups that cannot be pruned at all otherwise stops short of it);
a cap given is kept as given."""


def caps_for(max_prune_fraction: float | None) -> tuple[float, ...]:
    """The caps to try in turn: the one given, or :data:`AUTO_CAPS`."""
    return AUTO_CAPS if max_prune_fraction is None else (max_prune_fraction,)


def capped_floor(graph: CouplingGraph, target: float | None, *, caps: tuple[float, ...], round_to: int = 1,
                 scores: list[torch.Tensor] | None = None) -> Floor:
    """The :func:`floor` at the first of ``caps`` that reaches ``target`` (the last one's where none does;
    the first one's without a target)."""
    for cap in caps:
        at = floor(graph, max_prune_fraction=cap, round_to=round_to, scores=scores)
        if target is None or at.ratio <= target:
            break
    return at


def floor_ratio(graph: CouplingGraph, scores: list[torch.Tensor], *, max_prune_fraction: float,
                round_to: int = 1) -> float:
    """The smallest MACs ratio the search can reach (:func:`floor`)."""
    return floor(graph, max_prune_fraction=max_prune_fraction, round_to=round_to, scores=scores).ratio
