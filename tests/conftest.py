"""Shared fixtures: a tiny labelled dataset, a tiny trained-shape ResNet-20 state dict, fast configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import os
import sys

import pytest
import torch

from compressor.config import CompressConfig

# The helper modules next to this file (_tiny, helpers_criteria) must import whatever --import-mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _tiny import make_images, save_npz, tiny_resnet20  # noqa: E402

# pytest-xdist's workers start with COLUMNS=80 and LINES=24 in their environment; rich reads them once,
# when the CLI's module-level consoles are made, and would then ignore the width a test asks for
# (CliRunner's env={"COLUMNS": ...}) and cut table cells at 80 columns.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

# The tests' models are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine
# spinning OpenMP workers made the pruning search about 7x slower than a single thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _avx512_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU EP's default ``--round-to`` follows the CPU (16 with AVX-512, 8 with AVX2 only): tests that
    count on the default see 16 on every machine (``test_latency`` checks both)."""
    from compressor import latency

    monkeypatch.setattr(latency, "this_cpu_capability", lambda: "AVX512")


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    """60 1x16x16 uint8 images in 4 brightness classes, as an .npz archive."""
    images, labels = make_images()
    return save_npz(tmp_path / "data.npz", images, labels)


@pytest.fixture
def resnet20() -> torch.nn.Module:
    """The module whose state dict the ``model_path`` fixture holds."""
    return tiny_resnet20()


@pytest.fixture
def model_path(tmp_path: Path, resnet20: torch.nn.Module) -> Path:
    """A ResNet-20 (1 input channel, 4 classes) saved with ``torch.save(model.state_dict())``."""
    path = tmp_path / "model" / "resnet20.pt"
    path.parent.mkdir()
    torch.save(resnet20.state_dict(), path)
    return path


@pytest.fixture
def make_config(tmp_path: Path, model_path: Path, data_path: Path) -> Callable[..., CompressConfig]:
    """Build a ``CompressConfig`` with fast settings; keyword arguments override any field."""

    def build(**overrides: Any) -> CompressConfig:
        fields: dict[str, Any] = dict(
            model_path=model_path, data_path=data_path, target_flops=0.5, arch="resnet20", epochs=1,
            batch_size=16, latency_runs=2, device="cpu", out_dir=tmp_path / "out",
        )
        fields.update(overrides)
        return CompressConfig(**fields)

    return build
