"""OCSPruner's group saliency (Ghimire et al., WACV 2026), after its official ``GroupNormV2Importance``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from compressor.criteria import ChannelCosts
from compressor.errors import ConfigError

from ._slices import column_energy, kernel_size, slices, squared, to_root


@dataclass(frozen=True)
class OCSOptions:
    """``ocs-saliency-flops``' options (``--criterion-opt KEY=VALUE``)."""

    temperature: float = 1.0
    """Of the softmax over groups' channel costs: lower values prune the costly groups more."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature:g}")


class OCSSaliency:
    """OCSPruner group saliency: each coupled slice's squared norm over sqrt(its size), averaged.

    For channel c of a group with coupled slices D_g (PAPERS.md section 1):

        S(c) = (1 / |D_g|) * ( sum_producers ||W[c, :]||^2 / sqrt(n)
                               + sum_consumers ||W[:, c]||^2 / sqrt(n) + sum_BN gamma_c^2 )

    with n the number of weights in the slice: every row, or every column, that tp maps to channel c
    (the h*w columns of a flatten, the q, k and v rows of a fused qkv). A depthwise conv is one slice
    (its kernel, n = k*k). Layer norms do not count, as in the official code: their gamma^2 ~ 1 would
    dwarf the weight terms of the one group that has them in a transformer. Scores are not
    normalised per group: 1/sqrt(n) and 1/|D_g| put groups on one scale, as in the paper.

    ``flops_weighting=True`` adds the paper's optional weighting across groups (registered as
    ``ocs-saliency-flops``): ``S'(c) = S(c) * (1 - pi_g)`` with

        pi_g = softmax_g( cost_g / (temperature * max_h cost_h) )

    and cost_g the MACs one unit of group g costs, measured by the pipeline (criteria
    ``needs_channel_costs``). The official code takes softmax(MACs / 1e6), which depends on the input
    resolution and the model's size: on its CIFAR models (32x32) the costliest channel is worth about
    1M MACs (ResNet-20, VGG-16; 2.8M on ResNet-56), so its logits span about [0, 1]; at 16x16 they are
    4x smaller and the weighting nearly uniform, at 224x224 49x larger and the costliest group takes
    nearly all of pi. Dividing by the largest cost keeps the logits in [0, 1 / temperature] at any
    scale: temperature 1 gives the official weights within 0.01 on ResNet-20 and VGG-16 at 32x32
    (1 - pi from 0.83 to 0.93 on ResNet-20), 0.36 those of ResNet-56, and lower values favour pruning
    the costly groups more. (Dividing by the mean cost instead lets one outlier group, 7x the mean in
    MobileNetV2, keep 7% of its score.) As pi sums to 1 over the groups, the weighting is milder the
    more groups a model has, as in the paper.
    """

    needs_gradients = False
    needs_channel_costs = False

    def __init__(self, *, flops_weighting: bool = False, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ConfigError(f"ocs-saliency: temperature must be positive, got {temperature:g}")
        self.flops_weighting = flops_weighting
        self.needs_channel_costs = flops_weighting
        self.temperature = temperature
        self._costs: ChannelCosts | None = None
        self._keep: torch.Tensor | None = None  # 1 - pi, per group

    def set_channel_costs(self, costs: ChannelCosts) -> None:
        self._costs = costs
        cost = torch.tensor(costs.fractions, dtype=torch.float64)
        top = float(cost.max()) if len(cost) else 0.0
        if top > 0:
            pi = torch.softmax(cost / (self.temperature * top), 0)
        else:  # nothing measurable to weigh by
            pi = torch.full_like(cost, 1 / max(len(cost), 1))
        self._keep = 1 - pi

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        scores = self._saliency(group)
        if not self.flops_weighting or scores is None:
            return scores
        if self._costs is None:
            raise ConfigError("ocs-saliency with FLOPs weighting needs every group's channel cost: score through "
                              "compressor.pruning.score_groups, or call set_channel_costs first")
        return scores * float(self._keep[self._costs.index(group)])

    def _saliency(self, group: tp.Group) -> torch.Tensor | None:
        n = len(group[0].idxs)
        total, count = torch.zeros(n), 0
        for s in slices(group):
            if s.kind == "norm":
                if not isinstance(s.module, nn.modules.batchnorm._BatchNorm):
                    continue
                total += to_root(s.module.weight.detach().float().cpu()[s.idxs] ** 2, s, n)
            else:
                sq = squared(s.module)
                if s.kind == "consumer":  # a column meets every output that reads the channel
                    energy, size = column_energy(s.module), sq.shape[0] // getattr(s.module, "groups", 1)
                else:  # producer rows, or a depthwise kernel
                    energy, size = sq.sum(1), sq.shape[1]
                elements = to_root(torch.full((len(s.idxs),), float(size * kernel_size(s.module))), s, n)
                total += to_root(energy[s.idxs], s, n) / elements.clamp(min=1).sqrt()
            count += 1
        return total / count if count else None


class OCSSaliencyFLOPs(OCSSaliency):
    """OCSPruner group saliency times (1 - pi_g), pi a softmax over groups of one channel's MACs."""

    needs_channel_costs = True
    Options = OCSOptions

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__(flops_weighting=True, temperature=temperature)
