"""Layouts torch-pruning alone gets wrong, on tiny models: nn.MultiheadAttention with a class token,
and grouped convolutions. (ShuffleNet's channel shuffle is in ``test_torchvision.py``.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import criteria, graph, pruning
from compressor.errors import GraphError, TargetUnreachableError

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


# -- layouts found on timm's zoo (tests/test_timm.py) ----------------------------------------------------


class CrossStage(nn.Module):
    """A cross-stage-partial block (timm's CSPNet ``CrossStage3``): a split, one half through a residual
    block, concatenated back. torch-pruning cannot infer the width of the residual add at the
    concatenation (its trace ends in a TypeError, summing None)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv_exp = nn.Conv2d(32, 64, 1)
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.transition = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv_exp(torch.relu(self.stem(x))).split(32, dim=1)
        x1 = self.block(x1) + x1
        return self.head(self.transition(torch.cat([x1, x2], dim=1)).mean((2, 3)))


class BiaslessGroupNorm(nn.Module):
    """A GroupNorm with a weight and no bias (timm's MetaFormer norms): torch-pruning's pruner indexes the bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.norm = nn.GroupNorm(1, 64)
        self.norm.register_parameter("bias", None)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.norm(self.conv(x)))).mean((2, 3)))


class MultiplierDepthwise(nn.Module):
    """A depthwise convolution with a channel multiplier (FastViT's, MobileOne's): groups == in_channels
    < out_channels, which torch-pruning prunes as a plain convolution (an IndexError when scored)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.body = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.dw(self.conv(x))).mean((2, 3)))


def _stock(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def test_a_concatenation_of_unknown_widths_no_longer_ends_the_trace():
    model, example = CrossStage().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError):  # stock torch-pruning: sum() over a None width
        _stock(model, example)
    coupling = graph.trace(model, example)
    for name in ("conv_exp", "block.0"):  # the split's and the residual's channels: left unpruned, named
        assert "concatenation" in coupling.protected[name]
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    with pytest.raises(TargetUnreachableError, match=r"left unpruned: conv_exp \(its channels meet a concatenation"):
        pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)
    pruned, result = pruning.search(coupling, scores, target_ratio=0.75, max_prune_fraction=0.75)
    assert 0.7425 <= result.achieved_ratio <= 0.75
    assert pruned(example).shape == (1, 3)


def test_a_groupnorm_without_bias_is_pruned():
    model, example = BiaslessGroupNorm().eval(), torch.randn(1, 3, 16, 16)
    coupling, pruned, result = _prune_half(model, example)
    assert "conv" in {s.root for s in coupling.groups}
    assert 0.48 <= result.achieved_ratio <= 0.5
    assert pruned.norm.weight.shape[0] == pruned.norm.num_channels < 64 and pruned.norm.bias is None
    assert pruned(example).shape == (1, 3)


def test_channels_into_a_depthwise_convolution_with_a_multiplier_are_protected_and_named():
    model, example = MultiplierDepthwise().eval(), torch.randn(1, 3, 16, 16)
    coupling = graph.trace(model, example)
    assert "depthwise convolution with a channel multiplier" in coupling.protected["conv"]
    assert "dw" in coupling.protected["conv"]
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))  # stock: IndexError in the importance
    pruned, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)
    assert 0.495 <= result.achieved_ratio <= 0.5
    assert pruned.conv.out_channels == 8


class _GradOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("this block runs only without autograd")
        return x


