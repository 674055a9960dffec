"""A torch-pruning group read as the weight slices its channels own (helpers of the structured criteria).

Every index of a slice carries the root channel it belongs to (``root_idxs``), which is how one
channel owns several rows (a fused ``qkv``) or a block of columns (a conv flattened into a linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from compressor.tp_compat import graph_of

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Slice:
    kind: str
    """``producer`` (output rows), ``consumer`` (input columns), ``depthwise`` (a per-channel kernel) or ``norm``."""
    module: nn.Module
    idxs: torch.Tensor
    """Indices in the module's own channel dimension."""
    root: torch.Tensor
    """Position in the group's root of the channel each index belongs to."""
    node: object
    """The module's node in the dependency graph."""


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups == m.in_channels == m.out_channels


def slices(group: tp.Group) -> list[Slice]:
    """The group's convolutions, linears and affine norms; a depthwise conv once, however tp lists it."""
    dg = graph_of(group)
    position = {int(r): i for i, r in enumerate(group[0].root_idxs)}
    found: list[Slice] = []
    seen: set[int] = set()
    for item in group:
        dep, m = item.dep, item.dep.target.module
        if any(r is None for r in item.root_idxs):  # tp cannot map these back to the root
            continue
        if isinstance(m, LAYERS):
            if is_depthwise(m):
                if id(m) in seen:
                    continue
                seen.add(id(m))
                kind = "depthwise"
            else:
                kind = "producer" if dg.is_out_channel_pruning_fn(dep.handler) else "consumer"
        elif isinstance(m, NORMS) and getattr(m, "weight", None) is not None:
            kind = "norm"
        else:
            continue
        found.append(Slice(kind, m, torch.as_tensor(item.idxs, dtype=torch.long),
                           torch.as_tensor([position[int(r)] for r in item.root_idxs], dtype=torch.long),
                           dep.target))
    return found


def squared(m: nn.Module) -> torch.Tensor:
    """``||W[c, k]||^2`` over the kernel, as (out channels, inputs per group), on the CPU; transposed convs too."""
    w = m.weight.detach().float().cpu()
    if getattr(m, "transposed", False):  # stored (in, out / groups, ...): make it output-major
        g = m.groups
        w = w.view(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2).reshape(-1, w.shape[0] // g, *w.shape[2:])
    return w.pow(2).reshape(w.shape[0], w.shape[1], -1).sum(2)


def kernel_size(m: nn.Module) -> int:
    return m.weight[0, 0].numel()


def row_energy(m: nn.Module, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Per output channel c: ``sum_k ||W[c, k]||^2 * prev[k]`` (``prev`` over all inputs; None = 1)."""
    sq = squared(m)
    if prev is not None:
        out, per_group = sq.shape
        groups = getattr(m, "groups", 1)
        first = (torch.arange(out) // (out // groups)) * per_group  # each row sees only its group's inputs
        sq = sq * prev[first[:, None] + torch.arange(per_group)]
    return sq.sum(1)


def column_energy(m: nn.Module) -> torch.Tensor:
    """Per input channel k: ``||W[:, k]||^2`` over the output channels that see it."""
    sq = squared(m)
    out, per_group = sq.shape
    groups = getattr(m, "groups", 1)
    return sq.view(groups, out // groups, per_group).sum(1).reshape(-1)


def bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The per-channel gain of a batch norm in eval mode: ``gamma / sqrt(running_var + eps)``."""
    gain = bn.weight.detach().float().cpu() if bn.affine else torch.ones(bn.num_features)
    if bn.running_var is not None:
        gain = gain / (bn.running_var.detach().float().cpu() + bn.eps).sqrt()
    return gain


def to_root(values: torch.Tensor, s: Slice, n: int) -> torch.Tensor:
    """Sum ``values`` (one per index of ``s``) into the root channels they belong to."""
    return torch.zeros(n).index_add_(0, s.root, values)
