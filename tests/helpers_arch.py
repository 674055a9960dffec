"""Architectures reached through ``--arch package.module:factory`` in the tests."""

from __future__ import annotations

import torch
from torch import nn

from compressor.models import create_model


def kwargs_factory(**kwargs):
    """Like torchvision's factories: ``**kwargs`` hides that only ``num_classes`` is accepted."""
    unknown = sorted(set(kwargs) - {"num_classes"})
    if unknown:
        raise TypeError(f"__init__() got an unexpected keyword argument '{unknown[0]}'")
    return create_model("resnet20", num_classes=kwargs.get("num_classes", 10), in_channels=1, image_size=16)


class ErfinvNet(nn.Module):
    """A small CNN whose activation, ``erfinv``, has no ONNX symbolic: it prunes and trains, but cannot be exported."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.erfinv(0.5 * torch.tanh(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def erfinv_net(num_classes: int = 4, in_channels: int = 1) -> ErfinvNet:
    return ErfinvNet(num_classes=num_classes, in_channels=in_channels)
