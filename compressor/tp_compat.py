"""torch-pruning behind one wall: every private name of it that we use, checked once, applied per graph.

torch-pruning's public API traces a model and builds coupled groups; three things it does not
offer are done here, on our own :class:`Graph` (a ``DependencyGraph`` subclass) and on no other:

- index mappings that tolerate a reshape torch-pruning cannot map (a channel shuffle makes it divide
  by zero), cached between prunes (it recomputes every mapping of the graph for each group), and
  bounded where a flatten's indices multiply past :data:`MAX_GROUP_INDICES` (Swin's window partitions);
- the group listing of ``get_all_groups``, except that a root whose group cannot be built is
  recorded and skipped instead of ending the listing;
- a deep copy of a traced graph that shares the pruner instances torch-pruning compares by identity.

- a concatenation whose input widths torch-pruning cannot infer (its trace ends in a ``TypeError``)
  made impassable, and groups whose channels it maps past a layer's width found before they are
  scored or pruned (:meth:`Graph.out_of_range`).

torch-pruning calls its index-mapping functions as module globals, so a graph cannot carry its own.
The first :class:`Graph` therefore puts forwarders in their place: they call torch-pruning's own
functions, unchanged, for every graph that is not one of ours. Importing ``compressor`` changes
nothing in torch-pruning; a plain ``DependencyGraph`` behaves as stock before and after.

:func:`check` names the supported range and any private name that has gone missing; it runs before
the first trace.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch_pruning as tp
from torch import nn

from .errors import GraphError

SUPPORTED = ">=1.5,<1.7"
"""The torch-pruning versions whose private names this module is written against (as ``pyproject.toml`` pins)."""
_LOWEST, _BELOW = (1, 5), (1, 7)

ROOT_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)
"""Layers whose channels can root a group."""

MAX_GROUP_INDICES = 1 << 16
"""A group whose channel indices multiply past this through reshapes is not prunable. torch-pruning
maps a flatten by multiplying indices; chained through Swin's window partitions they grow until the
trace takes many GB of memory."""

_INDEX_MAPPING = "torch_pruning.dependency.index_mapping"
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    # module -> names read there
    _INDEX_MAPPING: ("update_index_mapping", "update_reshape_index_mapping", "update_concat_index_mapping",
                     "_FlattenIndexMapping"),
    "torch_pruning.dependency.graph": ("index_mapping",),
    "torch_pruning.ops": ("OPTYPE", "module2type"),
}
"""Module-level private names, by module."""
GRAPH_ATTRIBUTES = ("IGNORED_LAYERS_IN_TRACING", "REGISTERED_PRUNERS", "CUSTOMIZED_PRUNERS", "ops")
"""Attributes of a fresh ``DependencyGraph`` that we read (``module2node`` and ``unwrapped_parameters``
appear with the trace, ``_DG`` on every group it builds)."""
FLATTEN_ATTRIBUTES = ("_stride", "reverse")
"""Attributes of torch-pruning's flatten index mapping."""


class UnmappedReshape(Exception):
    """A group's channels cross a reshape that torch-pruning cannot map."""


