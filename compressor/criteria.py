"""The criteria registry: how channels are ranked, discovered through the ``compressor.criteria``
entry-point group.

A criterion is a class whose instances map one coupled group (a torch-pruning ``Group``) to a 1-D
tensor of per-channel scores, higher meaning keep. What it needs beyond the weights is declared as
plain class attributes, never inferred:

- ``needs_gradients``: the pipeline runs ``calibration_batches`` forward/backward passes on the
  fine-tuning data before scoring, so ``.grad`` is populated on every parameter.
- ``needs_per_sample_gradients`` (with ``needs_gradients``): the calibration runs one backward pass
  per sample instead and calls the instance's ``accumulate_grad(model)`` after each (torch-pruning's
  protocol for its Hessian importance); ``.grad`` then holds the last sample's gradient.
- ``needs_activations``: the pipeline runs ``calibration_batches`` forward passes on the fine-tuning
  data with the model in eval mode and calls the instance's ``set_activations(stats)`` once, where
  ``stats`` maps every convolution and linear layer to the mean absolute value of each of its input
  channels (the last dimension for a linear layer) over those batches.
- ``needs_channel_costs``: before scoring, the pipeline measures what removing one unit of each group
  saves (``pruning.channel_costs``, one pruned copy per group) and calls the instance's
  ``set_channel_costs(costs)`` once with a :class:`ChannelCosts`. While scoring a group,
  ``costs.of(group)`` is the fraction of the model's MACs that one of its units costs and
  ``costs.index(group)`` its position in ``costs.fractions`` (every group's, in graph order), so a
  criterion can weigh groups against each other. The costs are handed over once, not set per call:
  the criterion stays a function of the group it is given (rooted at any of its layers), and one
  called without them can say so instead of reading a stale value.

Built-in criteria are registered in our own ``pyproject.toml`` exactly as a third party registers
theirs; ``package.module:Class`` also works without any installation step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import ConfigError, GraphError
from .registry import PluginInfo, Registry
from .tp_compat import graph_of

if TYPE_CHECKING:
    from .graph import CouplingGraph

ENTRY_POINT_GROUP = "compressor.criteria"

__all__ = ["ChannelCosts", "Criterion", "CriterionInfo", "ENTRY_POINT_GROUP", "available_criteria", "criterion_options",
           "get_criterion", "resolve_criterion"]


@runtime_checkable
class Criterion(Protocol):
    """Scores the channels of one coupled group; higher means keep."""

    needs_gradients: bool

    def __call__(self, group: Any) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class ChannelCosts:
    """What one unit of each group costs, as a fraction of the model's MACs (for ``needs_channel_costs``)."""

    fractions: tuple[float, ...]
    """Per group, in the coupling graph's order."""
    owners: Mapping[tuple[nn.Module, bool], int] = field(repr=False)
    """(layer, its output side?) -> index of the group that prunes that side of the layer."""

    @classmethod
    def of_graph(cls, graph: CouplingGraph, fractions: Sequence[float]) -> ChannelCosts:
        """Index ``fractions`` (one per group of ``graph``) by every layer side the groups prune.

        A side that two groups share (a consumer reading a concatenation) finds neither; each
        group's own root always finds it.
        """
        if len(fractions) != len(graph.groups):
            raise ValueError(f"{len(fractions)} costs for {len(graph.groups)} groups")
        layers = set(graph.model.modules())
        owners: dict[tuple[nn.Module, bool], int] = {}
        shared = set()
        for spec in graph.groups:
            for item in graph.tp_group(spec):
                if item.dep.target.module in layers:
                    key = (item.dep.target.module, graph.dg.is_out_channel_pruning_fn(item.dep.handler))
                    if owners.setdefault(key, spec.index) != spec.index:
                        shared.add(key)
        for key in shared:
            del owners[key]
        owners.update({(graph.module(s.root), s.handler == "out"): s.index for s in graph.groups})
        return cls(tuple(float(f) for f in fractions), owners)

    def index(self, group: Any) -> int:
        """Position in ``fractions`` of a torch-pruning group, whichever of its layers roots it."""
        dep = group[0].dep
        key = (dep.target.module, graph_of(group).is_out_channel_pruning_fn(dep.handler))
        if key not in self.owners:
            raise GraphError(f"no channel cost for the group rooted at {dep.target.module.__class__.__name__} "
                             f"({'outputs' if key[1] else 'inputs'}): it is not one of the graph's groups")
        return self.owners[key]

    def of(self, group: Any) -> float:
        """The fraction of the model's MACs that one unit of ``group`` costs."""
        return self.fractions[self.index(group)]


REGISTRY = Registry(ENTRY_POINT_GROUP, kind="criterion", option="--criterion")
CriterionInfo = PluginInfo


def refresh() -> None:
    """Forget the cached discovery, e.g. after installing a plug-in in the same process."""
    REGISTRY.refresh()


def available_criteria() -> list[CriterionInfo]:
    """Every registered criterion, sorted by name (nothing is imported)."""
    return REGISTRY.available()


def resolve_criterion(name: str) -> type:
    """The criterion class for a registered name or a ``package.module:Class`` path."""
    return REGISTRY.resolve(name)


def criterion_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The named criterion's options built from ``given`` (``--criterion-opt``), validated by the criterion
    (:mod:`compressor.options`), as keyword arguments of its class."""
    from . import options

    return options.build(resolve_criterion(name), given, flag="--criterion-opt", what=f"criterion {name!r}")


def get_criterion(name: str, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Criterion:
    """An instance of the named criterion, checked against the contract: made with its ``options``
    (validated by it) and, for callers in Python, any further keyword arguments as they are."""
    made = criterion_options(name, options or {}) if options else {}
    criterion = resolve_criterion(name)(**made, **kwargs)
    if not callable(criterion):
        raise ConfigError(f"criterion {name!r} instances are not callable on a group")
    return criterion


def needs_gradients(criterion: object) -> bool:
    return bool(getattr(criterion, "needs_gradients", False))


def needs_per_sample_gradients(criterion: object) -> bool:
    return needs_gradients(criterion) and bool(getattr(criterion, "needs_per_sample_gradients", False))


def needs_activations(criterion: object) -> bool:
    return bool(getattr(criterion, "needs_activations", False))


def needs_channel_costs(criterion: object) -> bool:
    return bool(getattr(criterion, "needs_channel_costs", False))
