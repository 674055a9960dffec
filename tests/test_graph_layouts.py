"""Layouts torch-pruning alone gets wrong, on tiny models: nn.MultiheadAttention with a class token,
and grouped convolutions. (ShuffleNet's channel shuffle is in ``test_torchvision.py``.)"""

from __future__ import annotations

import torch
from torch import nn

from compressor import criteria, graph, pruning

from helpers_arch import HardCodedWidth


class TinyMHA(nn.Module):
    """A ViT in miniature, torchvision's layout: conv patches, a class token, nn.MultiheadAttention."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(1, dim, 4, stride=4)
        self.hidden_dim = dim
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x[:, 0])


def _prune_half(model: nn.Module, example: torch.Tensor):
    coupling = graph.trace(model, example)
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    return coupling, *pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)


def test_multihead_attention_prunes_head_dims_alike_and_keeps_its_attributes_in_step():
    torch.manual_seed(0)
    model = TinyMHA().eval()
    example = torch.randn(1, 1, 16, 16)

    coupling, pruned, result = _prune_half(model, example)

    assert coupling.attention == ["attn"]
    stream = next(s for s in coupling.groups if "attn" in s.layers)
    assert stream.ch_groups == 4 and "conv_proj" in stream.layers
    assert [(p.shape, d) for p, d in coupling.dg.unwrapped_parameters] == [(torch.Size([1, 1, 32]), 2)]
    assert 0.495 <= result.achieved_ratio <= 0.5
    attn = pruned.attn
    assert attn.embed_dim == attn.out_proj.out_features == pruned.class_token.shape[-1] == pruned.hidden_dim
    assert attn.embed_dim % 4 == 0 and attn.head_dim == attn.embed_dim // 4
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_grouped_convolutions_lose_the_same_channels_in_every_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3)).eval()

    coupling, pruned, result = _prune_half(model, torch.randn(1, 1, 12, 12))

    assert {s.ch_groups for s in coupling.groups if "2" in s.layers} == {4}
    assert pruned[2].groups == 4 and pruned[2].in_channels % 4 == 0
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, 12, 12)).shape == (2, 3)


def test_a_group_that_breaks_the_forward_is_left_unpruned_and_reported():
    torch.manual_seed(0)
    model = HardCodedWidth().eval()
    example = torch.randn(1, 1, 8, 8)

    coupling, pruned, result = _prune_half(model, example)

    assert {s.root for s in coupling.groups} == {"conv0", "conv1"}
    assert len(result.unsafe_groups) == 1 and result.unsafe_groups[0].startswith("conv1: RuntimeError")
    assert pruned.conv1.out_channels == 16 and pruned.conv0.out_channels < 256
    assert 0.495 <= result.achieved_ratio <= 0.5
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 3)
