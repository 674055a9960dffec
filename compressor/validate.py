"""Validate the exported models under onnxruntime: parity with PyTorch, accuracy and latency.

The CUDA execution provider is asked for only where CUDA is usable, the provider the session really
got is reported, and onnxruntime's own console output is kept out of the user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ValidationError
from .export import INPUT_NAME


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    top1_agreement: float
    samples: int


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per batch; ``spread`` is the interquartile range of the runs."""

    batch: int
    original_ms: float
    compressed_ms: float
    original_spread_ms: float
    compressed_spread_ms: float
    runs: int

    @property
    def speedup(self) -> float:
        return self.original_ms / self.compressed_ms if self.compressed_ms else float("nan")


@dataclass(frozen=True)
class ValidationResult:
    provider: str
    parity: Parity
    accuracy_original: float
    accuracy_compressed: float
    latency: list[Latency] = field(default_factory=list)
    threads: int | None = None


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to fd 2 (onnxruntime's provider errors); keep it for errors."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def providers_for(device: str) -> list[str]:
    """Execution providers to ask for: CUDA first only where torch sees a usable GPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if wants_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(model: bytes | Path, *, device: str = "auto", threads: int | None = None,
                 configure: Callable[[Any], None] | None = None) -> Any:
    """An onnxruntime session for ``model`` with onnxruntime's logging silenced.

    ``configure`` may adjust the ``SessionOptions`` further (the layer profile turns on profiling).
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    providers = providers_for(device)
    if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception), _quiet_native_stderr():
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia wheels that the CUDA build of torch brings
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if configure:
        configure(options)
    source = model if isinstance(model, bytes) else str(model)
    with _quiet_native_stderr() as captured:
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:
            captured.seek(0)
            detail = captured.read().decode(errors="replace").strip().splitlines()
            raise ValidationError(f"onnxruntime could not load the model: {str(exc).splitlines()[0]}"
                                  + (f" ({detail[-1]})" if detail else "")) from exc
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ValidationError("--device cuda was asked for, but onnxruntime's CUDA execution provider is not usable here",
                              hint="install onnxruntime-gpu with a matching CUDA, or use --device auto")
    return session


def run(session: Any, x: torch.Tensor, *, batch_size: int = 64, check: Callable[[], None] | None = None) -> np.ndarray:
    """Outputs of ``session`` on ``x``, batched; ``check`` (the cancel check) is called before each batch."""
    outs = []
    for i in range(0, len(x), batch_size):
        if check is not None:
            check()
        outs.append(session.run(None, {INPUT_NAME: x[i : i + batch_size].numpy()})[0])
    return np.concatenate(outs)


def parity(session: Any, reference: torch.Tensor, x: torch.Tensor, *, check: Callable[[], None] | None = None) -> Parity:
    """Compare ONNX outputs on ``x`` with the PyTorch ``reference`` logits."""
    out = run(session, x, check=check)
    ref = reference.numpy()
    if out.shape != ref.shape:
        raise ValidationError(f"ONNX output shape {out.shape} differs from PyTorch's {ref.shape}")
    return Parity(
        max_abs_diff=float(np.abs(out - ref).max()) if out.size else 0.0,
        top1_agreement=float((out.argmax(1) == ref.argmax(1)).mean()) if out.size else 1.0,
        samples=len(out),
    )


def onnx_accuracy(session: Any, x: torch.Tensor, y: torch.Tensor, *, check: Callable[[], None] | None = None) -> float:
    return float((run(session, x, check=check).argmax(1) == y.numpy()).mean())


def feed_for(sample: torch.Tensor, batch: int) -> dict[str, np.ndarray]:
    """An input of ``batch`` images, ``sample`` repeated as often as needed."""
    reps = -(-batch // len(sample))
    return {INPUT_NAME: sample.repeat(reps, 1, 1, 1)[:batch].numpy()}


def interleaved_times(sessions: list[Any], feed: dict[str, np.ndarray], *, runs: int, warmup: int = 5,
                      check: Callable[[], None] | None = None) -> list[list[float]]:
    """Milliseconds of ``runs`` runs of each session on ``feed``, timed interleaved so drift hits all alike.

    The order rotates from one round to the next, so no session always runs on a warmer cache.
    """
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        if check is not None:
            check()
        order = list(range(len(sessions)))
        order = order[i % len(order):] + order[: i % len(order)]
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for a single value)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [0, 0, 0]
    return q[2] - q[0]


def latency(original: Any, compressed: Any, sample: torch.Tensor, *, batch: int, runs: int, warmup: int = 5,
            check: Callable[[], None] | None = None) -> Latency:
    """Median latency of both sessions on one batch, timed interleaved."""
    o, c = interleaved_times([original, compressed], feed_for(sample, batch), runs=runs, warmup=warmup, check=check)
    return Latency(batch=batch, original_ms=statistics.median(o), compressed_ms=statistics.median(c),
                   original_spread_ms=iqr(o), compressed_spread_ms=iqr(c), runs=runs)


def validate(
    original_onnx: Path,
    compressed_onnx: Path,
    *,
    reference_logits: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    device: str,
    batches: tuple[int, ...] = (1, 64),
    runs: int = 30,
    check: Callable[[], None] | None = None,
) -> ValidationResult:
    """Parity, accuracy and latency of the compressed model against the original, in one process;
    ``check`` (the cancel check) is called between batches."""
    original = open_session(original_onnx, device=device)
    compressed = open_session(compressed_onnx, device=device)
    provider = compressed.get_providers()[0]
    result_parity = parity(compressed, reference_logits, val_x, check=check)
    lat = [latency(original, compressed, val_x[:64], batch=b, runs=runs if b == 1 else max(5, runs // 3), check=check)
           for b in batches]
    return ValidationResult(
        provider=provider,
        parity=result_parity,
        accuracy_original=onnx_accuracy(original, val_x, val_y, check=check),
        accuracy_compressed=onnx_accuracy(compressed, val_x, val_y, check=check),
        latency=lat,
    )
