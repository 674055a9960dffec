"""Architectures for the demo, the tests and the benchmarks, behind ``create_model(name)``.

They are registered under the ``compressor.models`` entry-point group in our ``pyproject.toml``, the
one door every model goes through (``compressor.architectures``); this module only lists and builds
by that registry.
"""

from __future__ import annotations

from torch import nn

__all__ = ["create_model", "list_models"]


def list_models() -> list[str]:
    """Names accepted by ``create_model`` and by ``compress --arch``."""
    from compressor.architectures import available_models

    return available_models()


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a freshly initialised model; ``image_size`` matters only where positions are learned (ViT)."""
    from compressor.architectures import REGISTRY

    if ":" in name or name not in REGISTRY.entry_points():
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return REGISTRY.resolve(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
