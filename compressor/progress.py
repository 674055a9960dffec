"""How the library reports progress: a small protocol the command line implements with rich.

The library never prints; it calls these methods, and the default does nothing.
"""

from __future__ import annotations


class Progress:
    """No-op progress sink. Subclass and override what you want to show."""

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
        """Something the user should read (a warning, a decision taken)."""
