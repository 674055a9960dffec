"""An example third-party schedule with its own options, registered through ``compressor.schedules``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.schedules import BaseSchedule, Run


@dataclass(frozen=True)
class AtOptions:
    """``example-at``'s options (``--schedule-opt KEY=VALUE``)."""

    at: float = 0.0
    """Share of the fine-tuning cycle after which it prunes, from 0 (before the first step) to 1."""
    note: str = "example"
    """Said in the report's reason for the prune."""

    def __post_init__(self) -> None:
        if not 0 <= self.at <= 1:
            raise ValueError(f"at must lie in [0, 1], got {self.at}")


class PruneAt(BaseSchedule):
    """Example plug-in: prune to the target once, at a chosen share of the cycle."""

    Options = AtOptions

    def __init__(self, at: float = 0.0, note: str = "example") -> None:
        self.at, self.note = at, note
        self._step: int | None = None

    def begin(self, run: Run) -> None:
        self._step = int(self.at * run.total_steps)
        self.after_step(run)

    def after_step(self, run: Run) -> None:
        if not run.events and run.step >= (self._step or 0):
            run.prune_to(run.target, reason=f"{self.note} at {self.at:g} of the cycle")

    def end(self, run: Run) -> None:
        self.after_step(run)

    def details(self) -> dict[str, Any]:
        return {"at": self.at, "step": self._step}