def version(text: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of torch-pruning's version string (the installed one by default)."""
    text = tp.__version__ if text is None else text
    try:
        return tuple(int(p) for p in text.split(".")[:2])  # type: ignore[return-value]
    except ValueError:
        return (0, 0)


def missing_names() -> list[str]:
    """Every private name of torch-pruning we read that the installed version lacks, as ``module.name``."""
    missing = []
    for module, names in PRIVATE_NAMES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        missing += [f"{module}.{name}" for name in names if not hasattr(mod, name)]
    try:
        fresh = tp.DependencyGraph()
    except AttributeError as exc:  # its own constructor reads a name that went missing
        missing.append(f"DependencyGraph() ({exc})")
    else:
        missing += [f"DependencyGraph().{name}" for name in GRAPH_ATTRIBUTES if not hasattr(fresh, name)]
    flatten = getattr(sys.modules.get(_INDEX_MAPPING), "_FlattenIndexMapping", None)
    if flatten is not None:
        probe = flatten(stride=2, reverse=False)
        missing += [f"_FlattenIndexMapping().{name}" for name in FLATTEN_ATTRIBUTES if not hasattr(probe, name)]
    return missing


@functools.cache
def check() -> None:
    """Refuse a torch-pruning that lacks a private name we read (a :class:`GraphError` naming each);
    warn where its version lies outside :data:`SUPPORTED` but every name is there."""
    _check()


def _check() -> None:
    missing = missing_names()
    if missing:
        raise GraphError(f"torch-pruning {tp.__version__} lacks what compressor relies on: {', '.join(missing)} "
                         f"(supported: torch-pruning{SUPPORTED})",
                         hint=f'install a supported version: pip install "torch-pruning{SUPPORTED}"')
    if not _LOWEST <= version() < _BELOW:
        warnings.warn(f"torch-pruning {tp.__version__} is outside the supported range {SUPPORTED}; "
                      "pruning may fail or differ", stacklevel=3)


# -- per-graph index mappings ---------------------------------------------------------------------------


class _Unmappable:
    """An index mapping that refuses: the group's channels cross an op torch-pruning cannot map."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __call__(self, idxs):
        raise UnmappedReshape(self.why)


_unmappable = _Unmappable("its channels pass through a reshape torch-pruning cannot map (a channel shuffle?)")
_unmappable_concat = _Unmappable("its channels meet a concatenation whose inputs' widths torch-pruning cannot "
                                 "infer (a residual add or a slice as an input, as in cross-stage-partial blocks)")


def _block(node, mapping: _Unmappable, slot: int) -> None:
    """Make every edge of ``node`` (both directions) refuse through ``mapping`` at ``index_mapping[slot]``."""
    edges = list(node.dependencies) + [d for n in node.inputs + node.outputs for d in n.dependencies
                                       if d.target is node]
    for dep in edges:
        dep.index_mapping[slot] = mapping


class _BoundedFlatten:
    """torch-pruning's flatten mapping, refusing to multiply a group's indices past :data:`MAX_GROUP_INDICES`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, idxs):
        if not self.inner.reverse and len(idxs) * self.inner._stride > MAX_GROUP_INDICES:
            raise UnmappedReshape(f"its channel indices multiply past {MAX_GROUP_INDICES} through reshapes "
                                  "(window partitions?); torch-pruning cannot map them in bounded memory")
        return self.inner(idxs)


MAX_GROUP_STEPS = 5_000
"""Steps (edges followed) torch-pruning may take to build one group. Where a group's channels reach a
layer through overlapping channel ranges (slices: ReXNet's partial residual adds ``x[:, :C] + y``), its
walk revisits layers with ever new index sets and does not end in any time a user waits for (each
step also costs time in proportion to the group). The largest groups of timm's zoo take about 1,100
(CaiT's residual stream, DenseNet-121's about 530)."""
MAX_GROUP_SECONDS = 5.0
"""CPU seconds torch-pruning may take to build one group (the largest of timm's zoo take milliseconds);
past them the group is left unpruned. Where index lists grow through flattens (EfficientViT-MSRA's
cascaded attention), a walk of few steps can compare ever longer index lists."""
_steps = [0]
_deadline = [0.0]


