"""What the run resolves from the request, once: the FLOPs ratio to prune to, the rounding, the floor.

The config stays what the user asked for; the values the run works out from it (the FLOPs ratio a
latency target resolves to, the multiple widths are rounded to, the smallest reachable ratio and the
groups left out for it) travel in one :class:`Resolved`, which the checkpoint and the ONNX metadata
record next to the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import latency, pruning
from .choose import Choice, choose_criterion, is_auto
from .config import DEFAULT_CAP, CompressConfig
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
    max_prune_per_group: float = DEFAULT_CAP
    """The per-group cap the run prunes with: ``--max-prune-per-group``, or the default raised as far as
    the target needs (:func:`fit_cap`)."""
    cap_note: str | None = None
    """Why the cap is above the default (None where it is the default or was given)."""
    choice: Choice | None = None
    """``--criterion auto``: the candidates tried and the one chosen (None for a named criterion)."""
    criterion: Criterion | None = field(default=None, repr=False, compare=False)
    """The criterion instance the run prunes with: the chosen one under ``auto``, else None (the loaded one)."""

    def to_dict(self) -> dict[str, Any]:
        return {"flops_ratio": self.flops_ratio, "round_to": self.round_to, "min_reachable_ratio": self.floor.ratio,
                "max_prune_per_group": self.max_prune_per_group,
                "unsafe": dict(self.unsafe),
                "latency_ratio": self.latency_search.latency_ratio if self.latency_search else None,
                "criterion": self.choice.chosen if self.choice else None}


def resolve(graph: CouplingGraph, config: CompressConfig, *, criterion: Criterion, data: LoadedData,
            progress: Progress, device: torch.device | None = None) -> Resolved:
    """The cap and rounding, the floor at them (one computation), then the FLOPs ratio, then (``--criterion
    auto``) the criterion; a FLOPs target below the floor fails here, before any training. The stages
    after this one prune with :attr:`Resolved.max_prune_per_group`, not the config's."""
    config, rounding, cap_note = fit_cap(graph, config)
    for note in (cap_note, rounding.note):
        if note:
            progress.note(note)
    floor = rounding.floor
    if config.target_flops is not None and floor.ratio > config.target_flops:
        raise pruning.unreachable(config.target_flops, floor.ratio, max_prune_fraction=config.cap,
                                  held=pruning.held_back(graph, floor.unsafe_by_root(graph)))
    flops_ratio, search = latency.resolve_target(graph, config, criterion=criterion, data=data,
                                                 round_to=rounding.round_to, progress=progress, floor=floor)
    choice = chosen = None
    if is_auto(criterion):
        choice, chosen = choose_criterion(graph, config, data, candidates=criterion.candidates, flops_ratio=flops_ratio,
                                          round_to=rounding.round_to, floor=floor, device=device, progress=progress)
    return Resolved(flops_ratio=flops_ratio, round_to=rounding.round_to, floor=floor,
                    unsafe=floor.unsafe_by_root(graph), latency_search=search, rounding_note=rounding.note,
                    max_prune_per_group=config.max_prune_per_group, cap_note=cap_note, choice=choice, criterion=chosen)


def fit_cap(graph: CouplingGraph, config: CompressConfig) -> tuple[CompressConfig, latency.Rounding, str | None]:
    """``config`` with the per-group cap set, the rounding at it, and why the cap is above the default.

    A cap given is kept. Without one the cap is :data:`pruning.DEFAULT_CAP`, raised along
    :data:`pruning.AUTO_CAPS` only where the FLOPs target lies below the floor at every rounding: a
    model some of whose groups cannot be pruned at all (attention the pruner cannot follow, a concat
    it cannot size) reaches the target by pruning the others further, instead of being refused.
    """
    caps = pruning.caps_for(config.max_prune_per_group)
    first = replace(config, max_prune_per_group=caps[0])
    rounding = latency.fit_rounding(graph, first)
    target = config.target_flops
    if target is None or rounding.floor.ratio <= target or len(caps) == 1:
        return first, rounding, None
    # The finest multiple fit_rounding tried (1, or the one given): the cap that reaches there first.
    finest = config.round_to or 1
    at_finest = pruning.capped_floor(graph, target, caps=caps[1:], round_to=finest)
    raised = replace(config, max_prune_per_group=at_finest.max_prune_fraction)
    if at_finest.ratio > target:  # none does: the refusal names the floor at the largest cap
        return raised, latency.Rounding(finest, at_finest, None), None
    note = (f"up to {raised.max_prune_per_group:.0%} of a group's channels are removed, not {caps[0]:.0%} (the default "
            f"cap): at {caps[0]:.0%} the smallest reachable FLOPs ratio is {rounding.floor.ratio:.3f}, above "
            f"--target-flops {target:g}. Pass --max-prune-per-group to choose the cap")
    return raised, latency.fit_rounding(graph, raised), note
