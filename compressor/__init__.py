"""compressor: structured pruning of trained PyTorch models to a FLOPs target, exported as a smaller,
validated ONNX model."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Loaded on first use, so that `compress --help` does not wait for torch to import.
_LAZY = {
    "CompressConfig": "config",
    "CompressResult": "report",
    "CompressorError": "errors",
    "compress": "pipeline",
    "load_pruned": "checkpoint",
}

__all__ = ["CompressConfig", "CompressResult", "CompressorError", "__version__", "compress", "load_pruned"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{name and _LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
