"""A job's events: the library's typed events (:mod:`compressor.events`), one JSON line each in the job's
``events.jsonl``, exactly as ``compress --json-events`` writes them; read back numbered, and folded into the
job's current stage and progress.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def open_sink(path: Path) -> tuple[Any, IO[str]]:
    """The sink ``compress(progress=...)`` writes the job's events to, and the file to close after."""
    from compressor.events import JsonLines

    stream = open(path, "a", encoding="utf-8")
    return JsonLines(stream), stream


def read_events(path: Path, after: int = 0) -> list[dict[str, Any]]:
    """Events numbered from 1 (``n``, the line number); those after ``after``."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if n <= after or not line.endswith("\n"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            out.append({"n": n, **ev})
    return out


@dataclass
class Follower:
    """Follows a growing ``events.jsonl`` from where it last stopped and keeps the stage and the current
    task's progress (``{task, done, total, eta_s}``: the fields of the latest ``task_progress``)."""

    path: Path
    stage: str | None = None
    progress: dict[str, Any] | None = None
    _offset: int = field(default=0, repr=False)

    def poll(self) -> bool:
        """Read the lines written since the last call; True when the stage or progress changed."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return False
        end = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        before = (self.stage, self.progress)
        for line in chunk[:end].splitlines():
            try:
                self.fold(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue
        return (self.stage, self.progress) != before

    def fold(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "stage_started":
            self.stage, self.progress = ev["name"], None
        elif kind == "task_started":
            self.progress = {"task": ev["description"], "done": 0, "total": ev["total"], "eta_s": None}
        elif kind == "task_progress":
            eta = ev.get("eta_seconds")
            self.progress = {"task": ev["description"], "done": ev["done"], "total": ev["total"],
                             "eta_s": round(eta, 1) if eta is not None else None}
        elif kind == "task_finished" and self.progress is not None:
            self.progress = dict(self.progress, done=ev["done"], eta_s=0.0)
