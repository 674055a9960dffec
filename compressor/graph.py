"""The coupling graph: torch-pruning's DependencyGraph plus what we learn about the model around it.

``trace`` finds the prunable groups (channels that must be removed together across layers), the
layers that must not be pruned (the classifier, whose width is the class count) and the attention
blocks whose head bookkeeping (:mod:`compressor.attention`) has to follow the pruned widths. What it
needs of torch-pruning beyond the public API is in :mod:`compressor.tp_compat`.

Attention is pruned in one of two ways (``attention_pruning``): ``"dims"`` removes the same
head-dimension indices in every head (the head count stays, ``head_dim`` shrinks); ``"heads"``
removes whole heads (their q, k and v rows and the matching inputs of the output projection), so
``num_heads`` shrinks and ``head_dim`` stays.
"""

from __future__ import annotations

import math
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from . import tp_compat, watchdog
# attention_heads, drop_heads, head_shape, patch_attention: re-exported from their home before the split
from .attention import (_attention_modules, _head_blocks, _head_module, attention_heads, drop_heads,  # noqa: F401
                        head_shape, patch_attention)
from .config import check_attention_pruning
from .errors import GraphError, one_line
from .progress import Progress
from .tp_compat import MAX_GROUP_INDICES, ROOT_TYPES, UnmappedReshape, unwrapped_parameters  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class GroupSpec:
    """One prunable group, described by names so it can be found again in a copy of the model."""

    index: int
    root: str
    """Module whose channels index the group."""
    handler: str
    """``"out"`` or ``"in"``: which side of ``root`` the indices refer to."""
    size: int
    """Channels in the root dimension."""
    ch_groups: int
    """Channels come in this many interleaved blocks pruned alike (attention heads, grouped layers)."""
    layers: tuple[str, ...]
    """Every module the group touches."""
    unit_width: int = 1
    """Adjacent channels (per block) that make one unit: a whole head's ``head_dim`` for heads pruning."""
    heads_of: tuple[str, ...] = ()
    """Attention modules that lose one head per unit removed (``attention_pruning="heads"``); else empty."""

    @property
    def units(self) -> int:
        """Independently prunable units: channels per block, or heads."""
        return self.size // (self.ch_groups * self.unit_width)

    @property
    def unit_channels(self) -> int:
        """Root channels that one removed unit takes away."""
        return self.ch_groups * self.unit_width

    def expand(self, units: list[int] | tuple[int, ...]) -> list[int]:
        """Channel indices of the root for the given unit indices, repeated over blocks."""
        per_block = self.size // self.ch_groups
        w = self.unit_width
        return sorted(b * per_block + u * w + i for b in range(self.ch_groups) for u in units for i in range(w))


@dataclass
class CouplingGraph:
    """A model with its dependency graph and its prunable groups."""

    model: nn.Module
    dg: tp.DependencyGraph
    example_input: torch.Tensor
    groups: list[GroupSpec]
    protected: dict[str, str]
    """Module name -> why it is never pruned."""
    attention: list[str] = field(default_factory=list)
    """Names of attention modules whose head attributes are patched after pruning."""
    attention_pruning: str = "dims"
    """``"dims"`` or ``"heads"``: the unit of the attention groups (see the module docstring)."""

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def tp_group(self, spec: GroupSpec, idxs: list[int] | None = None) -> tp.Group:
        """The torch-pruning group of ``spec`` for channel indices ``idxs`` (all channels if None)."""
        module = self.module(spec.root)
        pruner = self.dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if spec.handler == "out" else pruner.prune_in_channels
        if idxs is None:
            idxs = list(range(spec.size))
        return self.dg.get_pruning_group(module, fn, idxs)


def module_width(module: nn.Module, handler: str = "out") -> int:
    """The channels (features) of a root layer on the side ``handler`` (``"out"`` or ``"in"``) prunes:
    the one place a module's width is read."""
    if isinstance(module, nn.Linear):
        return module.out_features if handler == "out" else module.in_features
    return module.out_channels if handler == "out" else module.in_channels