class _CountedTrigger:
    """A dependency's ``is_triggered_by``, counting the steps of the group being built."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, fn) -> bool:
        _steps[0] += 1
        if _steps[0] > MAX_GROUP_STEPS:
            raise UnmappedReshape(f"torch-pruning's walk over its coupled layers did not end within {MAX_GROUP_STEPS} "
                                  "steps (overlapping channel slices, as in partial residual adds x[:, :C] + y?)")
        if time.process_time() > _deadline[0]:
            raise UnmappedReshape(f"torch-pruning's walk over its coupled layers took more than {MAX_GROUP_SECONDS:g} "
                                  "CPU seconds (channel indices multiplied through reshapes and attention splits)")
        return self.inner(fn)


class Graph(tp.DependencyGraph):
    """torch-pruning's dependency graph with our index mappings (see the module docstring)."""

    def __init__(self) -> None:
        check()
        _install_forwarders()
        super().__init__()
        self._mapping_key: tuple | None = None

    def _update_index_mapping(self, original) -> None:
        # Mappings change only when pruning changes a shape (without the cache a Swin's trace was slow).
        key = tuple(tuple(p.shape) for p in self.model.parameters())
        if self._mapping_key == key:
            return
        original(self)
        flatten = sys.modules[_INDEX_MAPPING]._FlattenIndexMapping
        for node in self.module2node.values():
            for dep in node.dependencies:
                if not isinstance(dep.__dict__.get("is_triggered_by"), _CountedTrigger):
                    dep.is_triggered_by = _CountedTrigger(dep.is_triggered_by)
                for i, mapping in enumerate(dep.index_mapping):
                    if isinstance(mapping, flatten):
                        dep.index_mapping[i] = _BoundedFlatten(mapping)
        self._mapping_key = key

    def get_pruning_group(self, module, pruning_fn, idxs):
        """torch-pruning's, within :data:`MAX_GROUP_STEPS` and :data:`MAX_GROUP_SECONDS` (an
        :class:`UnmappedReshape` past them)."""
        _steps[0], _deadline[0] = 0, time.process_time() + MAX_GROUP_SECONDS
        return super().get_pruning_group(module, pruning_fn, idxs)

    def _update_reshape_index_mapping(self, original, node) -> None:
        # A channel shuffle's view(b, groups, c // groups, h, w) makes torch-pruning divide by zero, in
        # the trace and again in every get_pruning_group: the reshape is made impassable instead, so a
        # group reaching it fails fast and is left unpruned (see all_groups).
        try:
            original(self, node)
        except (ArithmeticError, IndexError, ValueError):
            _block(node, _unmappable, 0)

    def _update_concat_index_mapping(self, original, node) -> None:
        # A concatenation of which some input's width cannot be inferred (CSP blocks, CoaT's class token
        # over sliced maps) makes torch-pruning sum None into the widths, ending the trace with a
        # TypeError: the concatenation is made impassable instead, and the groups reaching it unpruned.
        try:
            original(self, node)
        except TypeError:
            if node.module.concat_sizes is None or None not in node.module.concat_sizes:
                raise
            _block(node, _unmappable_concat, 1)

    def out_of_range(self, group: tp.Group, names: dict[nn.Module, str]) -> str | None:
        """Why ``group`` cannot be pruned where torch-pruning mapped its channels past a layer's width
        (a concatenation, split or reshape it mapped wrongly; pruning or scoring it raises an
        ``IndexError``), naming the first such layer; None where every index is in range."""
        root_width = len(group[0].idxs)
        for item in group.items:
            roots = [r for r in (getattr(item, "root_idxs", None) or ()) if r is not None]
            if roots and max(roots) >= root_width:
                name = names.get(item.dep.target.module, type(item.dep.target.module).__name__)
                return (f"torch-pruning maps the channels of {name} back past the group's {root_width} channels "
                        f"(index {max(roots)}: a concatenation, split or reshape it maps wrongly)")
        for dep, idxs in group:
            module = dep.target.module
            if not idxs or module not in self.module2node or self.get_pruner_of_module(module) is None:
                continue
            out = self.is_out_channel_pruning_fn(dep.handler)
            width = self.get_out_channels(module) if out else self.get_in_channels(module)
            if width is not None and max(idxs) >= width:
                name = names.get(module, type(module).__name__)
                return (f"torch-pruning maps its channels past the {'outputs' if out else 'inputs'} of {name} "
                        f"(index {max(idxs)} of {width}: a concatenation, split or reshape it maps wrongly)")
        return None

    def all_groups(self, ignored: list[nn.Module], failed: dict[nn.Module, str]) -> Iterator[tp.Group]:
        """torch-pruning's ``get_all_groups`` over :data:`ROOT_TYPES`, except that a root whose group
        torch-pruning cannot build (an index error behind a concat or split it mapped wrongly, a
        reshape it cannot map) is recorded in ``failed`` and skipped instead of ending the listing."""
        ignored = ignored + self.IGNORED_LAYERS_IN_TRACING
        visited: set[nn.Module] = set()
        for m in list(self.module2node):
            if m in ignored or m in visited or not isinstance(m, ROOT_TYPES):
                continue
            pruner = self.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = self.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except UnmappedReshape as exc:
                failed[m] = str(exc)
                continue
            except (IndexError, ValueError, ArithmeticError) as exc:
                failed[m] = f"torch-pruning cannot map its channels ({type(exc).__name__}: {exc})"
                continue
            out_modules = {dep.target.module for dep, _ in group if self.is_out_channel_pruning_fn(dep.handler)}
            visited |= out_modules
            if not out_modules & set(ignored):
                yield group

    def adopt(self, model: nn.Module) -> None:
        """Register our pruners for the layers of ``model`` that torch-pruning's own would break:
        a ``GroupNorm`` with a weight and no bias (MetaFormer's, timm's ``GroupNorm1(bias=False)``),
        whose missing bias torch-pruning indexes (an ``AttributeError`` in the prune)."""
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine and m.bias is None and type(m) not in self.CUSTOMIZED_PRUNERS:
                self.register_customized_layer(type(m), _BiaslessGroupNormPruner())

    def unwrapped(self) -> list[tuple[nn.Parameter, int]]:
        """The parameters no pruner owns, each with its pruned dimension, as the trace recorded them."""
        return [(p, dim) for p, dim in self.unwrapped_parameters]

    def copy_memo(self) -> dict[int, object]:
        """A ``copy.deepcopy`` memo that shares, rather than copies, what must stay one object: the
        pruner instances (torch-pruning compares pruning functions by them, some module-level), the
        autograd nodes the trace kept and torch-pruning's ops module."""
        shared = [self.ops, *self.REGISTERED_PRUNERS.values(), *self.CUSTOMIZED_PRUNERS.values()]
        for node in self.module2node.values():
            shared.append(node.grad_fn)
            shared += [fn.__self__ for dep in node.dependencies for fn in (dep.trigger, dep.handler)
                       if hasattr(fn, "__self__")]
        return {id(obj): obj for obj in shared if obj is not None}


