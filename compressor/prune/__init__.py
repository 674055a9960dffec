"""Prune to a FLOPs target: rank every channel with a criterion, then search the global threshold
on FLOPs measured on pruned copies of the model.

The ranking is global (all groups' units on one scale) with a per-group cap, so no layer is
stripped to a sliver, and optional rounding of kept widths to hardware-friendly multiples. The
search is a bisection over "how many of the lowest-ranked removal steps to take", each probe
pruning a fresh copy and counting its MACs, followed by a short refinement so the achieved ratio
lands within 1% below the target.

- :mod:`.plan`: the plan and result types, the per-group caps, the removal steps in order;
- :mod:`.scoring`: per-unit scores from a criterion, and measured per-group channel costs;
- :mod:`.apply`: pruning a graph's model in place, and pruned copies of a graph;
- :mod:`.screen`: the groups whose pruning breaks the model, and the reachable floor;
- :mod:`.search`: the FLOPs search itself.

``compressor.pruning`` re-exports all of it, as before the split.
"""

from __future__ import annotations

from .apply import apply_plan, copy_graph, pruned_copy, pruned_copy_by_tracing, pruned_graph
from .plan import (Chunk, HeadChange, LayerChange, PruneResult, PruningPlan, head_changes, min_units,
                   unit_round_to)
from .scoring import channel_costs, score_groups
from .screen import (AUTO_CAPS, BROKEN_PRUNE, DEFAULT_CAP, Floor, capped_floor, caps_for, floor, floor_ratio, held_back, screen_groups, unreachable,
                     unsafe_groups)
from .search import TOLERANCE, search

__all__ = ["AUTO_CAPS", "BROKEN_PRUNE", "DEFAULT_CAP", "capped_floor", "caps_for", "Chunk", "Floor", "HeadChange", "LayerChange", "PruneResult", "PruningPlan", "TOLERANCE",
           "apply_plan", "channel_costs", "copy_graph", "floor", "floor_ratio", "head_changes", "held_back", "min_units",
           "pruned_copy", "pruned_copy_by_tracing", "pruned_graph", "score_groups", "screen_groups", "search",
           "unit_round_to", "unreachable", "unsafe_groups"]
