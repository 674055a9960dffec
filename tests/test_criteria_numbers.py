"""The criteria's numbers against hand computations on toy networks with hand-set weights.

The expected values are written out with numpy from the weights below, independently of the
plug-ins' code; only the group (which layers are coupled) comes from torch-pruning.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from compressor import criteria, graph, pruning
from compressor.pipeline import calibrate
from compressor.data import LoadedData

# -- a residual toy: conv1 -> bn1 -> relu -> conv2 -> bn2, plus a shortcut conv, flatten, fc1, head ------------

W1 = np.array([[1, 2], [0, 1], [2, -1]], dtype=float)  # conv1 1x1, 2 -> 3
G1, V1 = np.array([1, 2, 0.5]), np.array([4, 1, 0.25])  # bn1: gain b1 = gamma / sqrt(var) = [0.5, 2, 1]
W2 = np.array([[1, 0, 2], [-1, 1, 1]], dtype=float)  # conv2 1x1, 3 -> 2
G2, V2 = np.array([3, 1]), np.array([9, 4])  # bn2: b2 = [1, 0.5]
WS = np.array([[2, 0], [1, 1]], dtype=float)  # shortcut 1x1, 2 -> 2, no batch norm
WF = np.array([[1, 0, -1, 2, 0, 1, 1, 0],  # fc1 after flattening 2 channels x 2x2: channel c owns columns 4c..4c+3
               [0, 2, 0, 0, 1, -1, 0, 1],
               [1, 1, 1, 1, 0, 0, 2, 0]], dtype=float)
WH = np.array([[1, 0, 1], [0, 1, 0], [2, 0, -1], [1, 1, 1]], dtype=float)  # head, 3 -> 4 classes
B1, B2 = G1 / np.sqrt(V1), G2 / np.sqrt(V2)


def _bn(gamma, var) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(gamma), eps=0.0)
    bn.weight.data = torch.tensor(gamma, dtype=torch.float32)
    bn.running_var = torch.tensor(var, dtype=torch.float32)
    return bn


def _conv(w: np.ndarray) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False)
    conv.weight.data = torch.tensor(w, dtype=torch.float32)[:, :, None, None]
    return conv


def _linear(w: np.ndarray) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0])
    linear.weight.data = torch.tensor(w, dtype=torch.float32)
    return linear


class ResidualToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(W1), _bn(G1, V1)
        self.conv2, self.bn2 = _conv(W2), _bn(G2, V2)
        self.shortcut = _conv(WS)
        self.fc1, self.head = _linear(WF), _linear(WH)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        return self.head(torch.relu(self.fc1(torch.relu(out).flatten(1))))


@pytest.fixture
def toy():
    model = ResidualToy().eval()
    coupling = graph.trace(model, torch.randn(1, 2, 2, 2))
    assert coupling.protected.keys() == {"head"}
    return model, coupling


def _group(coupling, module: nn.Module) -> tp.Group:
    """The full group rooted at ``module``'s outputs, so that score i is output channel i."""
    pruner = coupling.dg.get_pruner_of_module(module)
    return coupling.dg.get_pruning_group(module, pruner.prune_out_channels, list(range(module.weight.shape[0])))


def _score(name: str, group: tp.Group, **kwargs) -> np.ndarray:
    scores = criteria.get_criterion(name, **kwargs)(group)
    assert scores is not None
    return scores.detach().double().numpy()


def _by_mean(x: np.ndarray) -> np.ndarray:
    return x / x.mean()


def _block(w: np.ndarray, channels: int) -> np.ndarray:
    """Per channel, the sum of a (columns,) vector over that channel's block of flattened columns."""
    return w.reshape(channels, -1).sum(1)


# -- lookahead ---------------------------------------------------------------------------------------------


def test_lookahead_on_the_first_layer_folds_its_batch_norm(toy):
    model, coupling = toy
    # S(k) = sqrt(b1[k]^2 * ||W1[k, :]||^2 * 1 (network input)) * sqrt(||W2[:, k]||^2)
    into = B1**2 * (W1**2).sum(1)
    out = (W2**2).sum(0)
    expected = np.sqrt(into) * np.sqrt(out)  # = sqrt(1.25 * 2), sqrt(4 * 1), sqrt(5 * 5)

    np.testing.assert_allclose(_score("lookahead", _group(coupling, model.conv1)), _by_mean(expected), rtol=1e-5)