class _BiaslessGroupNormPruner(tp.pruner.function.GroupNormPruner):
    """torch-pruning's ``GroupNorm`` pruner, for norms whose weight or bias may be missing."""

    def prune_out_channels(self, layer: nn.Module, idxs: list) -> nn.Module:
        keep = sorted(set(range(layer.num_channels)) - set(idxs))
        layer.num_channels = len(keep)
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
        return layer

    prune_in_channels = prune_out_channels


def unwrapped_parameters(model: nn.Module, dg: tp.DependencyGraph) -> list[tuple[nn.Parameter, int]]:
    """Parameters no torch-pruning pruner owns (class tokens, position embeddings, layer-scale
    gammas), each with the dimension that indexes channels, to pass to ``build_dependency``.

    That is the last dimension whose size is the output width of some layer of the model;
    torch-pruning's own guess, the last dimension larger than one, is the fallback. Passing them
    explicitly also keeps torch-pruning from warning about each one.
    """
    prunable = set(dg.REGISTERED_PRUNERS) - {tp.ops.OPTYPE.ELEMENTWISE}
    wrapped = {id(p) for m in model.modules() if tp.ops.module2type(m) in prunable for p in m.parameters()}
    widths = _layer_widths(model)
    found = []
    for p in model.parameters():
        if id(p) in wrapped:
            continue
        dims = [d for d, n in enumerate(p.shape) if n > 1 and n in widths] or [d for d, n in enumerate(p.shape) if n > 1]
        if dims:
            found.append((p, dims[-1]))
    return found


def _layer_widths(model: nn.Module) -> set[int]:
    widths = set()
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            widths.add(m.out_channels)
        elif isinstance(m, nn.Linear):
            widths.add(m.out_features)
        elif isinstance(m, nn.LayerNorm) and m.normalized_shape:
            widths.add(m.normalized_shape[-1])
    return widths


def graph_of(group: tp.Group) -> tp.DependencyGraph:
    """The dependency graph a torch-pruning group was built by (criteria that look beyond the group)."""
    return group._DG


def node_of(dg: tp.DependencyGraph, module: nn.Module) -> Any:
    """The graph's node of ``module`` (its ``inputs``/``outputs`` are the neighbouring nodes)."""
    return dg.module2node[module]


# -- the forwarders -------------------------------------------------------------------------------------

_ORIGINALS: dict[str, Any] = {}


def _install_forwarders() -> None:
    """Put, once per process, forwarders in place of the three index-mapping functions: ours for a
    :class:`Graph`, torch-pruning's own, untouched, for any other graph."""
    if _ORIGINALS:
        return
    module = sys.modules[_INDEX_MAPPING] if _INDEX_MAPPING in sys.modules else importlib.import_module(_INDEX_MAPPING)
    update, reshape = module.update_index_mapping, module.update_reshape_index_mapping
    concat = module.update_concat_index_mapping

    @functools.wraps(update)
    def update_index_mapping(graph):
        if isinstance(graph, Graph):
            return graph._update_index_mapping(update)
        return update(graph)

    @functools.wraps(reshape)
    def update_reshape_index_mapping(graph, node):
        if isinstance(graph, Graph):
            return graph._update_reshape_index_mapping(reshape, node)
        return reshape(graph, node)

    @functools.wraps(concat)
    def update_concat_index_mapping(graph, node):
        if isinstance(graph, Graph):
            return graph._update_concat_index_mapping(concat, node)
        return concat(graph, node)

    _ORIGINALS.update(update_index_mapping=update, update_reshape_index_mapping=reshape,
                      update_concat_index_mapping=concat)
    module.update_index_mapping = update_index_mapping
    module.update_reshape_index_mapping = update_reshape_index_mapping
    module.update_concat_index_mapping = update_concat_index_mapping
