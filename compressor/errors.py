"""Typed errors. Each carries a message a user can act on and, where there is one, a hint.

The command line maps every ``CompressorError`` to one line and a non-zero exit code; the library
never exits the process itself.
"""

from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None, *, with_type: bool = True) -> str:
    """``exc`` on one line: its type (unless ``with_type`` is false) and the first line of its message,
    cut at ``limit`` characters. The one way errors of other code are quoted in ours."""
    lines = str(exc).strip().splitlines()
    first = lines[0][:limit] if lines and limit else lines[0] if lines else ""
    if not with_type:
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class CompressorError(Exception):
    """Base class: something the user can fix. ``hint`` says how, when we know."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(CompressorError):
    """An option value is out of range or options contradict each other."""


class ModelLoadError(CompressorError):
    """The model file is missing, unreadable, of an unsupported kind, or does not match --arch."""


class DataError(CompressorError):
    """The data is missing, malformed, or does not fit the model."""


class GraphError(CompressorError):
    """The model cannot be traced into a coupling graph, or nothing in it can be pruned."""


class BudgetError(CompressorError):
    """Work ran past its time or memory budget (``--trace-timeout``, ``--trace-memory``) and was stopped."""


class TargetUnreachableError(CompressorError):
    """The FLOPs target lies below the smallest ratio that structured pruning can reach."""


class TrainingError(CompressorError):
    """Fine-tuning could not go on (a data-parallel worker died)."""


class ExportError(CompressorError):
    """The model could not be exported to ONNX, or the ONNX file failed its check."""


class ValidationError(CompressorError):
    """onnxruntime could not run the exported model."""


class OutputExistsError(CompressorError):
    """The output directory exists and --overwrite was not given."""


class Cancelled(CompressorError):
    """The run was cancelled (a cancel token was set, or Ctrl-C); nothing was written."""

    exit_code = 130


class ParityError(CompressorError):
    """The exported ONNX model's outputs differ from PyTorch's by more than the parity tolerance."""


class ReportError(CompressorError):
    """A run directory has no readable report.json (``compressor compare``)."""