def test_a_forward_failing_in_the_trace_names_the_module_and_the_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _GradOnly(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(GraphError) as caught:
        graph.trace(model.eval(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "in the forward of module 1" in message and "raise RuntimeError" in message
    assert "RuntimeError: this block runs only without autograd" in message
    assert "\n" not in message


class Ghost(nn.Module):
    """A ghost module in miniature (GhostNet V2/V3): a primary convolution, a depthwise map of its output,
    the two concatenated (each primary channel reaches the concatenation twice) and gated by a
    convolution of the block's input (the DFC attention), which torch-pruning takes as the group's root."""

    def __init__(self, init: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 2 * init, 1)
        self.primary = nn.Conv2d(8, init, 1)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init)
        self.mix = nn.Conv2d(2 * init, 8, 1)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        gate = self.gate(x).sigmoid()
        y = self.primary(x)
        x = self.mix(torch.cat([y, self.cheap(y)], dim=1) * gate).relu()
        return self.head(x.mean((2, 3)))


class TwoBranches(nn.Module):
    """A concatenation of two independent convolutions: no channel reaches it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.cat([self.a(x), self.b(x)], dim=1)).relu()
        return self.head(x.mean((2, 3)))


def test_a_channel_that_reaches_a_concatenation_twice_is_one_unit():
    torch.manual_seed(0)
    model, example = Ghost().eval(), torch.randn(1, 1, 8, 8)
    coupling = graph.trace(model, example)
    ghost = next(s for s in coupling.groups if "primary" in s.layers)
    assert (ghost.root, ghost.units) == ("primary", 8)  # not the 16 inputs of mix, each channel counted twice
    assert {"cheap", "mix", "gate"} <= set(ghost.layers)
    # The cap counts real channels: three quarters of the primary's 8 can go, both copies each time.
    floor = pruning.floor(coupling, max_prune_fraction=0.75, round_to=1)
    assert not floor.unsafe
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    pruned, result = pruning.search(coupling, scores, target_ratio=floor.ratio + 0.01, max_prune_fraction=0.75)
    assert pruned.primary.out_channels == pruned.cheap.out_channels == 2
    assert pruned.mix.in_channels == pruned.gate.out_channels == 4
    assert pruned(example).shape == (1, 3)


def test_a_concatenation_of_independent_channels_keeps_its_root():
    coupling = graph.trace(TwoBranches().eval(), torch.randn(1, 1, 8, 8))
    roots = {s.root: s.units for s in coupling.groups}
    assert roots.get("a") == 4 and roots.get("b") == 4  # each branch its own group, as before


class CachingBias(nn.Module):
    """EfficientFormer's attention in miniature: in eval mode a bias computed from a parameter is cached
    in a dict, so the traced forward leaves a tensor with autograd history on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(8))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.cache.get("b")
        if b is None:
            b = self.bias * 2
            if torch.is_grad_enabled():  # only the traced forward fills it, here
                self.cache["b"] = b
        return self.head(self.conv(x).mean((2, 3)) + b)


def test_tensors_cached_by_the_traced_forward_do_not_stop_the_search():
    model, example = CachingBias().eval(), torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        expected = model(example)
    coupling = graph.trace(model, example)
    assert not model.cache  # dropped: it carried autograd history, and deep copies refuse such tensors
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    pruned, _ = pruning.search(coupling, [torch.ones_like(s) for s in scores], target_ratio=0.99, max_prune_fraction=0.75)
    assert pruned(example).shape == (1, 3) and torch.allclose(model(example), expected)


def _densenet_block() -> nn.Module:
    """Concatenations that grow: each layer reads every earlier output (DenseNet), so a group's channels
    sit at offsets that the groups before it change."""

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
            self.b = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
            self.c = nn.Sequential(nn.BatchNorm2d(48), nn.ReLU(), nn.Conv2d(48, 32, 1))
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = torch.cat([x, self.a(x)], 1)
            x = torch.cat([x, self.b(x)], 1)
            return self.head(self.c(x).mean((2, 3)))

    return Dense()


@pytest.mark.parametrize(("make", "heads"), [
    (_densenet_block, False), (lambda: TinyMHA(), False), (lambda: TinyMHA(), True), (lambda: MultiplierDepthwise(), False),
    (lambda: CrossStage(), False), (lambda: Ghost(), False),
], ids=["concatenations", "attention-dims", "attention-heads", "depthwise", "cross-stage", "ghost"])
def test_a_probe_copy_is_the_prune_the_graph_makes(make, heads):
    """The search's probes cut a bare copy of the model from each group's walk of the unpruned graph; the
    run prunes by the graph, group after group. Both must give the same model, parameter for parameter."""
    from compressor.prune.apply import probe_copy
    from compressor.prune.plan import _chunks, _plan

    torch.manual_seed(0)
    model = make().eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    example = torch.randn(1, first.in_channels, 16, 16)
    coupling = graph.trace(model, example, attention_pruning="heads" if heads else "dims")
    g = torch.Generator().manual_seed(1)
    order = _chunks(coupling.groups, [torch.rand(s.units, generator=g) for s in coupling.groups], max_fraction=0.75,
                    round_to=1)
    assert len({c[0] for c in order}) >= 2  # plans that prune several groups at once
    for cut in (len(order) // 3, 2 * len(order) // 3, len(order)):
        plan = _plan(order[:cut])
        fast, slow = probe_copy(coupling, plan), pruning.pruned_copy(coupling, plan)
        assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in slow.state_dict().items()}
        for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
            assert torch.equal(a, b), name
        with torch.no_grad():
            try:
                expected = slow(example)
            except RuntimeError:  # a plan that breaks the model (the search leaves such groups out) breaks both
                with pytest.raises(RuntimeError):
                    fast(example)
                continue
            assert torch.equal(fast(example), expected)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in make().parameters())  # untouched