def test_lookahead_on_a_residual_group_sums_both_producers_and_reads_the_flattened_block(toy):
    model, coupling = toy
    p_conv2 = B1**2 * (W1**2).sum(1)  # conv2's inputs come from conv1 -> bn1
    into = np.array([B2[c] ** 2 * sum(W2[c, k] ** 2 * p_conv2[k] for k in range(3))  # conv2 -> bn2
                     + (WS[c] ** 2).sum()  # the shortcut, fed by the network input (P = 1), no batch norm
                     for c in range(2)])
    out = _block((WF**2).sum(0), 2)  # fc1's 4 columns of each channel

    for root in (model.conv2, model.shortcut):  # whichever layer roots the group, the same numbers
        np.testing.assert_allclose(_score("lookahead", _group(coupling, root)),
                                   _by_mean(np.sqrt(into) * np.sqrt(out)), rtol=1e-5)


def test_lookahead_after_a_flatten_looks_back_to_the_channel_of_each_column(toy):
    model, coupling = toy
    rows = B2**2 * (W2**2).sum(1) + (WS**2).sum(1)  # the residual channel's rows, one step back
    p_fc1 = np.repeat(rows, 4)  # column j of fc1 reads channel j // 4
    into = (WF**2 * p_fc1).sum(1)
    out = (WH**2).sum(0)

    np.testing.assert_allclose(_score("lookahead", _group(coupling, model.fc1)),
                               _by_mean(np.sqrt(into) * np.sqrt(out)), rtol=1e-5)


def test_lookahead_multiplies_producer_and_consumer_terms(toy):
    model, coupling = toy
    before = _score("lookahead", _group(coupling, model.conv1))
    with torch.no_grad():
        model.conv2.weight[:, 1] = 0  # channel 1 of conv1 is read by nobody now

    after = _score("lookahead", _group(coupling, model.conv1))

    assert after[1] == 0 and before[1] > 0
    assert after.mean() == pytest.approx(1.0)


# -- lookahead through a depthwise conv ----------------------------------------------------------------------

K = np.array([[[1, 0, 0], [0, 2, 0], [0, 0, 0]],  # ||K0||^2 = 5
              [[0, 1, 0], [1, 0, 1], [0, 1, 0]]], dtype=float)  # ||K1||^2 = 4
D1 = np.array([[2], [1]], dtype=float)  # 1x1, 1 -> 2
GA, VA = np.array([1, 1]), np.array([1, 4])  # bA gain [1, 0.5]
GB, VB = np.array([2, 1]), np.array([1, 1])  # bB gain [2, 1]
D2 = np.array([[1, 1], [0, 3]], dtype=float)  # 1x1, 2 -> 2
DH = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)  # head, 2 -> 3 classes


