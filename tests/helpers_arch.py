"""Architectures reached through ``--arch package.module:factory`` in the tests."""

from __future__ import annotations

from compressor.models import create_model


def kwargs_factory(**kwargs):
    """Like torchvision's factories: ``**kwargs`` hides that only ``num_classes`` is accepted."""
    unknown = sorted(set(kwargs) - {"num_classes"})
    if unknown:
        raise TypeError(f"__init__() got an unexpected keyword argument '{unknown[0]}'")
    return create_model("resnet20", num_classes=kwargs.get("num_classes", 10), in_channels=1, image_size=16)
