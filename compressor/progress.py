"""How the library reports progress: a small protocol the command line implements with rich.

The library never prints. It emits typed events (:mod:`compressor.events`) to a sink; a
``Progress`` is a sink whose :meth:`Progress.event` turns each event into one of the methods below,
so a subclass overrides either ``event`` (typed events) or the methods it wants to show. The
default does nothing.
"""

from __future__ import annotations

from typing import Any


class Progress:
    """No-op progress sink. Subclass and override what you want to show."""

    def event(self, e: Any) -> None:
        """One typed event (:mod:`compressor.events`); the default calls the matching method below."""
        kind = getattr(e, "type", "")
        if kind == "stage_started":
            self.stage(e.name)
        elif kind == "task_started":
            self.task(e.description, e.total or 0)
        elif kind == "task_progress":
            self.advance(e.advanced, **e.metrics)
        elif kind == "task_finished":
            self.done()
        elif kind == "heartbeat":
            self.heartbeat(e.what, seconds=e.seconds, rss=e.rss)
        elif kind == "note":
            self.note(e.message)
        elif kind == "warning" and hasattr(self, "warning"):
            self.warning(e.message)

    def stage(self, name: str) -> None:
        """A pipeline stage begins."""

    def task(self, description: str, total: int) -> None:
        """A countable piece of work begins (steps of an epoch, probes of a search)."""

    def advance(self, n: int = 1, **metrics: float) -> None:
        """``n`` more units of the current task are done; ``metrics`` are its latest figures."""

    def done(self) -> None:
        """The current task has ended."""

    def heartbeat(self, what: str, *, seconds: float, rss: int | None) -> None:
        """Work without countable steps (tracing) is still going, ``seconds`` after it began; ``rss``
        is the process's resident memory in bytes (None where unknown). Called from a watchdog thread."""

    def note(self, message: str) -> None:
        """Something the user should read (a decision taken)."""

    def warning(self, message: str) -> None:
        """A warning of the run (also in the report's ``warnings``)."""

    def check_cancel(self) -> None:
        """Raise ``Cancelled`` where the run was asked to stop; the plain sink never does."""
