"""What the web pages show of a job: on the jobs list, its progress and figures from the job table (which
the worker keeps current); on the job page, its progress and log from its ``events.jsonl`` and its figures
from the run's ``report.json`` (through :func:`compressor.compare.load_run`, the reader behind
``compressor compare``).

The events are read in both forms a job may have written: the service's progress lines of its first
release (``kind``: stage, task, advance, done, note, ...) and the library's typed events (``type``:
stage_started, task_progress, ...). The job page's script (``static/job.js``) reads the live stream the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import read_events
from .store import TERMINAL, Job, Store

STAGES = ("load", "trace", "prune", "fine-tune", "export", "validate")
"""The stages of ``compress()`` in order; the overall bar gives each the same share."""
LOG_KINDS = {"note": "note", "warning": "warning", "error": "error"}


@dataclass(frozen=True)
class LogLine:
    n: int
    kind: str
    """note, warning or error."""
    message: str


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands, from its events."""

    fraction: float
    """Of the whole run, 0..1: finished stages plus the current task's share of the current stage."""
    stage: str | None
    task: str | None
    done: int
    total: int | None
    eta_seconds: float | None
    """Of the current task, at its pace so far; None where it is not countable."""
    log: list[LogLine]
    last: int
    """The number of the last event read (the stream goes on after it)."""


def _kind(ev: dict[str, Any]) -> str:
    kind = ev.get("type") or ev.get("kind") or ""
    return {"stage_started": "stage", "task_started": "task", "task_progress": "advance",
            "task_finished": "done"}.get(kind, kind)


def progress_of(events: list[dict[str, Any]], status: str) -> JobProgress:
    stage = task = None
    done, total, eta, started = 0, None, None, None
    finished_stages = 0
    log: list[LogLine] = []
    for ev in events:
        kind, t = _kind(ev), ev.get("time", ev.get("t"))
        if kind == "stage":
            stage, task, done, total, eta = ev.get("name"), None, 0, None, None
            finished_stages = STAGES.index(stage) if stage in STAGES else finished_stages
        elif kind == "task":
            task, done, total, eta, started = ev.get("description"), 0, ev.get("total") or None, None, t
        elif kind == "advance":
            done = ev["done"] if isinstance(ev.get("done"), int) else done + int(ev.get("n") or 1)
            total = ev.get("total", total) or total
            if "eta_seconds" in ev:
                eta = ev["eta_seconds"]
            elif total and started is not None and t is not None and done:
                eta = max(0.0, (t - started) / done * (total - done))
        elif kind == "done":
            task, eta = None, None
        elif kind in LOG_KINDS and ev.get("message"):
            log.append(LogLine(ev.get("n", 0), LOG_KINDS[kind], str(ev["message"])))
    within = min(done / total, 1.0) if task and total else 0.0
    fraction = (finished_stages + within) / len(STAGES) if stage else 0.0
    if status == "succeeded":
        fraction, stage, task, eta = 1.0, "finished", None, None
    elif status in TERMINAL:
        task, eta = None, None
    return JobProgress(fraction=fraction, stage=stage, task=task, done=done, total=total, eta_seconds=eta, log=log,
                    last=max((ev.get("n", 0) for ev in events), default=0))


def job_progress(store: Store, job: Job) -> JobProgress:
    """From the job's events: the job page's progress and its log of notes and warnings."""
    return progress_of(read_events(store.job_dir(job.id) / "events.jsonl"), job.status)


def table_progress(job: Job) -> JobProgress:
    """From the job table's ``stage`` and ``progress`` (the worker folds the events into them every 0.5 s):
    the jobs list's bars, without reading any job's files."""
    p = job.progress or {}
    done, total = int(p.get("done") or 0), p.get("total") or None
    events = [{"type": "stage_started", "name": job.stage}] if job.stage else []
    if p:
        events += [{"type": "task_started", "description": p.get("task"), "total": total},
                   {"type": "task_progress", "description": p.get("task"), "done": done, "total": total,
                    "eta_seconds": p.get("eta_s")}]
    return progress_of(events, job.status)


def out_dir(store: Store, job: Job) -> Path | None:
    """The run's folder, for a job that succeeded (others keep none)."""
    out = store.job_dir(job.id) / "out"
    return out if job.status == "succeeded" and out.is_dir() else None


def summary(store: Store, job: Job):
    """The run's figures (:class:`compressor.compare.RunSummary`), or None before it has a readable report."""
    from compressor.compare import load_run
    from compressor.errors import CompressorError

    out = out_dir(store, job)
    if out is None:
        return None
    try:
        return load_run(out)
    except CompressorError:
        return None


def target(options: dict[str, Any]) -> str:
    if options.get("target_latency") is not None:
        return f"latency × {options['target_latency']}"
    if options.get("target_flops") is not None:
        return f"FLOPs × {options['target_flops']}"
    return "-"


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit}"
    return f"{s} s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


@dataclass(frozen=True)
class Row:
    """One line of the jobs list."""

    job: Job
    model: str
    arch: str
    target: str
    progress: JobProgress
    run: Any
    """The run's :class:`~compressor.compare.RunSummary` (job page), or the job table's ``summary`` (jobs
    list: the same ``speedup_batch*`` names); None before the run has a report."""
    age: str


def row(store: Store, job: Job, *, now: float | None = None, detail: bool = False) -> Row:
    """A job as the pages show it. ``detail`` (the job page): progress and log from its events, figures
    from its report; else (the jobs list) from the job table alone."""
    f = store.get_file(job.owner, job.model_file)
    return Row(job=job, model=f["name"] if f else job.model_file, arch=str(job.options.get("arch", "")),
               target=target(job.options),
               progress=job_progress(store, job) if detail else table_progress(job),
               run=summary(store, job) if detail else job.summary,
               age=age((now or time.time()) - job.created))
