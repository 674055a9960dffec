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

    def note(self, message: str) -> None:
        """Something the user should read (a warning, a decision taken)."""