def find_classifier(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the last layer whose output width equals the model's output width."""
    with torch.no_grad():
        out = model.eval()(example_input[:1])
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    width = out.shape[1]
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == width:
            found = name
        elif isinstance(m, (nn.Conv2d, nn.Conv1d)) and m.out_channels == width:
            found = name
    return found


def _is_grouped_conv(m: nn.Module) -> bool:
    # Depthwise convolutions (one group per channel) have their own pruner; other grouped ones
    # keep ``groups`` and slice each group's inputs alike, so they must lose the same channels in every group.
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and 1 < m.groups < m.in_channels


def _multiplier_conv(dg: tp.DependencyGraph, group: tp.Group, names: dict[nn.Module, str]) -> str | None:
    """Why ``group`` cannot be pruned where its channels are the inputs of a depthwise convolution with
    a channel multiplier (``groups == in_channels < out_channels``: FastViT's, MobileOne's): torch-pruning
    prunes it as a plain convolution and indexes one input-channel slice per kept channel (an ``IndexError``)."""
    for dep, _ in group:
        m = dep.target.module
        if (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == m.in_channels > 1 and m.out_channels != m.in_channels
                and dg.is_in_channel_pruning_fn(dep.handler)):
            return (f"its channels feed {names.get(m, type(m).__name__)}, a depthwise convolution with a channel "
                    f"multiplier ({m.in_channels} -> {m.out_channels}), which torch-pruning cannot prune")
    return None


_MAGNITUDE = tp.importance.GroupMagnitudeImportance(p=2)


def _unscorable(group: tp.Group) -> str | None:
    """Why ``group`` cannot be pruned where torch-pruning mapped its channels inconsistently (every index
    within its layer's width, yet the items disagree on which root channel they belong to, as through
    MambaOut's gated split): scoring it by weight magnitude indexes past a tensor; None where it scores."""
    try:
        with torch.no_grad():
            _MAGNITUDE(group)
    except (IndexError, RuntimeError) as exc:
        return f"torch-pruning maps its channels in a way no criterion can score ({one_line(exc, 120)})"
    return None


def _channel_groups(dg: tp.DependencyGraph, group: tp.Group, num_heads: dict[nn.Module, int]) -> int:
    blocks = set(_heads_in(dg, group, num_heads).values())
    blocks |= _conv_groups(group)
    return math.lcm(*blocks) if blocks else 1


def _heads_in(dg: tp.DependencyGraph, group: tp.Group, num_heads: dict[nn.Module, int]) -> dict[nn.Module, int]:
    """The head modules (qkv projections, ``nn.MultiheadAttention``) whose heads the group's channels index."""
    return {dep.target.module: num_heads[dep.target.module] for dep, _ in group
            if dep.target.module in num_heads and dg.is_out_channel_pruning_fn(dep.handler)}


def _conv_groups(group: tp.Group) -> set[int]:
    return {dep.target.module.groups for dep, _ in group if _is_grouped_conv(dep.target.module)}


def _head_units(dg: tp.DependencyGraph, group: tp.Group, num_heads: dict[nn.Module, int],
                owners: dict[nn.Module, str]) -> tuple[int, tuple[str, ...]] | None:
    """For whole-head pruning: ``(head count, attention module names)`` of an attention group, None
    for any other group; a :class:`GraphError` where whole heads cannot be removed consistently."""
    heads = _heads_in(dg, group, num_heads)
    if not heads:
        return None
    names = tuple(owners[m] for m in heads)
    if len(set(heads.values())) > 1:
        counts = ", ".join(f"{owners[m]} ({n})" for m, n in heads.items())
        raise GraphError(f"whole heads cannot be pruned: attention modules with different head counts share "
                         f"channels ({counts}), so a head of one is not a head of the other",
                         hint="use --attention dims")
    if _conv_groups(group):
        raise GraphError(f"whole heads cannot be pruned: the channels of attention module {names[0]} also pass "
                         "through a grouped convolution, which needs the same channels removed in every group",
                         hint="use --attention dims")
    return next(iter(heads.values())), names


def _reroot_attention(dg: tp.DependencyGraph, group: tp.Group, num_heads: dict[nn.Module, int]) -> tp.Group | None:
    # A qkv group rooted at qkv's outputs indexes q, k and v together (3x the width); rooted at the
    # consumer's inputs (the output projection) the indices are one head-dim block each, which is
    # what pruning equally across heads needs. torch-pruning's own pruner does the same.
    # nn.MultiheadAttention prunes its inputs and outputs alike: its groups need no re-rooting.
    if not any(dep.target.module in num_heads and not isinstance(dep.target.module, nn.MultiheadAttention)
               and dg.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
        return group
    for dep, idxs in group:
        if isinstance(dep.target.module, ROOT_TYPES) and dg.is_in_channel_pruning_fn(dep.handler):
            return dg.get_pruning_group(dep.target.module, dep.handler, idxs)
    return None


REROOT_TRIES = 4
"""Narrower members of a group tried as its root (:func:`_reroot_narrowest`), narrowest first."""


def _reroot_narrowest(dg: tp.DependencyGraph, group: tp.Group) -> tp.Group:
    """``group`` rooted at a narrower member whose channels reach every channel of the root, where one exists.

    A ghost module concatenates its primary convolution's output with a depthwise ("cheap") map of that
    same output: rooted at the concatenation's consumer, channel ``i`` and channel ``init + i`` are one
    channel twice, so removing three quarters of the root's "units" can remove every channel of the
    primary convolution, and torch-pruning refuses the group (GhostNet's floor was 0.89). Rooted at the
    primary convolution, a unit is the real channel and both copies go with it. A group without such
    duplicates has no narrower member that reaches all of its root, and is returned as it is.
    """
    root_dep, root_idxs = group[0].dep, group[0].idxs
    size = len(root_idxs)
    tried: set[int] = set()
    candidates = []
    for dep, _ in group:
        module = dep.target.module
        if not isinstance(module, ROOT_TYPES) or dep is root_dep:
            continue
        side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in" if dg.is_in_channel_pruning_fn(dep.handler) else None
        width = module_width(module, side) if side else 0
        if 0 < width < size and size % width == 0 and width not in tried:
            tried.add(width)
            candidates.append((width, module, dep.handler))
    for width, module, handler in sorted(candidates, key=lambda c: c[0])[:REROOT_TRIES]:
        try:
            rerooted = dg.get_pruning_group(module, handler, list(range(width)))
        except (IndexError, ValueError, ArithmeticError):
            continue
        reached = {int(i) for dep, idxs in rerooted
                   if dep.target.module is root_dep.target.module and dep.handler == root_dep.handler for i in idxs}
        if len(reached) == size:
            return rerooted
    return group


TRACING = "tracing the model into torch-pruning's dependency graph"


def trace(model: nn.Module, example_input: torch.Tensor, *, protect: tuple[str, ...] = (),
          timeout: float | None = None, memory: int | None = None, progress: Progress | None = None,
          attention_pruning: str = "dims") -> CouplingGraph:
    """Build the coupling graph of ``model`` and list its prunable groups, within ``timeout`` seconds and
    ``memory`` bytes of resident memory (None: no limit; see :mod:`compressor.watchdog`), telling
    ``progress`` it is alive while a long trace runs.

    ``attention_pruning`` (``"dims"`` or ``"heads"``) sets the unit of the attention groups.
    """
    check_attention_pruning(attention_pruning)
    with watchdog.guard(TRACING, seconds=timeout, memory=memory, progress=progress, label="tracing",
                        time_hint="raise --trace-timeout (0 disables it), or protect the layers that make the graph "
                                  "large (torch-pruning's tracing grows with every coupled reshape and concatenation)",
                        memory_hint="trace at a smaller input size (smaller images, or a smaller --input-shape for "
                                    "`compressor inspect`), give the process more memory, or raise --trace-memory "
                                    "(0 disables it)"):
        return _trace(model, example_input, protect=protect, attention_pruning=attention_pruning)


def _trace(model: nn.Module, example_input: torch.Tensor, *, protect: tuple[str, ...],
           attention_pruning: str) -> CouplingGraph:
    model.eval()
    protected: dict[str, str] = {}
    classifier = find_classifier(model, example_input)
    if classifier is not None:
        protected[classifier] = "classifier (its width is the number of classes)"
    for name in protect:
        protected.setdefault(name, "protected by the user")
    dg = tp_compat.Graph()
    dg.adopt(model)
    unwrapped = unwrapped_parameters(model, dg)
    try:
        with warnings.catch_warnings(), _running(model) as stack:
            warnings.simplefilter("ignore")
            dg = dg.build_dependency(model, example_inputs=example_input[:1], verbose=False,
                                     unwrapped_parameters=unwrapped)
    except Exception as exc:  # the stage boundary: the model's own forward runs in there, and torch-pruning's analysis
        raise GraphError(f"torch-pruning could not trace the model: {_where(exc, stack)}: {one_line(exc, 200)}",
                         hint="protect the module named (--protect), or report the model") from exc
    _drop_traced_caches(model)
    return _grouped(model, dg, example_input[:1], protected, attention_pruning)


def _drop_traced_caches(model: nn.Module) -> None:
    """Forget the tensors a module cached during the traced forward (timm's EfficientFormer keeps its
    attention biases in a dict in eval mode): they carry autograd history, and a model holding one cannot
    be deep-copied, which every search probe does. Cached dict entries are dropped (the next forward
    computes them again); a plain tensor attribute is detached."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, name, value.detach())
            elif isinstance(value, dict):
                for key in [k for k, v in value.items() if isinstance(v, torch.Tensor) and v.grad_fn is not None]:
                    del value[key]


@contextmanager
def _running(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules whose forward is running, innermost last (while the trace runs)."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module, args):
        stack.append(names.get(module, type(module).__name__))

    def leave(module, args, out):
        name = names.get(module, type(module).__name__)
        while stack and stack.pop() != name:  # a forward that caught an error of an inner one left it on the stack
            pass

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _where(exc: BaseException, stack: list[str]) -> str:
    """Where a trace failed: the module whose forward raised it (with the line of code), or the
    torch-pruning function that did after the forward."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    pruner = [i for i, f in enumerate(frames) if f"{os.sep}torch_pruning{os.sep}" in f.filename]
    forward = [i for i, f in enumerate(frames) if f.filename.endswith(f"nn{os.sep}modules{os.sep}module.py")]
    if stack and forward and (not pruner or forward[-1] > pruner[-1]):  # inside a forward: the module that raised
        line = f" (`{last.line}` in {Path(last.filename).name})" if last is not None and last.line else ""
        return f"in the forward of module {stack[-1] or 'the model'}{line}"
    if pruner:
        return f"in torch-pruning's {frames[pruner[-1]].name} (after the forward)"
    return "after the forward"


def regroup(graph: CouplingGraph) -> CouplingGraph:
    """The groups of ``graph.model`` after it was pruned through ``graph.dg``, without tracing again.

    torch-pruning keeps its dependency graph valid across prunes (its own iterative pruners reuse
    one): the index mappings are updated from the pruned shapes, so only the group list is listed anew.
    """
    return _grouped(graph.model, graph.dg, graph.example_input, dict(graph.protected), graph.attention_pruning)


def _grouped(model: nn.Module, dg: tp.DependencyGraph, example_input: torch.Tensor, protected: dict[str, str],
             attention_pruning: str) -> CouplingGraph:
    attention = _attention_modules(model)
    num_heads = _head_blocks(attention)
    owners = {_head_module(m): name for name, m in attention.items()}
    ignored = [model.get_submodule(name) for name in protected]

    names = {m: n for n, m in model.named_modules()}
    specs: list[GroupSpec] = []
    failed: dict[nn.Module, str] = {}
    for group in dg.all_groups(ignored, failed):
        try:
            group = _reroot_attention(dg, group, num_heads)
        except (IndexError, ValueError, ArithmeticError) as exc:
            failed[group[0].dep.target.module] = f"torch-pruning cannot map its channels ({type(exc).__name__}: {exc})"
            continue
        if group is None:
            continue
        group = _reroot_narrowest(dg, group)
        broken = dg.out_of_range(group, names) or _multiplier_conv(dg, group, names) or _unscorable(group)
        if broken is not None:
            failed[group[0].dep.target.module] = broken
            continue
        root_dep = group[0].dep
        root = root_dep.target.module
        if root not in names:
            continue
        size = len(group[0].idxs)
        heads = _head_units(dg, group, num_heads, owners) if attention_pruning == "heads" else None
        if heads is not None:
            # A unit is one head: adjacent channels, which torch-pruning maps to that head's q, k and v rows.
            ch_groups, unit_width, heads_of = 1, size // heads[0], heads[1]
            if size % heads[0]:
                continue
        else:
            ch_groups, unit_width, heads_of = _channel_groups(dg, group, num_heads), 1, ()
            if size % ch_groups:
                continue  # blocks that do not tile the channels: no even pruning exists
        layers = tuple(dict.fromkeys(names[d.target.module] for d, _ in group if d.target.module in names))
        specs.append(GroupSpec(
            index=len(specs),
            root=names[root],
            handler="out" if dg.is_out_channel_pruning_fn(root_dep.handler) else "in",
            size=size,
            ch_groups=ch_groups,
            layers=layers,
            unit_width=unit_width,
            heads_of=heads_of,
        ))
    for m, why in failed.items():
        protected.setdefault(names[m], why)
    return CouplingGraph(model=model, dg=dg, example_input=example_input[:1], groups=specs,
                         protected=protected, attention=list(attention), attention_pruning=attention_pruning)