class DepthwiseToy(nn.Module):
    """conv1 -> bnA -> relu -> depthwise 3x3 -> bnB -> relu -> conv2 -> bnC -> relu -> pool -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn_a = _conv(D1), _bn(GA, VA)
        self.dw = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False)
        self.dw.weight.data = torch.tensor(K, dtype=torch.float32)[:, None]
        self.bn_b = _bn(GB, VB)
        self.conv2, self.bn_c = _conv(D2), _bn([1, 1], [1, 1])
        self.head = _linear(DH)

    def forward(self, x):
        x = torch.relu(self.bn_b(self.dw(torch.relu(self.bn_a(self.conv1(x))))))
        return self.head(torch.relu(self.bn_c(self.conv2(x))).mean((2, 3)))


@pytest.fixture
def depthwise_toy():
    model = DepthwiseToy().eval()
    return model, graph.trace(model, torch.randn(1, 1, 3, 3))


def test_lookahead_multiplies_in_the_depthwise_kernel(depthwise_toy):
    model, coupling = depthwise_toy
    b_a, b_b = GA / np.sqrt(VA), GB / np.sqrt(VB)
    path = b_a**2 * (D1**2).sum(1) * b_b**2 * (K**2).sum((1, 2))  # [80, 1]
    expected_first = np.sqrt(path) * np.sqrt((D2**2).sum(0))
    expected_second = np.sqrt((D2**2 * path).sum(1)) * np.sqrt((DH**2).sum(0))  # bnC's gain is 1

    np.testing.assert_allclose(_score("lookahead", _group(coupling, model.conv1)), _by_mean(expected_first), rtol=1e-5)
    np.testing.assert_allclose(_score("lookahead", _group(coupling, model.conv2)), _by_mean(expected_second), rtol=1e-5)


def test_ocs_counts_a_depthwise_conv_as_one_slice(depthwise_toy):
    model, coupling = depthwise_toy
    slices = [(D1**2).sum(1) / np.sqrt(1), GA**2, (K**2).sum((1, 2)) / np.sqrt(9), GB**2, (D2**2).sum(0) / np.sqrt(2)]
    expected = sum(slices) / len(slices)

    np.testing.assert_allclose(_score("ocs-saliency", _group(coupling, model.conv1)), expected, rtol=1e-5)


# -- lookahead across residual blocks: only the layers behind a producer feed its P ---------------------------

S0 = np.array([[1, 2], [2, 0]], dtype=float)  # stem 1x1, 2 -> 2
A1, C1 = np.array([[1, 1], [0, 2], [3, 0]], dtype=float), np.array([[1, 0, 1], [2, 1, 0]], dtype=float)
A2, C2 = np.array([[2, 0], [1, 1], [0, 1]], dtype=float), np.array([[0, 1, 1], [1, 0, 2]], dtype=float)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(S0)
        self.a1, self.c1, self.a2, self.c2 = _conv(A1), _conv(C1), _conv(A2), _conv(C2)
        self.head = _linear(np.ones((3, 2)))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.c1(torch.relu(self.a1(x)))
        x = x + self.c2(torch.relu(self.a2(x)))
        return self.head(x.mean((2, 3)))


def test_lookahead_lookback_takes_only_the_layers_upstream_in_a_residual_stream():
    model = TwoBlocks().eval()
    coupling = graph.trace(model, torch.randn(1, 2, 2, 2))
    # The stream's group couples stem, c1 and c2, but a1 reads stem only and a2 reads stem + c1.
    p_a1 = (S0**2).sum(1)
    p_a2 = (S0**2).sum(1) + (C1**2).sum(1)

    for a, c, p in ((A1, C1, p_a1), (A2, C2, p_a2)):
        expected = np.sqrt((a**2 * p).sum(1)) * np.sqrt((c**2).sum(0))
        layer = model.a1 if a is A1 else model.a2
        np.testing.assert_allclose(_score("lookahead", _group(coupling, layer)), _by_mean(expected), rtol=1e-5)


# -- ocs-saliency ------------------------------------------------------------------------------------------


def test_ocs_saliency_on_the_first_layer(toy):
    model, coupling = toy
    # slices: conv1 rows (2 weights), bn1, conv2 columns (2 weights)
    expected = ((W1**2).sum(1) / np.sqrt(2) + G1**2 + (W2**2).sum(0) / np.sqrt(2)) / 3

    np.testing.assert_allclose(_score("ocs-saliency", _group(coupling, model.conv1)), expected, rtol=1e-5)


def test_ocs_saliency_on_the_residual_group_with_a_flatten(toy):
    model, coupling = toy
    # slices: conv2 rows (3), bn2, shortcut rows (2), fc1's 4 columns of 3 weights per channel (12)
    expected = ((W2**2).sum(1) / np.sqrt(3) + G2**2 + (WS**2).sum(1) / np.sqrt(2)
                + _block((WF**2).sum(0), 2) / np.sqrt(12)) / 4

    np.testing.assert_allclose(_score("ocs-saliency", _group(coupling, model.conv2)), expected, rtol=1e-5)


# -- torch-pruning's importances, as wrapped ---------------------------------------------------------------


def test_l1_l2_and_bn_scale_on_the_residual_group(toy):
    model, coupling = toy
    group = _group(coupling, model.conv2)
    l1 = np.abs(W2).sum(1) + np.abs(G2) + np.abs(WS).sum(1) + _block(np.abs(WF).sum(0), 2)
    l2 = (W2**2).sum(1) + G2**2 + (WS**2).sum(1) + _block((WF**2).sum(0), 2)

    np.testing.assert_allclose(_score("l1", group), _by_mean(l1), rtol=1e-5)
    np.testing.assert_allclose(_score("l2", group), _by_mean(l2), rtol=1e-5)
    np.testing.assert_allclose(_score("bn-scale", group), _by_mean(np.abs(G2)), rtol=1e-5)


def test_lamp_divides_by_the_scores_not_below(toy):
    model, coupling = toy
    l2 = (W1**2).sum(1) + G1**2 + (W2**2).sum(0)
    expected = np.array([s / l2[l2 >= s].sum() for s in l2])

    np.testing.assert_allclose(_score("lamp", _group(coupling, model.conv1)), expected, rtol=1e-5)


def test_fpgm_sums_distances_between_squared_weights(toy):
    model, coupling = toy
    rows, cols = W1**2, (W2**2).T

    def distances(v: np.ndarray) -> np.ndarray:
        return np.array([sum(np.linalg.norm(v[i] - v[j]) for j in range(len(v))) for i in range(len(v))])

    np.testing.assert_allclose(_score("fpgm", _group(coupling, model.conv1)),
                               _by_mean(distances(rows) + distances(cols)), rtol=1e-5)


def _hand_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = (torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) % 3 - 1)


def test_taylor_is_weight_times_gradient_summed_over_the_group(toy):
    model, coupling = toy
    _hand_gradients(model)
    g = {name: p.grad.squeeze().double().numpy() for name, p in model.named_parameters()}
    # torch-pruning 1.6's Taylor importance leaves batch norms out (its branch tests the group-norm handler).
    expected = (np.abs(W2 * g["conv2.weight"]).sum(1) + np.abs(WS * g["shortcut.weight"]).sum(1)
                + _block(np.abs(WF * g["fc1.weight"]).sum(0), 2))

    np.testing.assert_allclose(_score("taylor", _group(coupling, model.conv2)), _by_mean(expected), rtol=1e-5)


def test_hessian_calibrates_per_sample_through_the_pipeline(toy):
    model, coupling = toy
    torch.manual_seed(0)
    data = LoadedData.from_tensors(torch.randn(6, 2, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1]))
    params = dict(model.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in zip(data.train_x, data.train_y):  # per-sample gradients, written out here
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        for (name, p), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            squares[name] += grad**2
    h = {name: (s / len(data.train_y)).squeeze().double().numpy() for name, s in squares.items()}
    expected = ((W2**2 * h["conv2.weight"]).sum(1) + G2**2 * h["bn2.weight"] + (WS**2 * h["shortcut.weight"]).sum(1)
                + _block((WF**2 * h["fc1.weight"]).sum(0), 2))

    hessian = criteria.get_criterion("hessian")
    calibrate(model, data, batches=2, batch_size=3, criterion=hessian)
    last_sample_only = pruning.score_groups(coupling, criteria.get_criterion("hessian"))  # squares .grad as left
    scores = hessian(_group(coupling, model.conv2)).double().numpy()

    np.testing.assert_allclose(scores, _by_mean(expected), rtol=1e-4)
    spec = next(s for s in coupling.groups if "conv2" in s.layers)
    assert not np.allclose(last_sample_only[spec.index].double().numpy(), scores, rtol=1e-3)


def test_hessian_leaves_the_gradients_as_they_were(toy):
    model, coupling = toy
    _hand_gradients(model)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    hessian = criteria.get_criterion("hessian")
    hessian.accumulate_grad(model)

    hessian(_group(coupling, model.conv2))

    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[name])


# -- random ------------------------------------------------------------------------------------------------


def test_random_is_seeded(toy):
    model, coupling = toy

    def draw(**kwargs) -> list[np.ndarray]:
        criterion = criteria.get_criterion("random", **kwargs)
        return [_score_of(criterion, coupling, spec) for spec in coupling.groups]

    first, again, other = draw(), draw(), draw(seed=1)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert ((0 <= a) & (a < 1)).all()
        assert not np.array_equal(a, c)


def _score_of(criterion, coupling, spec) -> np.ndarray:
    return criterion(coupling.tp_group(spec)).numpy()
