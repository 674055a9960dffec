"""Stage-level tests of tracing, scoring, the FLOPs search and the FLOPs counter, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressor import criteria, flops, graph, pruning
from compressor.errors import GraphError, TargetUnreachableError
from compressor.models import create_model
from _tiny import IMAGE_SIZE, NUM_CLASSES, tiny_resnet20

CAP = 0.75


def _example(size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def coupling() -> graph.CouplingGraph:
    return graph.trace(tiny_resnet20(), _example())


@pytest.fixture
def scores(coupling) -> list[torch.Tensor]:
    return pruning.score_groups(coupling, criteria.get_criterion("l2"))


def _search(coupling, scores, target: float, cap: float = CAP, **kwargs):
    return pruning.search(coupling, scores, target_ratio=target, max_prune_fraction=cap, **kwargs)


# -- the search ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_search_lands_within_one_percent_below_the_target(coupling, scores, target):
    pruned, result = _search(coupling, scores, target)

    assert pruning.TOLERANCE == 0.01
    assert target * 0.99 <= result.achieved_ratio <= target
    measured = flops.measure(pruned, coupling.example_input)
    assert measured == result.pruned
    assert result.original == flops.measure(coupling.model, coupling.example_input)
    assert result.achieved_ratio == pytest.approx(measured.macs / result.original.macs)
    assert result.pruned.params < result.original.params
    assert result.target_ratio == target
    assert result.min_reachable_ratio < target
    with torch.no_grad():
        out = pruned(torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (3, NUM_CLASSES) and torch.isfinite(out).all()


def test_lower_targets_remove_more(coupling, scores):
    params = [_search(coupling, scores, t)[1].pruned.params for t in (0.7, 0.5, 0.3)]
    assert params[0] > params[1] > params[2]


def test_the_plan_reproduces_the_returned_model(coupling, scores):
    pruned, result = _search(coupling, scores, 0.5)
    again = pruning.pruned_copy(coupling, result.plan)

    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    x = torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))


def test_layer_changes_match_the_pruned_modules(coupling, scores):
    pruned, result = _search(coupling, scores, 0.5)

    assert [c.group for c in result.layers] == [g.root for g in coupling.groups]
    assert any(c.after < c.before for c in result.layers)
    for spec, change in zip(coupling.groups, result.layers):
        assert change.before == spec.size
        assert spec.handler == "out"  # every group of a ResNet is rooted at a convolution's outputs
        assert pruned.get_submodule(spec.root).out_channels == change.after


def test_search_reports_each_probe(coupling, scores):
    seen: list[tuple[int, float]] = []
    _, result = _search(coupling, scores, 0.5, on_probe=lambda n, r: seen.append((n, r)))

    assert seen, "on_probe was never called"
    assert max(n for n, _ in seen) == result.probes
    assert all(0 < r < 1 for _, r in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def test_search_does_not_modify_the_original(coupling, scores):
    model = coupling.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {name: (m.in_channels, m.out_channels) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    pruned, _ = _search(coupling, scores, 0.5)

    assert pruned is not model
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert shapes == {name: (m.in_channels, m.out_channels) for name, m in model.named_modules()
                      if isinstance(m, nn.Conv2d)}


# -- what must never be pruned, and how far ------------------------------------------------------------


def test_classifier_is_protected(coupling, scores):
    assert list(coupling.protected) == ["fc"]
    assert "classifier" in coupling.protected["fc"]
    assert all(spec.root != "fc" for spec in coupling.groups)

    pruned, _ = _search(coupling, scores, 0.3)

    assert pruned.fc.out_features == NUM_CLASSES
    assert pruned.fc.in_features < 64  # its inputs follow the pruned channels


def test_user_protected_layer_keeps_its_width():
    coupling = graph.trace(tiny_resnet20(), _example(), protect=("layers.0.conv1",))
    assert coupling.protected["layers.0.conv1"] == "protected by the user"
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))

    pruned, _ = _search(coupling, scores, 0.5)

    assert pruned.get_submodule("layers.0.conv1").out_channels == 16


@pytest.mark.parametrize("cap", [0.5, CAP])
def test_no_group_loses_more_than_the_cap(coupling, scores, cap):
    floor = _search(coupling, scores, 0.9, cap)[1].min_reachable_ratio
    # Just above the smallest reachable ratio, most groups are pruned to their cap.
    pruned, result = _search(coupling, scores, min(floor + 0.01, 0.99), cap)

    at_cap = 0
    for spec, change in zip(coupling.groups, result.layers):
        kept = pruned.get_submodule(spec.root).out_channels
        assert kept == change.after
        assert kept >= math.ceil(spec.size * (1 - cap)), spec.root
        at_cap += kept == spec.size - math.floor(spec.size * cap)
    assert at_cap > 0, "the cap never bound, so this test checked nothing"


def test_unreachable_target_names_the_smallest_reachable_ratio(coupling, scores):
    floor = _search(coupling, scores, 0.5)[1].min_reachable_ratio
    assert 0.01 < floor < 0.5

    with pytest.raises(TargetUnreachableError) as info:
        _search(coupling, scores, 0.01)

    assert f"{floor:.3f}" in str(info.value)
    assert "0.01" in str(info.value)
    assert info.value.hint and "--max-prune-per-group" in info.value.hint


SPARED = "layers.6.conv1"


@pytest.fixture
def abstaining_scores(coupling) -> list[torch.Tensor]:
    """l2 scores, except that the criterion abstains (returns None) on the group rooted at SPARED."""
    l2 = criteria.get_criterion("l2")

    def abstain_on_one(group):
        return None if group[0].dep.target.module is coupling.module(SPARED) else l2(group)

    return pruning.score_groups(coupling, abstain_on_one)


def test_abstaining_criterion_ranks_its_group_last(coupling, abstaining_scores):
    spared = abstaining_scores[[g.root for g in coupling.groups].index(SPARED)]
    others = torch.cat([s for g, s in zip(coupling.groups, abstaining_scores) if g.root != SPARED])
    assert spared.min() > others.max()

    pruned, result = _search(coupling, abstaining_scores, 0.4)

    assert pruned.get_submodule(SPARED).out_channels == 64
    assert 0.4 * 0.99 <= result.achieved_ratio <= 0.4


def test_abstaining_criterion_never_prunes_its_group(coupling, abstaining_scores):
    floor = _search(coupling, abstaining_scores, 0.9)[1].min_reachable_ratio

    pruned, _ = _search(coupling, abstaining_scores, min(floor + 0.01, 0.99))

    assert pruned.get_submodule(SPARED).out_channels == 64


def test_criterion_with_wrong_score_count_is_rejected(coupling):
    with pytest.raises(GraphError, match="scores for group"):
        pruning.score_groups(coupling, lambda group: torch.ones(3))


# -- the ViT's attention bookkeeping ---------------------------------------------------------------------


def test_vit_head_dim_follows_the_pruned_qkv():
    torch.manual_seed(0)
    model = create_model("vit_tiny", num_classes=NUM_CLASSES, in_channels=1, image_size=IMAGE_SIZE).eval()
    coupling = graph.trace(model, _example())
    assert len(coupling.attention) == 4
    attention_groups = [g for g in coupling.groups if g.ch_groups > 1]
    assert attention_groups and all(g.ch_groups == 4 for g in attention_groups)
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))

    pruned, result = _search(coupling, scores, 0.5)

    assert 0.495 <= result.achieved_ratio <= 0.5
    head_dims = []
    for name in coupling.attention:
        attn = pruned.get_submodule(name)
        assert attn.num_heads == 4
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
        assert attn.proj.in_features == attn.num_heads * attn.head_dim
        head_dims.append(attn.head_dim)
    assert min(head_dims) < 96 // 4, "no attention block was pruned, so head_dim was never exercised"
    for name in coupling.attention:  # the original keeps its heads
        assert model.get_submodule(name).head_dim == 96 // 4
    with torch.no_grad():
        out = pruned(torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (3, NUM_CLASSES) and torch.isfinite(out).all()


# -- the FLOPs counter -----------------------------------------------------------------------------------


def test_flops_of_a_hand_built_net_match_a_hand_count():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # 4 out x 8x8 positions x (1 x 3x3)
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise: 4 x 8x8 x (1 x 3x3)
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),  # 6 x 4x4 x (4 x 3x3)
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3, bias=False),  # 96 x 3
    )
    macs = 4 * 8 * 8 * 9 + 4 * 8 * 8 * 9 + 6 * 4 * 4 * 4 * 9 + 96 * 3
    params = 4 * 9 + 4 * 9 + 6 * 4 * 9 + 96 * 3

    net.train()
    cost = flops.measure(net, torch.randn(5, 1, 8, 8))  # counted on one image whatever the batch

    assert cost == flops.Cost(macs=macs, params=params)
    assert flops.count_params(net) == params
    assert net.training, "measure() must restore the training mode"


def test_flops_scale_with_the_input_size():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False))
    assert flops.measure(net, torch.randn(1, 1, 8, 8)).macs == 4 * 8 * 8 * 9
    assert flops.measure(net, torch.randn(1, 1, 16, 16)).macs == 4 * 16 * 16 * 9


# -- hardware-friendly widths ------------------------------------------------------------------------------


@pytest.mark.parametrize(("round_to", "target"), [(8, 0.4), (8, 0.6), (16, 0.5), (16, 0.7)])
def test_rounded_widths_are_multiples_and_the_target_is_still_met(coupling, scores, round_to, target):
    pruned, result = _search(coupling, scores, target, round_to=round_to)

    assert target * (1 - pruning.TOLERANCE) <= result.achieved_ratio <= target
    assert result.round_to == round_to
    assert len(result.off_multiple) <= 1
    changed = [c for c in result.layers if c.after < c.before]
    assert changed, "nothing was pruned, so rounding was never exercised"
    for change in changed:
        kept = pruned.get_submodule(change.group).out_channels
        assert kept == change.after
        assert kept % round_to == 0 or change.group in result.off_multiple, (change.group, kept)
        assert kept >= math.ceil(change.before * (1 - CAP))


class DenseConcat(nn.Module):
    """Concatenations whose inputs are pruned by other groups: index bookkeeping (offsets) that a probe's
    copy must carry over from the original's graph, and not change in it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 12, 3, padding=1)
        self.a = nn.Conv2d(12, 10, 3, padding=1)
        self.b = nn.Conv2d(22, 14, 3, padding=1)
        self.mix = nn.Conv2d(36, 16, 1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.a(x))], 1)
        x = torch.cat([x, torch.relu(self.b(x))], 1)
        return self.fc(self.mix(x).mean((2, 3)))


