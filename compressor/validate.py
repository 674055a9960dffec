"""Validate the exported models under onnxruntime: parity with PyTorch, accuracy and latency.

The CUDA execution provider is asked for only where CUDA is usable, the provider the session really
got is reported, and onnxruntime's own console output is kept out of the user's terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ParityError, ValidationError, one_line
from .export import INPUT_NAME

if TYPE_CHECKING:
    from .data import LoadedData


PARITY_TOLERANCE = {"CPUExecutionProvider": 1e-3, "CUDAExecutionProvider": 5e-3}
"""The largest ONNX-vs-PyTorch logit difference accepted, as a fraction of the largest PyTorch logit
(``--parity-tolerance`` replaces it), per execution provider. Relative, as Olive's OnnxDiscrepancyCheck
and optimum's AtolError compare outputs with a tolerance: an absolute one would pass anything for an
untrained deep net (logits of 1e-9) and fail a large-logit model on float rounding alone. CUDA kernels
(cuDNN's algorithm choice, fused ops) differ from the CPU reference more than onnxruntime's CPU ones."""
DEFAULT_PARITY_TOLERANCE = 1e-3
"""For an execution provider not in :data:`PARITY_TOLERANCE`."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    top1_agreement: float
    samples: int
    mean_abs_diff: float = 0.0
    max_abs_logit: float = 0.0
    """The largest PyTorch logit (absolute): the scale of the tolerance."""
    tolerance: float | None = None
    """The relative tolerance it was held to (None: not judged)."""

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.max_abs_logit if self.max_abs_logit else (0.0 if not self.max_abs_diff else math.inf)


def parity_tolerance(provider: str, override: float | None = None) -> float:
    """The relative parity tolerance on ``provider``: ``override`` (``--parity-tolerance``) where given."""
    return override if override is not None else PARITY_TOLERANCE.get(provider, DEFAULT_PARITY_TOLERANCE)


def judge_parity(p: Parity, *, provider: str, override: float | None = None) -> Parity:
    """``p`` with its tolerance, or a ``ParityError`` listing the differences where it exceeds it."""
    tolerance = parity_tolerance(provider, override)
    if not p.max_abs_diff <= tolerance * p.max_abs_logit:
        raise ParityError(
            f"the ONNX model's logits differ from PyTorch's on {provider}: max difference {p.max_abs_diff:.3g} "
            f"({p.relative_diff:.2g} of the largest logit {p.max_abs_logit:.3g}, tolerance {tolerance:g}), "
            f"mean difference {p.mean_abs_diff:.3g}, top-1 agreement {p.top1_agreement:.2%} on {p.samples} images",
            hint="an operator exports or runs differently in onnxruntime; --parity-tolerance X widens the check "
                 "if the difference is acceptable")
    return dataclasses.replace(p, tolerance=tolerance)


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
            raise ValidationError(f"onnxruntime could not load the model: {one_line(exc, with_type=False)}"
                                  + (f" ({detail[-1]})" if detail else "")) from exc
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ValidationError("--device cuda was asked for, but onnxruntime's CUDA execution provider is not usable here",
                              hint="install onnxruntime-gpu with a matching CUDA, or use --device auto")
    return session


def run(session: Any, x: torch.Tensor, *, batch_size: int = 64, check: Callable[[], None] | None = None) -> np.ndarray:
    """Outputs of ``session`` on ``x``, batched; ``check`` (the cancel check) is called before each batch."""
    return run_all([session], (x[i : i + batch_size] for i in range(0, len(x), batch_size)), check=check)[0]


def run_all(sessions: list[Any], batches: Iterable[torch.Tensor], *, check: Callable[[], None] | None = None) -> list[np.ndarray]:
    """Outputs of each session on every batch: one pass over (possibly lazily read) images for all of them."""
    outs: list[list[np.ndarray]] = [[] for _ in sessions]
    for x in batches:
        if check is not None:
            check()
        feed = {INPUT_NAME: x.numpy()}
        for out, session in zip(outs, sessions):
            out.append(session.run(None, feed)[0])
    return [np.concatenate(o) for o in outs]


def parity(session: Any, reference: torch.Tensor, x: torch.Tensor | np.ndarray, *,
           check: Callable[[], None] | None = None) -> Parity:
    """Compare ONNX outputs on ``x`` (or the outputs themselves, an array) with the PyTorch ``reference`` logits."""
    out = x if isinstance(x, np.ndarray) else run(session, x, check=check)
    ref = reference.numpy()
    if out.shape != ref.shape:
        raise ValidationError(f"ONNX output shape {out.shape} differs from PyTorch's {ref.shape}")
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return Parity(
        max_abs_diff=float(diff.max()) if out.size else 0.0,
        top1_agreement=float((out.argmax(1) == ref.argmax(1)).mean()) if out.size else 1.0,
        samples=len(out),
        mean_abs_diff=float(diff.mean()) if out.size else 0.0,
        max_abs_logit=float(np.abs(ref).max()) if out.size else 0.0,
    )


def onnx_accuracy(session: Any, x: torch.Tensor, y: torch.Tensor, *, check: Callable[[], None] | None = None) -> float:
    return float((run(session, x, check=check).argmax(1) == y.numpy()).mean())


def feed_for(sample: torch.Tensor, batch: int) -> dict[str, np.ndarray]:
    """An input of ``batch`` images, ``sample`` repeated as often as needed."""
    reps = -(-batch // len(sample))
    return {INPUT_NAME: sample.repeat(reps, 1, 1, 1)[:batch].numpy()}


SETTLE = 0.01
"""Timing two models stops early once the per-round ratio (second / first) is known to within 1%: its
interquartile range over sqrt(rounds), an estimate of its median's standard error, is at most this
fraction of the median (after MIN_ROUNDS rounds, or MIN_ROUNDS_SLOW where a round takes over SLOW_ROUND_S).
Large models settle in a few rounds; tiny ones, whose times are mostly noise, run every round they were given."""
MIN_ROUNDS = 5
MIN_ROUNDS_SLOW = 3
SLOW_ROUND_S = 1.0
"""A round (every session once) longer than this (a large model at batch 64) may settle after MIN_ROUNDS_SLOW:
such runs are long enough that scheduling noise is a small part of each."""
ROUNDS_BUDGET_S = 15.0
"""Timing two models also stops once its rounds have taken this many seconds (after the minimum rounds),
settled or not: a large model at batch 64 on a few CPU cores (seconds a run, tens of percent of noise) is
otherwise timed for a minute to pin a ratio the report gives to two digits. The spread the report gives
with each median says how precise it is."""
WARMUP_S = 1.0
"""Warm-up stops after this many seconds of a session's runs (at least one run), or after ``warmup`` runs."""


def interleaved_times(sessions: list[Any], feed: dict[str, np.ndarray], *, runs: int, warmup: int = 5,
                      check: Callable[[], None] | None = None, settle: float | None = None) -> list[list[float]]:
    """Milliseconds of up to ``runs`` runs of each session on ``feed``, timed interleaved so drift hits all alike.

    The order rotates from one round to the next, so no session always runs on a warmer cache. ``settle``
    (two sessions): stop once the ratio of their times is that precise (see :data:`SETTLE`), or once the
    rounds have taken :data:`ROUNDS_BUDGET_S`.
    """
    for session in sessions:
        start = time.perf_counter()
        for _ in range(warmup):
            session.run(None, feed)
            if time.perf_counter() - start > WARMUP_S:
                break
    times: list[list[float]] = [[] for _ in sessions]
    min_rounds = MIN_ROUNDS
    started = time.perf_counter()
    for i in range(runs):
        if check is not None:
            check()
        order = list(range(len(sessions)))
        order = order[i % len(order):] + order[: i % len(order)]
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
        if i == 0 and sum(ts[0] for ts in times) > SLOW_ROUND_S * 1e3:
            min_rounds = MIN_ROUNDS_SLOW
        if settle is not None and len(sessions) == 2 and i + 1 >= min_rounds and i + 1 < runs:
            ratios = [c / o for o, c in zip(*times)]
            if iqr(ratios) / math.sqrt(len(ratios)) <= settle * statistics.median(ratios):
                break
            if time.perf_counter() - started > ROUNDS_BUDGET_S:
                break
    return times


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for a single value)."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [0, 0, 0]
    return q[2] - q[0]


def latency(original: Any, compressed: Any, sample: torch.Tensor, *, batch: int, runs: int, warmup: int = 5,
            check: Callable[[], None] | None = None) -> Latency:
    """Median latency of both sessions on one batch, timed interleaved."""
    o, c = interleaved_times([original, compressed], feed_for(sample, batch), runs=runs, warmup=warmup, check=check,
                             settle=SETTLE)
    return Latency(batch=batch, original_ms=statistics.median(o), compressed_ms=statistics.median(c),
                   original_spread_ms=iqr(o), compressed_spread_ms=iqr(c), runs=len(o))


def validate(
    original_onnx: Path,
    compressed_onnx: Path,
    *,
    reference_logits: torch.Tensor,
    data: LoadedData,
    device: str,
    batches: tuple[int, ...] = (1, 64),
    runs: int = 30,
    check: Callable[[], None] | None = None,
    parity_tolerance: float | None = None,
) -> ValidationResult:
    """Parity (judged: :func:`judge_parity`), accuracy and latency of the compressed model against the
    original, in one process; ``check`` (the cancel check) is called between batches."""
    original = open_session(original_onnx, device=device)
    compressed = open_session(compressed_onnx, device=device)
    provider = compressed.get_providers()[0]
    # One pass over the validation images (read lazily for a folder) serves parity and both accuracies.
    out_original, out_compressed = run_all([original, compressed], (x for x, _ in data.batches("val", batch_size=data.eval_batch_size(64))),
                                           check=check)
    result_parity = judge_parity(parity(compressed, reference_logits, out_compressed), provider=provider,
                                 override=parity_tolerance)
    sample = data.head(64)
    lat = [latency(original, compressed, sample, batch=b, runs=runs if b == 1 else max(5, runs // 3), check=check)
           for b in batches]
    labels = data.labels("val").numpy()
    return ValidationResult(
        provider=provider,
        parity=result_parity,
        accuracy_original=float((out_original.argmax(1) == labels).mean()),
        accuracy_compressed=float((out_compressed.argmax(1) == labels).mean()),
        latency=lat,
    )
