"""Soft channel masks: a pruning plan applied by zeroing, not removing, its channels' weights.

A channel of a coupled group lives in several layers at once: the rows of the convolutions and
linears that produce it, the batch-norm entries that scale it, the columns of the layers that read
it. Zeroing all of them makes the channel contribute exactly nothing, so a masked model computes
what the physically pruned model computes (for networks whose normalisations are per channel), while
the stored values can come back: :meth:`ChannelMask.release` restores them. The cyclical schedule
trains under masks it releases at each cycle's start; OCSPruner's decay shrinks the same slices
gradually instead of zeroing them (:meth:`ChannelMask.scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import GraphError
from .graph import CouplingGraph
from .pruning import PruningPlan

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _entries(graph: CouplingGraph, plan: PruningPlan) -> list[tuple[nn.Parameter | torch.Tensor, int, torch.Tensor]]:
    """(tensor, dimension, indices) of every slice the plan's channels own, across all coupled layers."""
    found = []
    dg = graph.dg
    for g, units in plan.removed.items():
        spec = graph.groups[g]
        if not units:
            continue
        for item in graph.tp_group(spec, spec.expand(units)):
            m, idxs = item.dep.target.module, torch.as_tensor(item.idxs, dtype=torch.long)
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(m, nn.modules.conv._ConvNd):
                transposed = bool(m.transposed)
                depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                if out or depthwise:
                    found.append((m.weight, 1 if transposed else 0, idxs))
                    if m.bias is not None:
                        found.append((m.bias, 0, idxs))
                elif m.groups == 1:
                    found.append((m.weight, 0 if transposed else 1, idxs))
                else:
                    raise GraphError(f"soft masks do not support the grouped convolution in group {spec.root!r}",
                                     hint="use --schedule oneshot or gradual for this model")
            elif isinstance(m, nn.Linear):
                found.append((m.weight, 0 if out else 1, idxs))
                if out and m.bias is not None:
                    found.append((m.bias, 0, idxs))
            elif isinstance(m, _NORMS):
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if p is not None:
                        found.append((p, p.dim() - 1 if isinstance(m, nn.LayerNorm) else 0, idxs))
            elif isinstance(m, nn.Module) and any(True for _ in m.parameters(recurse=False)):
                raise GraphError(f"soft masks do not support {type(m).__name__} layers (group {spec.root!r})",
                                 hint="use --schedule oneshot or gradual for this model")
            elif isinstance(m, nn.Parameter):
                raise GraphError(f"soft masks do not support unwrapped parameters (group {spec.root!r})",
                                 hint="use --schedule oneshot or gradual for this model")
    return found


def _running_stats(graph: CouplingGraph, plan: PruningPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stats = []
    for g, units in plan.removed.items():
        spec = graph.groups[g]
        for item in graph.tp_group(spec, spec.expand(units)) if units else ():
            m = item.dep.target.module
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                idxs = torch.as_tensor(item.idxs, dtype=torch.long)
                stats += [(m.running_mean, idxs), (m.running_var, idxs)]
    return stats


class ChannelMask:
    """The plan's channels of ``graph.model``, masked in place until :meth:`release`."""

    def __init__(self, graph: CouplingGraph, plan: PruningPlan, *, restorable: bool = True) -> None:
        """``restorable=False`` keeps no copy of the masked values (for :meth:`scale` only)."""
        self.plan = plan
        keep: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for tensor, dim, idxs in _entries(graph, plan):
            if id(tensor) not in keep:
                keep[id(tensor)] = (tensor, torch.ones_like(tensor, dtype=torch.bool))
            keep[id(tensor)][1].index_fill_(dim, idxs.to(tensor.device), False)
        self._keep = list(keep.values())
        # Batch-norm statistics of a zeroed channel drift to zero while it trains masked; they come back too.
        self._stats = _running_stats(graph, plan)
        self._saved = [t.detach().clone() for t, _ in self._keep] if restorable else None
        self._saved_stats = [t[i].clone() for t, i in self._stats] if restorable else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t, _ in self._keep]

    @torch.no_grad()
    def zero(self) -> None:
        """Zero the masked entries (again: call after every optimiser step, which may move them)."""
        for tensor, keep in self._keep:
            tensor.mul_(keep)

    @torch.no_grad()
    def scale(self, factor: float) -> None:
        """Multiply the masked entries by ``factor`` (OCSPruner's decay of the prune set)."""
        for tensor, keep in self._keep:
            tensor.copy_(torch.where(keep, tensor, tensor * factor))

    @torch.no_grad()
    def release(self) -> None:
        """Give the masked entries back the values they had when the mask was made."""
        if self._saved is None:
            raise RuntimeError("this mask was made with restorable=False")
        for (tensor, keep), saved in zip(self._keep, self._saved):
            tensor.copy_(torch.where(keep, tensor, saved.to(tensor.device)))
        for (tensor, idxs), saved in zip(self._stats, self._saved_stats):
            tensor[idxs] = saved.to(tensor.device)