@pytest.mark.parametrize("build", [DenseConcat, lambda: create_model("vit_tiny", in_channels=1, image_size=IMAGE_SIZE)],
                         ids=["dense-concat", "vit_tiny"])
def test_a_probe_copy_is_pruned_as_a_traced_copy_and_leaves_the_original_alone(build):
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    coupling = graph.trace(model, example[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = pruning._chunks(coupling.groups, pruning.score_groups(coupling, criteria.get_criterion("l2")),
                            max_fraction=0.75, round_to=1)
    for plan in (pruning._plan(order), pruning._plan(order[: len(order) // 2]), pruning._plan(order)):
        fast, traced = pruning.pruned_copy(coupling, plan), pruning.pruned_copy_by_tracing(coupling, plan)
        fast_state, traced_state = fast.state_dict(), traced.state_dict()
        assert fast_state.keys() == traced_state.keys()
        for key in fast_state:
            torch.testing.assert_close(fast_state[key], traced_state[key], rtol=0, atol=0, msg=key)
        with torch.no_grad():
            torch.testing.assert_close(fast(example), traced(example), rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


@pytest.mark.parametrize(("low_units", "small_first"), [(5, True), (4, False), (3, False)])
def test_a_rounded_chunk_goes_once_most_of_its_units_rank_low(low_units, small_first):
    """Rounding to the nearest multiple: a 16-channel group's one removable chunk (8 units) ranks by its median
    unit, so it goes before a large group's middling chunks once 5 of its 8 units score low, not only when all
    8 do (which rounded every small group up and made the large ones give twice as much)."""
    small = graph.GroupSpec(index=0, root="small", handler="out", size=16, ch_groups=1, layers=("small",))
    large = graph.GroupSpec(index=1, root="large", handler="out", size=64, ch_groups=1, layers=("large",))
    scores = [torch.tensor([0.1] * low_units + [1.0] * (16 - low_units)), torch.full((64,), 0.5)]

    order = pruning._chunks([small, large], scores, max_fraction=0.75, round_to=8)

    assert [len(units) for _, units in order] == [8] * 7  # one chunk of the small group, six of the large
    first_small = [g for g, _ in order].index(0)
    assert first_small == (0 if small_first else 6)
    assert set(order[first_small][1]) == set(range(8))  # its eight lowest-scored units
