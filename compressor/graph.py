"""The coupling graph: torch-pruning's DependencyGraph plus what we learn about the model around it.

``trace`` finds the prunable groups (channels that must be removed together across layers), the
layers that must not be pruned (the classifier, whose width is the class count) and the attention
blocks whose head bookkeeping has to follow the pruned widths.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .errors import GraphError

ROOT_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


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

    @property
    def units(self) -> int:
        """Independently prunable units: channels per block."""
        return self.size // self.ch_groups

    def expand(self, units: list[int] | tuple[int, ...]) -> list[int]:
        """Channel indices of the root for the given unit indices, repeated over blocks."""
        return sorted(u + b * self.units for b in range(self.ch_groups) for u in units)


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
    num_heads: dict[nn.Module, int] = field(default_factory=dict)

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


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    # timm's layout: a fused ``qkv`` projection and ``num_heads``/``head_dim`` attributes.
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    }


def patch_attention(model: nn.Module) -> None:
    """Make ``head_dim`` follow the pruned ``qkv`` width (the scale is kept: it is part of the learned function)."""
    for m in _attention_modules(model).values():
        if hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)


def _channel_groups(dg: tp.DependencyGraph, group: tp.Group, num_heads: dict[nn.Module, int]) -> int:
    blocks = [num_heads[dep.target.module] for dep, _ in group
              if dep.target.module in num_heads and dg.is_out_channel_pruning_fn(dep.handler)]
    return max(blocks, default=1)


def _reroot_attention(dg: tp.DependencyGraph, group: tp.Group, num_heads: dict[nn.Module, int]) -> tp.Group | None:
    # A qkv group rooted at qkv's outputs indexes q, k and v together (3x the width); rooted at the
    # consumer's inputs (the output projection) the indices are one head-dim block each, which is
    # what pruning equally across heads needs. torch-pruning's own pruner does the same.
    if not any(dep.target.module in num_heads and dg.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
        return group
    for dep, idxs in group:
        if isinstance(dep.target.module, ROOT_TYPES) and dg.is_in_channel_pruning_fn(dep.handler):
            return dg.get_pruning_group(dep.target.module, dep.handler, idxs)
    return None


def trace(model: nn.Module, example_input: torch.Tensor, *, protect: tuple[str, ...] = ()) -> CouplingGraph:
    """Build the coupling graph of ``model`` and list its prunable groups."""
    model.eval()
    protected: dict[str, str] = {}
    classifier = find_classifier(model, example_input)
    if classifier is not None:
        protected[classifier] = "classifier (its width is the number of classes)"
    for name in protect:
        protected[name] = "protected by the user"
    attention = _attention_modules(model)
    num_heads = {m.qkv: m.num_heads for m in attention.values()}
    ignored = [model.get_submodule(name) for name in protected]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input[:1], verbose=False)
    except Exception as exc:
        raise GraphError(f"torch-pruning could not trace the model: {type(exc).__name__}: {exc}") from exc

    names = {m: n for n, m in model.named_modules()}
    specs: list[GroupSpec] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        group = _reroot_attention(dg, group, num_heads)
        if group is None:
            continue
        root_dep = group[0].dep
        root = root_dep.target.module
        if root not in names:
            continue
        layers = tuple(dict.fromkeys(names[d.target.module] for d, _ in group if d.target.module in names))
        specs.append(GroupSpec(
            index=len(specs),
            root=names[root],
            handler="out" if dg.is_out_channel_pruning_fn(root_dep.handler) else "in",
            size=len(group[0].idxs),
            ch_groups=_channel_groups(dg, group, num_heads),
            layers=layers,
        ))
    return CouplingGraph(model=model, dg=dg, example_input=example_input[:1], groups=specs,
                         protected=protected, attention=list(attention), num_heads=num_heads)
