"""OCSPruner's group saliency (Ghimire et al., WACV 2026), after its official ``GroupNormV2Importance``."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from ._slices import column_energy, kernel_size, slices, squared, to_root


class OCSSaliency:
    """OCSPruner group saliency: each coupled slice's squared norm over sqrt(its size), averaged.

    For channel c of a group with coupled slices D_g (PAPERS.md section 1):

        S(c) = (1 / |D_g|) * ( sum_producers ||W[c, :]||^2 / sqrt(n)
                               + sum_consumers ||W[:, c]||^2 / sqrt(n) + sum_BN gamma_c^2 )

    with n the number of weights in the slice: every row, or every column, that tp maps to channel c
    (the h*w columns of a flatten, the q, k and v rows of a fused qkv). A depthwise conv is one slice
    (its kernel, n = k*k). Layer norms do not count, as in the official code: their gamma^2 ~ 1 would
    dwarf the weight terms of the one group that has them in a transformer. Scores are not
    normalised per group: 1/sqrt(n) and 1/|D_g| put groups on one scale, as in the paper. The
    paper's optional FLOPs weighting across groups is not implemented.
    """

    needs_gradients = False

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
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
