"""Tiny data and models shared by the tests (importable from any test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.models import create_model

IMAGE_SIZE = 16
NUM_CLASSES = 4
SAMPLES_PER_CLASS = 15


def make_images(*, classes: int = NUM_CLASSES, per_class: int = SAMPLES_PER_CLASS, channels: int = 1,
                size: int = IMAGE_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images whose class is their brightness (class k is centred on 40 + 50k), so labels are learnable."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centre = 40 + 50 * labels[:, None, None, None]
    noise = rng.integers(-20, 21, size=(len(labels), channels, size, size))
    return np.clip(centre + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def tiny_resnet20(*, num_classes: int = NUM_CLASSES, in_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    """A seeded ResNet-20 in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=num_classes, in_channels=in_channels, image_size=IMAGE_SIZE)
    # Random running statistics and affine parameters, so that channels differ in importance and
    # a wrongly loaded buffer shows in the outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


class FlopsTimer:
    """Stands in for ``latency.OnnxTimer`` where a test needs a latency search but not real timing: a
    candidate's latency ratio is exactly its FLOPs ratio, so the search's outcome does not depend on how
    busy the machine is."""

    provider = "injected timer"

    def __init__(self, original: torch.nn.Module, *, example_input: torch.Tensor, **_: object) -> None:
        from compressor import flops

        self.example_input = example_input
        self.original = flops.measure(original, example_input).macs

    def __call__(self, model: torch.nn.Module):
        from compressor import flops
        from compressor.latency import LatencyMeasurement

        r = flops.measure(model, self.example_input).macs / self.original
        return LatencyMeasurement(ratio=r, spread=0.0, original_ms=1.0, compressed_ms=r)

