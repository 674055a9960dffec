"""Pre-flight inspection: what the pruner sees in a model before any work is done."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import flops, pruning
from .errors import DataError, GraphError, TargetUnreachableError
from .attention import attention_heads
from .graph import CouplingGraph, trace
from .progress import Progress


@dataclass(frozen=True)
class GroupInfo:
    root: str
    channels: int
    units: int
    layers: int
    heads_of: tuple[str, ...] = ()
    """Attention modules whose whole heads are this group's units (``attention_pruning="heads"``)."""


@dataclass(frozen=True)
class Inspection:
    """The coupling graph summarised for people: groups, protection, and how far pruning can go."""

    macs: int
    params: int
    groups: list[GroupInfo]
    protected: dict[str, str]
    attention: list[str]
    frozen: list[str]
    """Parameters with ``requires_grad=False``: pruned like the rest, but not fine-tuned."""
    unwrapped: list[str] = field(default_factory=list)
    """Parameters held directly by a module torch-pruning has no pruner for (class tokens, position embeddings)."""
    min_reachable_ratio: float | None = None
    """Reached without the unsafe groups."""
    min_reachable_ratio_raised: float | None = None
    """``inspect`` without a cap: the floor at the largest cap the default raises to where a target needs it
    (``pruning.AUTO_CAPS``)."""
    unsafe: dict[str, str] = field(default_factory=dict)
    """Group root -> why: groups whose pruning breaks the forward, which the search leaves unpruned."""
    attention_pruning: str = "dims"
    """The unit of the attention groups: ``"dims"`` (head dimensions) or ``"heads"`` (whole heads)."""
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Attention module -> ``(num_heads, head_dim)``."""
    held_macs: dict[str, int] = field(default_factory=dict)
    """Protected layer or unsafe group's root -> the MACs it holds (the layer's; the group's layers'), which
    no prune can remove."""

    def held_share(self, name: str) -> str:
        """`` (N% of the MACs)`` for a protected layer or an unsafe group, or ``""``."""
        held = self.held_macs.get(name)
        return f" ({100 * held / self.macs:.1f}% of the MACs)" if held is not None and self.macs else ""


def check_prunable(graph: CouplingGraph) -> None:
    """Refuse, before any work, a model that could not be compressed: every parameter frozen
    (nothing could be fine-tuned), or no group of channels that may be pruned."""
    params = list(graph.model.parameters())
    if params and not any(p.requires_grad for p in params):
        raise GraphError("every parameter of the model is frozen (requires_grad=False): the pruned model could not "
                         "be fine-tuned", hint="unfreeze it (model.requires_grad_(True)) before saving it")
    if not graph.groups:
        why = "; ".join(f"{name}: {reason}" for name, reason in list(graph.protected.items())[:3])
        raise GraphError("nothing in the model can be pruned: no coupled group of convolution or linear channels "
                         "is left" + (f" (protected: {why})" if why else ""),
                         hint="structured pruning needs convolution or linear layers whose width is not fixed by the output")


def check_runs(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run the model once on ``example_input`` and say, in one line, why it fails if it does."""
    try:
        with torch.no_grad():
            model.eval()(example_input)
    except Exception as exc:  # the user's model, unpruned, on their input shape: whatever it raises is its answer
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
        raise DataError(f"the model fails on an input of shape {tuple(example_input.shape[1:])}: {why}",
                        hint="check --input-shape: the channel count and image size the model expects") from exc


def describe(graph: CouplingGraph, per_module: tuple[dict[str, int], int] | None = None) -> Inspection:
    """What tracing found, without probing any pruned copy: FLOPs and parameters, groups, protected
    layers, attention, frozen and unwrapped parameters (``compress`` reports this as its pre-flight;
    the search adds the floor and the unsafe groups)."""
    model = graph.model
    macs, params = per_module or flops.per_module(model, graph.example_input)
    names = {p: n for n, p in model.named_parameters()}
    return Inspection(
        macs=macs[""], params=params, held_macs={name: macs.get(name, 0) for name in graph.protected},
        groups=[GroupInfo(s.root, s.size, s.units, len(s.layers), s.heads_of) for s in graph.groups],
        protected=dict(graph.protected), attention=list(graph.attention),
        frozen=sorted(n for n, p in model.named_parameters() if not p.requires_grad),
        unwrapped=sorted(names[p] for p, _ in graph.dg.unwrapped() if p in names),
        attention_pruning=graph.attention_pruning, heads=attention_heads(model),
    )


def summary(inspection: Inspection) -> str:
    """One line for the progress output."""
    parts = [f"{len(inspection.groups)} prunable groups", f"{len(inspection.protected)} protected layers"]
    if inspection.attention:
        parts.append(f"{len(inspection.attention)} attention modules ({inspection.attention_pruning})")
    if inspection.frozen:
        parts.append(f"{len(inspection.frozen)} frozen parameters (pruned, not fine-tuned)")
    if inspection.unwrapped:
        parts.append(f"{len(inspection.unwrapped)} unwrapped parameters")
    return "pre-flight: " + ", ".join(parts)


def inspect_model(model: nn.Module, example_input: torch.Tensor, *, max_prune_fraction: float | None = None,
                  timeout: float | None = None, memory: int | None = None,
                  progress: Progress | None = None, attention_pruning: str = "dims") -> Inspection:
    """Trace ``model`` (within the budgets of :func:`~compressor.graph.trace`) and report its groups, those
    the search would leave unpruned because pruning them breaks the model, and the smallest FLOPs ratio
    the search can reach (at ``max_prune_fraction``; without one, at the default cap and at the largest
    cap the default is raised to)."""
    check_runs(model, example_input)
    graph = trace(model, example_input, timeout=timeout, memory=memory, progress=progress,
                  attention_pruning=attention_pruning)
    check_prunable(graph)
    caps = pruning.caps_for(max_prune_fraction)
    unsafe = pruning.unsafe_groups(graph, max_prune_fraction=caps[0])
    # The floor depends on the caps, not the scores; an unsafe group gets none, so it is not pruned.
    scores = [torch.full((spec.units,), math.nan) if spec.index in unsafe else torch.ones(spec.units)
              for spec in graph.groups]
    floors: list[float | None] = []
    for cap in dict.fromkeys((caps[0], caps[-1])):
        try:
            floors.append(pruning.floor_ratio(graph, scores, max_prune_fraction=cap))
        except TargetUnreachableError:
            floors.append(None)
    counted = flops.per_module(graph.model, graph.example_input)
    described, macs = describe(graph, counted), counted[0]
    held = {graph.groups[g].root: sum(macs.get(layer, 0) for layer in graph.groups[g].layers) for g in unsafe}
    return dataclasses.replace(described, min_reachable_ratio=floors[0],
                               min_reachable_ratio_raised=floors[1] if len(floors) > 1 else None,
                               unsafe={graph.groups[g].root: why for g, why in unsafe.items()},
                               held_macs=described.held_macs | held)
