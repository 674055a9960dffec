"""What a prune removes: the plan types, the per-group floor of units a cap leaves, and the removal
steps in the order the search takes them (ascending score, in chunks of the rounding multiple)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import flops
from ..attention import attention_heads
from ..graph import GroupSpec

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


def median_unit(ascending: Sequence[float]) -> float:
    """A chunk's rank: the score of its median unit (the upper one of an even chunk), scores ascending."""
    return ascending[len(ascending) // 2]


def _chunks(groups: list[GroupSpec], scores: list[torch.Tensor], *, max_fraction: float, round_to: int,
            original_units: dict[str, int] | None = None,
            rank: Callable[[Sequence[float]], float] = median_unit) -> list[Chunk]:
    """Removal steps in the order they are taken, ascending score.

    Within a group units go lowest score first. With ``round_to`` > 1 they go in chunks, so every
    kept width (units per block) is a multiple of ``round_to``. A chunk ranks by ``rank`` of its units'
    scores (ascending), by default its median unit (:func:`median_unit`), so it is removed once most of
    its units fall below the threshold: each group's width is the unrounded search's width rounded to
    the nearest multiple. (Ranking by
    the chunk's best unit rounded every width up, so small groups, whose one chunk is half their
    width, were never cut and the large ones gave twice as much: BENCHMARKS.md, "Rounding to the
    nearest multiple".) At most ``max_fraction`` of a group is removed and never its last chunk.
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
            ranked.append((rank([float(s[u]) for u in chunk]), spec.index, tuple(chunk)))
            removed = n - width
    ranked.sort(key=lambda t: t[0])
    return [(g, units) for _, g, units in ranked]


def _plan(chunks: list[Chunk]) -> PruningPlan:
    return PruningPlan.from_units([(g, u) for g, units in chunks for u in units])
