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


class MatmulDominated(torch.nn.Module):
    """A classifier whose time goes to an input-side matrix chain that no pruning touches.

    The chain multiplies by a fixed buffer (no module, so the FLOPs counter does not see it and no
    group owns it); the convolutions after it carry all the counted FLOPs but almost none of the time,
    so pruning them to half the FLOPs cannot make the model measurably faster.
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 1, image_size: int = 16, depth: int = 60) -> None:
        super().__init__()
        side = image_size * image_size
        self.register_buffer("mix", torch.randn(side, side, generator=torch.Generator().manual_seed(0)) / side ** 0.5)
        self.depth = depth
        self.pool = torch.nn.AvgPool2d(4)
        self.conv1 = torch.nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.head = torch.nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.flatten(2)
        for _ in range(self.depth):
            h = torch.tanh(h @ self.mix)
        x = self.pool(h.reshape(shape))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def matmul_dominated(num_classes: int = 4, in_channels: int = 1, image_size: int = 16) -> torch.nn.Module:
    return MatmulDominated(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


class ComputeBound(nn.Module):
    """Four 3x3 convolutions of 48 channels at full resolution: at batch 64 its time is arithmetic, not
    per-call overhead, so halving its FLOPs shows in the measured latency even on a busy machine."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1, width: int = 48) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def compute_bound(num_classes: int = 4, in_channels: int = 1) -> ComputeBound:
    torch.manual_seed(0)
    return ComputeBound(num_classes=num_classes, in_channels=in_channels)


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


class FlatNet(nn.Module):
    """A CNN whose classifier reads a flattened 16x16 map: it fits 16x16 images and nothing else."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def flat_net(num_classes: int = 4, in_channels: int = 1) -> FlatNet:
    return FlatNet(num_classes=num_classes, in_channels=in_channels)


class HardCodedWidth(nn.Module):
    """A forward with a width written into a reshape: pruning ``conv1`` breaks it, torch-pruning cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 256, 3, padding=1)  # wide, so that it alone can meet the target within 1%
        self.conv1 = nn.Conv2d(256, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.fc(x.reshape(x.shape[0], 16, -1).mean(2))
