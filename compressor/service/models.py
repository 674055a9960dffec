"""The JSON bodies of the API, as frozen dataclasses FastAPI documents in /openapi.json and checks on the way out.

A job's ``progress`` carries the fields of the library's :class:`compressor.events.TaskProgress` (``eta_s``
is its ``eta_seconds``); ``summary`` names the report.json keys it copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Progress:
    task: str
    """The current task's description (a fine-tuning epoch, the pruning search, ...)."""
    done: int
    total: Optional[int]
    """None where the work is not countable (the pruning search)."""
    eta_s: Optional[float]
    """Seconds left at the pace so far; None where unknown."""


@dataclass(frozen=True)
class Summary:
    """The headline figures of a succeeded job, copied from its report.json."""

    flops_ratio: Optional[float]
    """``flops.achieved_ratio``: compressed / original FLOPs."""
    accuracy_original: Optional[float]
    """``accuracy.original`` (validation split, 0..1)."""
    accuracy_compressed: Optional[float]
    """``accuracy.compressed``."""
    speedup_batch1: Optional[float]
    """``latency_ms.batch1.speedup``: original / compressed latency under onnxruntime."""
    speedup_batch64: Optional[float]
    """``latency_ms.batch64.speedup``."""

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> Summary:
        lat = report.get("latency_ms") or {}
        return cls(flops_ratio=(report.get("flops") or {}).get("achieved_ratio"),
                   accuracy_original=(report.get("accuracy") or {}).get("original"),
                   accuracy_compressed=(report.get("accuracy") or {}).get("compressed"),
                   speedup_batch1=(lat.get("batch1") or {}).get("speedup"),
                   speedup_batch64=(lat.get("batch64") or {}).get("speedup"))


@dataclass(frozen=True)
class JobView:
    id: str
    status: str
    """queued, running, succeeded, failed or canceled."""
    stage: Optional[str]
    """The pipeline stage of the latest ``stage_started`` event (load, trace, prune, fine-tune, export, validate)."""
    progress: Optional[Progress]
    """The current task from the latest events; None between tasks and before the run."""
    options: dict[str, Any]
    model: str
    data: str
    created: float
    started: Optional[float]
    finished: Optional[float]
    error: Optional[str]
    """One line, the CLI's text."""
    hint: Optional[str]
    attempts: int
    summary: Optional[Summary]
    """On success only."""
    result: Optional[dict[str, Any]]
    """What the job's process reported (accuracies, ONNX sizes, artifact names)."""


@dataclass(frozen=True)
class WorkerView:
    host: str
    pid: int
    slots: int
    """Jobs it runs at once."""
    started: float
    seen_s: float
    """Seconds since its last heartbeat."""


@dataclass(frozen=True)
class Health:
    ok: bool
    free_bytes: int
    """Free space in the data dir."""
    queue_depth: int
    """Jobs queued and not yet started."""
    running: int
    workers_alive: int
    """Worker processes with a heartbeat in the job DB in the last 15 s, on any host."""
    workers: list[WorkerView] = field(default_factory=list)
