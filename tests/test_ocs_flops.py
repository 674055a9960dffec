"""OCSPruner's FLOPs weighting across groups, against MAC arithmetic done by hand on a three-group chain.

The per-unit costs are written out from the layer shapes and torch-pruning's counting rules
(a conv: outputs x inputs x k*k per position; an affine batch norm: 2 per element; a linear:
inputs x outputs + bias), the saliency from the weights; only the coupling comes from torch-pruning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor import criteria, graph, pruning
from compressor.errors import ConfigError

H = W = 4  # input 2 x 4 x 4


class Chain(nn.Module):
    """conv1 3x3 (2->4) -> bn1 -> conv2 3x3 (4->6) -> bn2 -> conv3 1x1 stride 2 (6->5) -> mean -> head (5->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 5, 1, stride=2, bias=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # functional relu and mean: torch-pruning's counter sees modules only
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.conv3(x).mean((2, 3)))


@pytest.fixture
def chain():
    torch.manual_seed(0)
    model = Chain().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
    coupling = graph.trace(model, torch.randn(1, 2, H, W))
    assert {s.root for s in coupling.groups} == {"conv1", "conv2", "conv3"}
    return model, coupling


def _hand_costs() -> dict[str, float]:
    """What one unit of each group saves, over the model's MACs."""
    hw, hw3 = H * W, (H // 2) * (W // 2)  # conv3 has stride 2
    total = (hw * 4 * 2 * 9 + 2 * hw * 4  # conv1, bn1
             + hw * 6 * 4 * 9 + 2 * hw * 6  # conv2, bn2
             + hw3 * 5 * 6  # conv3
             + 5 * 3 + 3)  # head with its bias
    saved = {
        "conv1": hw * 2 * 9 + 2 * hw + hw * 6 * 9,  # its row of conv1, bn1, its column of conv2
        "conv2": hw * 4 * 9 + 2 * hw + hw3 * 5,  # its row of conv2, bn2, its column of conv3
        "conv3": hw3 * 6 + 3,  # its row of conv3, its column of the head
    }
    assert total == 5066 and saved == {"conv1": 1184, "conv2": 628, "conv3": 27}
    return {name: macs / total for name, macs in saved.items()}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _hand_saliency(model: Chain) -> dict[str, np.ndarray]:
    w1, w2, w3, wh = (_np(m.weight) for m in (model.conv1, model.conv2, model.conv3, model.head))
    g1, g2 = _np(model.bn1.weight), _np(model.bn2.weight)
    rows = lambda w: (w**2).reshape(w.shape[0], -1).sum(1)  # noqa: E731
    cols = lambda w: (w**2).sum(axis=tuple(i for i in range(w.ndim) if i != 1))  # noqa: E731
    return {  # slice energy over sqrt(its weights), averaged over the group's slices
        "conv1": (rows(w1) / np.sqrt(2 * 9) + g1**2 + cols(w2) / np.sqrt(6 * 9)) / 3,
        "conv2": (rows(w2) / np.sqrt(4 * 9) + g2**2 + cols(w3) / np.sqrt(5)) / 3,
        "conv3": (rows(w3) / np.sqrt(6) + cols(wh) / np.sqrt(3)) / 2,
    }


def test_channel_costs_are_the_macs_one_unit_saves(chain):
    _, coupling = chain
    hand = _hand_costs()

    costs = pruning.channel_costs(coupling)

    np.testing.assert_allclose(costs, [hand[s.root] for s in coupling.groups], rtol=1e-12)


def test_ocs_flops_weights_each_group_by_one_minus_its_softmax_share(chain):
    model, coupling = chain
    cost = _hand_costs()
    top = max(cost.values())
    exp = {name: np.exp(c / top) for name, c in cost.items()}  # temperature 1: logits cost / max cost
    pi = {name: e / sum(exp.values()) for name, e in exp.items()}
    expected = {name: s * (1 - pi[name]) for name, s in _hand_saliency(model).items()}
    # logits 1, 628/1184, 27/1184: e^1 / (e^1 + e^0.530 + e^0.023) = 0.500, so conv1 keeps half its score
    assert [1 - pi[n] for n in ("conv1", "conv2", "conv3")] == pytest.approx([0.500, 0.688, 0.812], abs=1e-3)

    scores = pruning.score_groups(coupling, criteria.get_criterion("ocs-saliency-flops"))

    for spec, s in zip(coupling.groups, scores):
        np.testing.assert_allclose(_np(s), expected[spec.root], rtol=1e-5)


def test_the_temperature_divides_the_logits(chain):
    model, coupling = chain
    cost = _hand_costs()
    logits = {name: c / max(cost.values()) / 0.25 for name, c in cost.items()}
    pi = {name: np.exp(z) / sum(np.exp(v) for v in logits.values()) for name, z in logits.items()}

    scores = pruning.score_groups(coupling, criteria.get_criterion("ocs-saliency", flops_weighting=True,
                                                                   temperature=0.25))

    for spec, s in zip(coupling.groups, scores):
        np.testing.assert_allclose(_np(s), _hand_saliency(model)[spec.root] * (1 - pi[spec.root]), rtol=1e-5)


def test_the_cost_is_found_whichever_layer_roots_the_group(chain):
    model, coupling = chain
    criterion = criteria.get_criterion("ocs-saliency-flops")
    scores = dict(zip((s.root for s in coupling.groups), pruning.score_groups(coupling, criterion)))
    pruner = coupling.dg.get_pruner_of_module(model.conv2)
    as_inputs_of_conv2 = coupling.dg.get_pruning_group(model.conv2, pruner.prune_in_channels, list(range(4)))

    assert criterion._costs.of(as_inputs_of_conv2) == pytest.approx(_hand_costs()["conv1"])
    torch.testing.assert_close(criterion(as_inputs_of_conv2), scores["conv1"])


def test_weighting_without_costs_says_how_to_get_them(chain):
    model, coupling = chain
    group = coupling.tp_group(coupling.groups[0])

    with pytest.raises(ConfigError, match="set_channel_costs"):
        criteria.get_criterion("ocs-saliency-flops")(group)
    unweighted = criteria.get_criterion("ocs-saliency")
    assert not criteria.needs_channel_costs(unweighted)
    assert unweighted(group) is not None  # the plain saliency needs nothing


class _Recorder:
    """Records what ``score_groups`` hands over."""

    needs_gradients = False

    def __init__(self, needs: bool) -> None:
        self.needs_channel_costs = needs
        self.handed: list[criteria.ChannelCosts] = []

    def set_channel_costs(self, costs: criteria.ChannelCosts) -> None:
        self.handed.append(costs)

    def __call__(self, group) -> torch.Tensor:
        return torch.ones(len(group[0].idxs))


def test_score_groups_hands_the_costs_over_once_and_only_when_declared(chain):
    _, coupling = chain
    declared, undeclared = _Recorder(True), _Recorder(False)

    pruning.score_groups(coupling, declared)
    pruning.score_groups(coupling, undeclared)

    assert undeclared.handed == []
    (costs,) = declared.handed
    hand = _hand_costs()
    np.testing.assert_allclose(costs.fractions, [hand[s.root] for s in coupling.groups], rtol=1e-12)
    for spec in coupling.groups:
        assert costs.index(coupling.tp_group(spec)) == spec.index
