"""LAP, lookahead pruning (Park et al., ICLR 2020), adapted from weights to the channels of a group.

LAP scores a weight by its magnitude times the norms of the weights one layer back and one layer
ahead. For channel c of a coupled group (PAPERS.md section 2):

    S(c) = sqrt( D[c] * sum_producers b[c]^2 sum_k ||W[c, k]||^2 P[k] ) * sqrt( sum_consumers ||W[:, c]||^2 )

- producers: the group's layers whose output rows are channel c; consumers: those whose input
  columns are (after a flatten, the whole h*w block of columns tp maps to c);
- b: the gain gamma / sqrt(running_var + eps) of a batch norm directly after the layer (1 if none);
- D[c]: the path through depthwise convolutions of the group, b^2 ||K_c||^2 per depthwise conv, since
  a 1x1 conv followed by a depthwise one is one conv whose row norms multiply;
- P[k]: the same producer side, one step back, for input k of the producer: the squared (BN-folded)
  rows of the layers right behind it, summed where several feed it (a residual sum); 1 where
  nothing does (the network input).

Layer norms are not folded (they are not a per-channel gain of one path). Scores are divided by
their mean within the group, so that the global ranking compares groups on one scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from compressor.tp_compat import graph_of, node_of

from ._slices import LAYERS, Slice, bn_factor, column_energy, is_depthwise, row_energy, slices, squared, to_root


class Lookahead:
    """LAP for channels: incoming rows (BN folded, one layer back) times outgoing columns.

    The producer and consumer terms are multiplied, not added as in torch-pruning's group norm, so
    a channel that nothing downstream reads scores zero whatever its own weights.
    """

    needs_gradients = False

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        dg, n = graph_of(group), len(group[0].idxs)
        parts = slices(group)
        if not any(s.kind != "norm" for s in parts):
            return None
        incoming, _ = _path_energy(parts, n, lookback=lambda layer: _input_energy(dg, layer))
        consumers = [s for s in parts if s.kind == "consumer"]
        outgoing = sum((to_root(column_energy(s.module)[s.idxs], s, n) for s in consumers), torch.zeros(n))
        if not consumers:  # the network's output side: no lookahead
            outgoing = torch.ones(n)
        score = incoming.sqrt() * outgoing.sqrt()
        return score / score.mean()


def _path_energy(parts: list[Slice], n: int, *, lookback: Callable[[nn.Module], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per root channel: the squared norm of its incoming path (1 if nothing feeds it), and whether anything does."""
    gains = {id(s.node.inputs[0].module): bn_factor(s.module) for s in parts
             if s.kind == "norm" and isinstance(s.module, nn.modules.batchnorm._BatchNorm) and len(s.node.inputs) == 1}
    total, through = torch.zeros(n), torch.ones(n)
    fed, passed = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    for s in parts:
        if s.kind == "producer":
            energy = row_energy(s.module, lookback(s.module) if lookback else None)[s.idxs]
        elif s.kind == "depthwise":
            energy = squared(s.module).sum(1)[s.idxs]
        else:
            continue
        gain = gains.get(id(s.module))
        if gain is not None:
            energy = energy * gain[s.idxs] ** 2
        if s.kind == "producer":
            total += to_root(energy, s, n)
            fed[s.root] = True
        else:
            through[s.root] = through[s.root] * energy
            passed[s.root] = True
    return torch.where(fed, total, torch.ones(n)) * through, fed | passed


def _behind(layer_node) -> set:
    """The nodes from a layer back to the weighted layers right behind it, inclusive (through depthwise convs)."""
    seen, stack = set(), list(layer_node.inputs)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not (isinstance(node.module, LAYERS) and not is_depthwise(node.module)):
            stack.extend(node.inputs)
    return seen


def _full_group(dg: tp.DependencyGraph, layer: nn.Module, *, inputs: bool) -> tp.Group:
    pruner = dg.get_pruner_of_module(layer)
    if inputs:
        return dg.get_pruning_group(layer, pruner.prune_in_channels, list(range(dg.get_in_channels(layer))))
    return dg.get_pruning_group(layer, pruner.prune_out_channels, list(range(dg.get_out_channels(layer))))


def _input_energy(dg: tp.DependencyGraph, layer: nn.Module) -> torch.Tensor:
    """P for every input of ``layer``: the incoming path energy of the channel feeding it (1 if none)."""
    n_in = dg.get_in_channels(layer)
    behind = _behind(node_of(dg, layer))
    parts = [s for s in slices(_full_group(dg, layer, inputs=True)) if s.node in behind]
    energy, covered = _path_energy(parts, n_in)
    # Rooted at the inputs, tp keeps one input per feeding channel where a channel feeds several (a
    # flatten into a linear); rooted at the feeding layer, each of them is listed: fill those from there.
    done: set[int] = set()
    for feeder in [s.module for s in parts if s.kind != "norm"]:
        if covered.all():
            break
        if id(feeder) in done:
            continue
        view = slices(_full_group(dg, feeder, inputs=False))
        done.update(id(s.module) for s in view)
        upstream = [s for s in view if s.node in behind]
        channel_energy, channel_covered = _path_energy(upstream, dg.get_out_channels(feeder))
        for s in view:
            if s.module is layer and s.kind == "consumer":
                fill = ~covered[s.idxs] & channel_covered[s.root]
                energy[s.idxs[fill]] = channel_energy[s.root[fill]]
                covered[s.idxs[fill]] = True
    return torch.where(covered, energy, torch.ones(n_in))
