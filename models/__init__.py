"""Architectures for the demo, the tests and the benchmarks, behind ``create_model(name)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mobilenetv2 import mobilenetv2
from .resnet_cifar import resnet20, resnet56
from .vgg import vgg16_bn
from .vit import vit_tiny

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16_bn": vgg16_bn,
    "mobilenetv2": mobilenetv2,
    "vit_tiny": vit_tiny,
}

__all__ = ["create_model", "list_models"]


def list_models() -> list[str]:
    """Names accepted by ``create_model`` and by ``compress --arch``."""
    return sorted(_REGISTRY)


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a freshly initialised model; ``image_size`` matters only where positions are learned (ViT)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
