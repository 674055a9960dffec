"""Typed progress events, the stream that makes them, and cancellation.

The library reports what it does as events (:class:`StageStarted` ... :class:`Heartbeat`), each
with a Unix timestamp and a stable JSON form (:meth:`Event.to_dict`: a ``type`` field plus the
fields). A sink is anything with an ``event(e)`` method; :class:`compressor.progress.Progress` is
one, and turns each event back into its older calls (``stage``, ``task``, ``advance``, ``done``,
``heartbeat``, ``note``), so a ``Progress`` subclass written against those keeps working.

:class:`EventStream` is what the pipeline hands to the modules: it has the ``Progress`` methods
they call, turns each call into a typed event (keeping count of the current task for its ETA),
delivers it to the sink and checks the cancel token (``threading.Event`` or anything with
``is_set()``) between units of work, raising :class:`~compressor.errors.Cancelled`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, fields
from typing import IO, Any, ClassVar, Protocol, runtime_checkable

from .errors import Cancelled
from .progress import Progress


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)
    """Unix time (seconds) the event was made."""

    def to_dict(self) -> dict[str, Any]:
        """``{"type": ..., "time": ..., <fields>}``: the JSON-lines form."""
        return {"type": self.type, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class StageStarted(Event):
    type: ClassVar[str] = "stage_started"
    name: str


@dataclass(frozen=True)
class StageFinished(Event):
    type: ClassVar[str] = "stage_finished"
    name: str
    seconds: float


@dataclass(frozen=True)
class TaskStarted(Event):
    type: ClassVar[str] = "task_started"
    description: str
    total: int | None
    """Units of work, None where they are not countable."""


@dataclass(frozen=True)
class TaskProgress(Event):
    type: ClassVar[str] = "task_progress"
    description: str
    done: int
    total: int | None
    advanced: int = 1
    """Units done since the last progress event."""
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None
    """Seconds left at the pace so far; None where the work is not countable."""


@dataclass(frozen=True)
class TaskFinished(Event):
    type: ClassVar[str] = "task_finished"
    description: str
    done: int
    seconds: float


@dataclass(frozen=True)
class Note(Event):
    type: ClassVar[str] = "note"
    message: str


@dataclass(frozen=True)
class WarningEvent(Event):
    type: ClassVar[str] = "warning"
    message: str


@dataclass(frozen=True)
class Heartbeat(Event):
    type: ClassVar[str] = "heartbeat"
    what: str
    seconds: float
    rss: int | None


@runtime_checkable
class Sink(Protocol):
    def event(self, e: Event) -> None: ...


@runtime_checkable
class CancelToken(Protocol):
    def is_set(self) -> bool: ...


def deliver(sink: Any, e: Event) -> None:
    """Give ``e`` to ``sink``: its ``event`` method, or (an object with only the older ``Progress``
    methods) the matching one of those."""
    if hasattr(sink, "event"):
        sink.event(e)
    else:
        Progress.event(sink, e)


class JsonLines:
    """A sink writing one JSON object per line to a text stream (thread-safe: heartbeats come from a
    watchdog thread)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def event(self, e: Event) -> None:
        line = json.dumps(e.to_dict(), allow_nan=False)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class Tee:
    """A sink delivering every event to each of ``sinks`` in turn."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def event(self, e: Event) -> None:
        for sink in self.sinks:
            deliver(sink, e)


class EventStream(Progress):
    """The ``Progress`` calls of the library as typed events to ``sink``, with the cancel check."""

    def __init__(self, sink: Any = None, cancel: CancelToken | None = None) -> None:
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError("cancel must be a threading.Event or have an is_set() method")
        self.sink = sink if sink is not None else Progress()
        self.cancel = cancel
        self._task: tuple[str, int | None, float] | None = None
        self._done = 0
        self._stages: dict[str, float] = {}

    @classmethod
    def wrap(cls, progress: Any, cancel: CancelToken | None) -> EventStream:
        """``progress`` itself where it is already a stream with this token, else a stream around it."""
        if isinstance(progress, EventStream) and (cancel is None or cancel is progress.cancel):
            return progress
        return cls(progress, cancel)

    def emit(self, e: Event) -> None:
        deliver(self.sink, e)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.done()
            raise Cancelled("the run was cancelled; nothing was written")

    def event(self, e: Event) -> None:  # a stream can be a sink too (nesting)
        self.emit(e)

    # -- stages -------------------------------------------------------------------------------------------

    def stage_started(self, name: str) -> None:
        self.check_cancel()
        self._stages[name] = time.perf_counter()
        self.emit(StageStarted(name))

    def stage_finished(self, name: str) -> float:
        seconds = round(time.perf_counter() - self._stages.pop(name), 3)
        self.emit(StageFinished(name, seconds))
        return seconds

    def stage(self, name: str) -> None:
        self.stage_started(name)

    # -- tasks --------------------------------------------------------------------------------------------

    def task(self, description: str, total: int) -> None:
        self.done()
        self.check_cancel()
        self._task = (description, total or None, time.perf_counter())
        self._done = 0
        self.emit(TaskStarted(description, total or None))

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._task is not None:
            description, total, start = self._task
            self._done += n
            eta = None
            if total:
                eta = max(0.0, (time.perf_counter() - start) / self._done * (total - self._done)) if self._done else None
            self.emit(TaskProgress(description, self._done, total, n, dict(metrics), eta))
        self.check_cancel()

    def done(self) -> None:
        if self._task is not None:
            description, _, start = self._task
            self._task = None
            self.emit(TaskFinished(description, self._done, round(time.perf_counter() - start, 3)))

    # -- the rest -----------------------------------------------------------------------------------------

    def heartbeat(self, what: str, *, seconds: float, rss: int | None) -> None:
        self.emit(Heartbeat(what, seconds, rss))

    def note(self, message: str) -> None:
        self.emit(Note(message))

    def warning(self, message: str) -> None:
        self.emit(WarningEvent(message))
