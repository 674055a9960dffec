"""The activation statistics the pipeline feeds, and the ``activation`` criterion on them, by hand."""

from __future__ import annotations


import torch
from torch import nn

from compressor import graph, pruning
from compressor.pipeline import activation_stats, prepare_criterion
from compressor.plugins.activation import MeanActivation
from compressor.data import LoadedData


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 1, bias=False)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def _toy() -> tuple[TwoConvs, LoadedData]:
    model = TwoConvs().eval()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([1.0, -1.0, 3.0]).view(3, 1, 1, 1))
        model.conv2.weight.fill_(1.0)
    x = torch.tensor([1.0, 2.0, -1.0, 4.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    return model, LoadedData.from_tensors(x, torch.zeros(4, dtype=torch.long))


def test_activation_stats_are_mean_absolute_inputs_per_channel():
    model, data = _toy()
    stats = activation_stats(model, data, batches=2, batch_size=2)
    pixels = torch.tensor([1.0, 2.0, -1.0, 4.0])
    relu = torch.relu(torch.tensor([1.0, -1.0, 3.0])[:, None] * pixels)  # conv2's inputs, per channel
    torch.testing.assert_close(stats[model.conv1], pixels.abs().mean().view(1))
    torch.testing.assert_close(stats[model.conv2], relu.mean(1))


def test_activation_criterion_scores_conv1_channels_by_what_conv2_reads():
    model, data = _toy()
    criterion = MeanActivation()
    prepare_criterion(criterion, model, data, batches=2, batch_size=2)
    coupling = graph.trace(model, data.train_x[:1])
    spec = next(s for s in coupling.groups if s.root == "conv1")
    scores = criterion(coupling.tp_group(spec))
    pixels = torch.tensor([1.0, 2.0, -1.0, 4.0])
    expected = torch.relu(torch.tensor([1.0, -1.0, 3.0])[:, None] * pixels).mean(1)
    torch.testing.assert_close(scores, expected / expected.mean())
    assert int(scores.argmin()) == 1  # the channel whose ReLU is almost always off goes first
    assert pruning.score_groups(coupling, criterion)[spec.index].shape == (3,)
