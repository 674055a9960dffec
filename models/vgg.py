"""VGG-16 with batch norm, CIFAR variant: 13 convolutions and one linear classifier.

Max-pools use ``ceil_mode`` so that 28x28 inputs (Fashion-MNIST) survive the five halvings.
"""

from __future__ import annotations

from torch import Tensor, nn

_CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg: tuple, *, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    return VGG(_CFG16, num_classes=num_classes, in_channels=in_channels)
