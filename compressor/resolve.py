"""What the run resolves from the request, once: the FLOPs ratio to prune to, the rounding, the floor.

The config stays what the user asked for; the values the run works out from it (the FLOPs ratio a
latency target resolves to, the multiple widths are rounded to, the smallest reachable ratio and the
groups left out for it) travel in one :class:`Resolved`, which the checkpoint and the ONNX metadata
record next to the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import latency, pruning
from .choose import Choice, choose_criterion, is_auto
from .config import CompressConfig
from .criteria import Criterion
from .data import LoadedData
from .graph import CouplingGraph
from .progress import Progress


@dataclass(frozen=True)
class Resolved:
    flops_ratio: float
    """The FLOPs ratio the schedule prunes to: ``--target-flops``, or what ``--target-latency`` resolved to."""
    round_to: int
    """The multiple kept widths are rounded to (``--round-to``, or the provider's default, lowered to reach the target)."""
    floor: pruning.Floor
    """The smallest reachable FLOPs ratio at ``round_to``, and the groups left unpruned for it."""
    unsafe: dict[str, str]
    """Group root -> why pruning it breaks the model (the floor's unsafe groups, by name)."""
    latency_search: latency.LatencySearchResult | None
    rounding_note: str | None
    choice: Choice | None = None
    """``--criterion auto``: the candidates tried and the one chosen (None for a named criterion)."""
    criterion: Criterion | None = field(default=None, repr=False, compare=False)
    """The criterion instance the run prunes with: the chosen one under ``auto``, else None (the loaded one)."""

    def to_dict(self) -> dict[str, Any]:
        return {"flops_ratio": self.flops_ratio, "round_to": self.round_to, "min_reachable_ratio": self.floor.ratio,
                "unsafe": dict(self.unsafe),
                "latency_ratio": self.latency_search.latency_ratio if self.latency_search else None,
                "criterion": self.choice.chosen if self.choice else None}


def resolve(graph: CouplingGraph, config: CompressConfig, *, criterion: Criterion, data: LoadedData,
            progress: Progress, device: torch.device | None = None) -> Resolved:
    """The rounding, the floor at it (one computation), then the FLOPs ratio, then (``--criterion auto``)
    the criterion; a FLOPs target below the floor fails here, before any training."""
    rounding = latency.fit_rounding(graph, config)
    if rounding.note:
        progress.note(rounding.note)
    floor = rounding.floor
    if config.target_flops is not None and floor.ratio > config.target_flops:
        raise pruning.unreachable(config.target_flops, floor.ratio, max_prune_fraction=config.max_prune_per_group,
                                  held=pruning.held_back(graph, floor.unsafe_by_root(graph)))
    flops_ratio, search = latency.resolve_target(graph, config, criterion=criterion, data=data,
                                                 round_to=rounding.round_to, progress=progress, floor=floor)
    choice = chosen = None
    if is_auto(criterion):
        choice, chosen = choose_criterion(graph, config, data, candidates=criterion.candidates, flops_ratio=flops_ratio,
                                          round_to=rounding.round_to, floor=floor, device=device, progress=progress)
    return Resolved(flops_ratio=flops_ratio, round_to=rounding.round_to, floor=floor,
                    unsafe=floor.unsafe_by_root(graph), latency_search=search, rounding_note=rounding.note,
                    choice=choice, criterion=chosen)
